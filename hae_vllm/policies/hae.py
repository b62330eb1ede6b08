"""HAE prefill stage: Dual-Attention Pruning (HAE arXiv 2602.02197, following MustDrop's
dual-attention filter, arXiv 2411.10803).

Scores come from the first decoder layer only (its indices are then broadcast to every layer):
the text tokens that follow the image(s) are the queries; per key position
``g_j = sum_i A[i, j]`` (global) and ``m_j = max_i A[i, j]`` (individual), ``A`` averaged over
heads.  See :func:`normalized_scores` for the rule.
"""

from __future__ import annotations

import numpy as np
import torch

from hae_vllm.policies.base import AttentionStats, Policy, PolicySettings, ScoringRequest



def normalized_scores(
    g: torch.Tensor,
    m: torch.Tensor,
    modality_mask: torch.Tensor,
    r_global: float,
    r_individual: float,
    variance_gain: float,
) -> torch.Tensor:
    """Score ``s_j = max(p_j / r_g_eff, m_j / r_i)`` for tokens of one modality.

    ``p_j = g_j / sum_{k in modality} g_k``.  A token is a threshold victim iff ``s_j < 1``,
    i.e. both its global share and its individual score fall under the thresholds (MustDrop's
    dual-attention rule).  ``r_g_eff = r_global * (1 + variance_gain * CV(p))``: the adaptive
    rule, explicit and configurable (the paper's exact formula is unpublished): the more
    concentrated the attention on this modality, the more of its tokens are redundant.
    Returns +inf outside the modality.
    """
    # numpy: a few hundred elements, where torch's per-op dispatch would dominate.
    gn, mn = g.numpy(), m.numpy()
    out = np.full(gn.shape, np.inf, dtype=np.float32)
    idx = np.flatnonzero(modality_mask.numpy())
    if idx.size == 0:
        return torch.from_numpy(out)
    gv = gn[idx]
    total = gv.sum()
    p = gv / total if total > 0 else np.full_like(gv, 1.0 / gv.size)
    mean = p.mean()
    # Equal shares have no variation (exactly: pairwise sums would leave rounding noise).
    cv = float(p.std() / mean) if p.size > 1 and mean > 0 and p.max() > p.min() else 0.0
    r_g = r_global * (1.0 + variance_gain * cv)
    eps = 1e-30
    out[idx] = np.maximum(p / max(r_g, eps), mn[idx] / max(r_individual, eps))
    return torch.from_numpy(out)


class HAEPolicy(Policy):
    name = "hae"
    description = (
        "Hierarchical Adaptive Eviction: layer-0 dual-attention (global + individual) pruning of "
        "visual tokens by the text that follows them, variance-adaptive thresholds, indices "
        "broadcast to every layer"
    )
    has_thresholds = True

    def scoring(self, num_tokens, visual_mask, cfg):
        pos = np.arange(num_tokens)
        first_visual = int(visual_mask.argmax()) if visual_mask.any() else num_tokens
        # Ablation: score every layer too, to measure how well layer 0 stands for them.
        layers = None if cfg.measure_layer_overlap else (0,)
        return ScoringRequest(layers=layers, query_mask=(pos > first_visual) & ~visual_mask)

    def scores(self, stats: AttentionStats, visual_mask, candidates, cfg: PolicySettings, layer: int = 0):
        st = stats.layers[layer]
        s = normalized_scores(st.g, st.m, visual_mask & candidates, cfg.r_global, cfg.r_individual, cfg.variance_gain)
        if cfg.evict_text:
            scale = max(cfg.text_threshold_scale, 1e-12)
            st_text = normalized_scores(
                st.g, st.m, ~visual_mask & candidates, cfg.r_global * scale, cfg.r_individual * scale, cfg.variance_gain
            )
            s = torch.minimum(s, st_text)
        return s

    def threshold_count(self, sorted_scores):
        return int(np.count_nonzero(np.asarray(sorted_scores) < 1.0))

    def diagnostics(self, stats, keep, visual_mask, candidates, cfg):
        """Index broadcasting ablation (paper's Fig. 5): overlap of the layer-0 victims with the
        victims the same rule picks from each layer's own attention (logical, same count)."""
        if len(stats.layers) < 2:
            return {}
        victims = ~keep
        n = int(victims.sum())
        if n == 0:
            return {"hae_layer_overlap": [1.0] * len(stats.layers)}
        overlap = []
        for layer in sorted(stats.layers):
            s = self.scores(stats, visual_mask, candidates, cfg, layer=layer)
            s = torch.where(candidates, s, torch.full_like(s, float("inf")))
            pick = torch.argsort(s, stable=True)[:n]
            overlap.append(float(victims[pick].sum()) / n)
        return {"hae_layer_overlap": overlap}
