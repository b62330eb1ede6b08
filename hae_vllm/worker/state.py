"""Per-request and per-step records the worker's stages share."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hae_vllm.config import EvictionConfig
from hae_vllm.plan import EvictionPlan
from hae_vllm.policies.attention import LayerAccumulator
from hae_vllm.policies.base import Policy, ScoringRequest
from hae_vllm.worker.decode_bank import DecodeState


@dataclass
class RequestState:
    req_id: str
    cfg: EvictionConfig
    policy: Policy
    scoring: ScoringRequest | None  # attention the policy needs (None: position-only policy)
    visual_mask: np.ndarray  # [num_tokens_at_start] bool
    protected_prefix: int  # tokens served from the prefix cache at (re)start: never rewritten
    accs: dict[int, LayerAccumulator] = field(default_factory=dict)  # layer ordinal -> stats
    # Scoring deferred to selection: (layer ordinal, queries, positions) copied in the forward.
    defer_scoring: bool | None = None
    saved_queries: list = field(default_factory=list)
    decided: bool = False
    plan: EvictionPlan | None = None
    decode: DecodeState | None = None

    def scores_layer(self, ordinal: int) -> bool:
        sc = self.scoring
        return sc is not None and (sc.layers is None or ordinal in sc.layers)


@dataclass
class DecodeTask:
    state: RequestState
    row: int
    start: int
    end: int
    block_ids: list[int]
    num_live: int | None = None  # live tokens this step (counted by scoring, before any parking)
    # Scored this step (score_interval > 1: only every k steps), and how many queries were.
    due: bool = True
    num_scored: int = 1


@dataclass
class ScoringTask:
    state: RequestState
    row: int  # index in the persistent batch == row of query_start_loc
    start: int  # first position of this chunk
    end: int  # one past the last position of this chunk
    is_last_chunk: bool
    block_ids: list[int] = field(default_factory=list)
