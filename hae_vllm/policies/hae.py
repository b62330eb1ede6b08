"""HAE prefill stage: Dual-Attention Pruning (HAE arXiv 2602.02197, following MustDrop's
dual-attention filter, arXiv 2411.10803).

Scores come from the first decoder layer only: the attention rows of the text tokens that
follow the image(s) are softmax-normalised over every key they can see (causal), averaged over
heads, and reduced per key position into

* ``g_j = sum_i A[i, j]`` (global score) and
* ``m_j = max_i A[i, j]`` (individual score).

:class:`ScoreAccumulator` builds these chunk by chunk, so chunked prefill sees exactly the same
numbers as one-shot prefill.  :func:`select_victims` turns them into a ranked victim list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hae_vllm.config import EvictionConfig


def attention_rows(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_positions: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal softmax attention of selected queries over all keys, summed over heads.

    Args:
        queries: [nq, num_heads, head_dim] (post-RoPE, as the model computed them).
        keys: [T, num_kv_heads, head_dim] (post-RoPE, positions 0..T-1).
        query_positions: [nq] logical positions of the queries (< T).
        scale: softmax scale.

    Returns:
        [nq, T] float32: the attention probabilities summed over the *local* heads (the caller
        divides by the global head count, after an all-reduce under tensor parallelism).
    """
    nq, num_heads, head_dim = queries.shape
    T, num_kv_heads, _ = keys.shape
    group = num_heads // num_kv_heads
    q = queries.float().view(nq, num_kv_heads, group, head_dim)  # GQA folding, no key copy
    k = keys.float()
    # logits[h_kv, g, i, j]
    logits = torch.einsum("ihgd,jhd->hgij", q, k) * scale
    key_pos = torch.arange(T, device=keys.device)
    mask = key_pos[None, :] > query_positions[:, None].to(keys.device)  # [nq, T]
    logits.masked_fill_(mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return probs.sum(dim=(0, 1))  # [nq, T]


@dataclass
class ScoreAccumulator:
    """Per-request global/individual scores over key positions, grown chunk by chunk."""

    g: torch.Tensor  # [capacity] float32
    m: torch.Tensor  # [capacity] float32
    num_queries: int = 0

    @classmethod
    def create(cls, capacity: int) -> "ScoreAccumulator":
        return cls(torch.zeros(capacity), torch.zeros(capacity))

    def add(self, rows: torch.Tensor) -> None:
        """rows: [nq, T] head-averaged attention probabilities."""
        if rows.numel() == 0:
            return
        T = rows.shape[1]
        if T > self.g.numel():
            grow = T - self.g.numel()
            self.g = torch.cat([self.g, torch.zeros(grow)])
            self.m = torch.cat([self.m, torch.zeros(grow)])
        rows = rows.to(self.g.device)
        self.g[:T] += rows.sum(0)
        self.m[:T] = torch.maximum(self.m[:T], rows.max(0).values)
        self.num_queries += rows.shape[0]


@dataclass
class Selection:
    """Victims ranked most-evictable first, with the score that ranked them."""

    victims: torch.Tensor  # [n] int64 positions, ascending score
    scores: torch.Tensor  # [n] float32
    num_threshold_victims: int
    num_visual: int
    num_text: int


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
    rule, explicit and configurable (the paper's exact formula is unpublished).
    Returns +inf outside the modality.
    """
    out = torch.full_like(g, float("inf"))
    idx = modality_mask.nonzero(as_tuple=True)[0]
    if idx.numel() == 0:
        return out
    gv = g[idx]
    total = gv.sum()
    p = gv / total if total > 0 else torch.full_like(gv, 1.0 / gv.numel())
    cv = (p.std(unbiased=False) / p.mean()).item() if p.numel() > 1 and p.mean() > 0 else 0.0
    r_g = r_global * (1.0 + variance_gain * cv)
    eps = 1e-30
    s = torch.maximum(p / max(r_g, eps), m[idx] / max(r_individual, eps))
    out[idx] = s
    return out


def select_victims(
    g: torch.Tensor,
    m: torch.Tensor,
    visual_mask: torch.Tensor,
    protected_mask: torch.Tensor,
    cfg: EvictionConfig,
) -> Selection:
    """Rank candidate tokens and decide how many go.

    Args:
        g, m: [T] accumulated scores (T = prompt length).
        visual_mask: [T] bool, True for visual (placeholder) tokens.
        protected_mask: [T] bool, True for tokens that must stay (sinks, recent window,
            shared prefix-cache blocks).
        cfg: the request's config.

    Count rule: without a budget, every threshold victim (``s < 1``) goes; with a budget,
    exactly ``T - ceil(budget * T)`` lowest-scored candidates go (threshold victims first), so
    ``budget=1`` evicts nothing.  Never more than ``max_evict_frac`` of the candidates.
    """
    T = g.numel()
    visual = visual_mask & ~protected_mask
    s = normalized_scores(g, m, visual, cfg.r_global, cfg.r_individual, cfg.variance_gain)
    if cfg.evict_text:
        text = ~visual_mask & ~protected_mask
        scale = max(cfg.text_threshold_scale, 1e-12)
        st = normalized_scores(
            g, m, text, cfg.r_global * scale, cfg.r_individual * scale, cfg.variance_gain
        )
        s = torch.minimum(s, st)
    candidates = torch.isfinite(s).nonzero(as_tuple=True)[0]
    cand_scores = s[candidates]
    order = torch.argsort(cand_scores, stable=True)
    candidates, cand_scores = candidates[order], cand_scores[order]

    n_thr = int((cand_scores < 1.0).sum())
    if cfg.budget is None:
        n = n_thr
    else:
        # Equal-memory comparisons need the budget to fix the count exactly; the score (whose
        # threshold victims rank first) decides which tokens go.
        n = T - math.ceil(cfg.budget * T - 1e-9)
    cap = int(cfg.max_evict_frac * candidates.numel())
    n = max(0, min(n, cap, candidates.numel()))
    victims = candidates[:n]
    nv = int(visual_mask[victims].sum()) if n else 0
    return Selection(
        victims=victims,
        scores=cand_scores[:n],
        num_threshold_victims=min(n_thr, n),
        num_visual=nv,
        num_text=n - nv,
    )
