"""What every eviction policy shares: the statistics it asks for, candidate/protection rules,
and one selection routine (kvpress style: a policy only scores; the base selects).

A policy says which attention it needs (:class:`ScoringRequest`: layers, query positions,
per-head or not); the worker computes exactly that at prefill and hands it back as
:class:`AttentionStats`.  Selection then ranks candidates by the policy's score (lower is
evicted first) and evicts the count set by the shared budget rule, so every method is compared
at equal physical memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import numpy as np
import torch


class PolicySettings(Protocol):
    """The settings a policy reads.  ``hae_vllm.config.EvictionConfig`` provides them; this is a
    protocol rather than an import because the config lists the policies (their registry), so
    a policy importing the config back would close a circle."""

    budget: float | None
    max_evict_frac: float
    evict_text: bool
    text_threshold_scale: float
    r_global: float
    r_individual: float
    variance_gain: float
    measure_layer_overlap: bool
    window: int
    pool_kernel: int
    pooling: str
    fastv_layer: int
    theta: float
    seed: int


@dataclass(frozen=True)
class ScoringRequest:
    """Attention a policy needs during prefill.

    layers: ordinal indices of the decoder's attention layers to score at (0 = first).
    query_mask: [num_prompt_tokens] bool, the positions whose attention rows are used.
    per_head: also keep per-head sums (``AttentionStats.head_sum``).
    needs_max: the policy reads ``LayerStats.m`` (the max over queries).  A policy that needs
    only sums over queries lets the host compute them without per-query rows
    (:func:`hae_vllm.kernels.scoring.column_mass`); its ``m`` is then None.
    """

    layers: tuple[int, ...]
    query_mask: np.ndarray
    per_head: bool = False
    needs_max: bool = True


@dataclass
class LayerStats:
    """Attention received by each key position, over the selected queries of one layer.

    g: [T] sum over queries of the head-averaged probability; m: [T] max over queries (None
    when the policy did not ask for it, ``ScoringRequest.needs_max``);
    count: [T] number of selected queries that can see the position (causal);
    head_sum: [H, T] per-head sum over queries (only when requested).
    """

    g: torch.Tensor
    m: torch.Tensor | None
    count: torch.Tensor
    head_sum: torch.Tensor | None = None


@dataclass
class AttentionStats:
    layers: dict[int, LayerStats] = field(default_factory=dict)

    def first(self) -> LayerStats:
        return self.layers[min(self.layers)]


@dataclass
class Selection:
    """Victims ranked most-evictable first, with the score that ranked them."""

    victims: torch.Tensor  # [n] int64 positions, ascending score
    scores: torch.Tensor  # [n] float32
    num_threshold_victims: int
    num_visual: int
    num_text: int
    diagnostics: dict = field(default_factory=dict)


class Policy:
    """Base class: subclasses set ``name``/``description`` and implement :meth:`scores`."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    uses_attention: ClassVar[bool] = True
    has_thresholds: ClassVar[bool] = False  # can decide a count without a budget
    # Decode stage: rank parking candidates by position (oldest first) instead of by the
    # decayed layer-0 attention score (HAE's Dynamic Decoding Eviction, the default).
    decode_by_position: ClassVar[bool] = False

    def scoring(self, num_tokens: int, visual_mask: np.ndarray, cfg: PolicySettings) -> ScoringRequest | None:
        return None

    def candidates(self, visual_mask: torch.Tensor, cfg: PolicySettings) -> torch.Tensor:
        """Tokens the method may evict (before protection): visual, plus text if evict_text."""
        return visual_mask.clone() if not cfg.evict_text else torch.ones_like(visual_mask)

    def protected(self, num_tokens: int, cfg: PolicySettings) -> torch.Tensor:
        """Method-specific protected positions (sinks/recent/prefix are added by the caller)."""
        return torch.zeros(num_tokens, dtype=torch.bool)

    def scores(
        self, stats: AttentionStats, visual_mask: torch.Tensor, candidates: torch.Tensor, cfg: PolicySettings
    ) -> torch.Tensor:
        """[T] float scores, lower = evicted first; +inf for tokens that must stay."""
        raise NotImplementedError

    def threshold_count(self, sorted_scores: np.ndarray) -> int:
        """How many of the candidates (scores ascending) the method's own thresholds evict."""
        raise NotImplementedError(f"{self.name} needs a budget")

    def diagnostics(
        self, stats: AttentionStats, keep: torch.Tensor, visual_mask: torch.Tensor, candidates: torch.Tensor, cfg
    ) -> dict:
        """Extra, logical measurements recorded in the trace (no effect on the selection)."""
        return {}

    # ------------------------------------------------------------------ shared selection
    def select(
        self,
        stats: AttentionStats,
        visual_mask: torch.Tensor,
        protected_mask: torch.Tensor,
        cfg: PolicySettings,
    ) -> Selection:
        """Rank candidates and decide how many go.

        Count rule: with a budget, exactly ``T - ceil(budget * T)`` lowest-scored candidates go,
        so ``budget=1`` evicts nothing and every method frees the same memory; without one the
        method's own thresholds decide (HAE).  Never more than ``max_evict_frac`` of the
        candidates.
        """
        # numpy for the masks and the ranking: a few hundred elements, where torch's per-op
        # dispatch would dominate.
        T = visual_mask.numel()
        protected = protected_mask.numpy() | self.protected(T, cfg).numpy()
        cand_np = self.candidates(visual_mask, cfg).numpy() & ~protected
        cand = torch.from_numpy(cand_np)
        s = self.scores(stats, visual_mask, cand, cfg).float().numpy()
        ok = cand_np & np.isfinite(s)
        positions = np.flatnonzero(ok)
        cand_scores = s[positions]
        order = np.argsort(cand_scores, kind="stable")
        positions, cand_scores = positions[order], cand_scores[order]
        n_thr = self.threshold_count(cand_scores) if self.has_thresholds else 0
        if cfg.budget is None:
            n = n_thr
        else:
            n = T - math.ceil(cfg.budget * T - 1e-9)
        cap = int(cfg.max_evict_frac * positions.size)
        n = max(0, min(n, cap, positions.size))
        victims = positions[:n]
        nv = int(visual_mask.numpy()[victims].sum()) if n else 0
        keep = np.ones(T, dtype=bool)
        keep[victims] = False
        return Selection(
            victims=torch.from_numpy(victims),
            scores=torch.from_numpy(cand_scores[:n]),
            num_threshold_victims=min(n_thr, n),
            num_visual=nv,
            num_text=n - nv,
            diagnostics=self.diagnostics(stats, torch.from_numpy(keep), visual_mask, cand, cfg),
        )


def window_mask(num_tokens: int, window: int) -> np.ndarray:
    """The last ``window`` positions (observation window / proxy tokens)."""
    mask = np.zeros(num_tokens, dtype=bool)
    mask[max(0, num_tokens - window) :] = True
    return mask
