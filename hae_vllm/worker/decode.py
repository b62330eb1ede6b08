"""Dynamic Decoding Eviction, worker side (HAE's decode stage).

Per request, after its prefill was planned:

* ``slot_pos`` maps each logical slot of the request (block index * block_size + offset) to the
  token position stored there (-1: hole or not yet written).  New decode tokens land in slot ==
  position (vLLM's slot mapping is logical); compaction swaps move tokens between slots;
* ``score`` holds, per position, the decayed attention the token received from each new query
  at the first decoder layer (live and binned tokens alike, so they can be compared);
* ``bin``: parked blocks (id, logical index, the positions they hold), readable until vLLM's
  pool reuses them.

Parking: when live tokens exceed the budget by a whole block, the lowest-scored evictable tokens
(no sinks, no recent window, not in the tail block) are swapped into whole blocks, which leave
the attention set and go to the bin.  Restoring: every ``rescore_interval`` steps the best binned
block is proposed back when it beats the weakest live block's worth of tokens; the scheduler
confirms it (the block may have been reused) and the worker re-inserts it at the next step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from hae_vllm.config import EvictionConfig
from hae_vllm.plan import apply_plan_to_positions, plan_compaction


@dataclass
class BinEntry:
    block_id: int
    index: int  # logical block index it came from (a null hole while parked)
    positions: np.ndarray  # [block_size] token positions it holds, in slot order


@dataclass
class DecodeState:
    slot_pos: np.ndarray
    score: np.ndarray  # float32 [positions]
    bin: dict[int, BinEntry] = field(default_factory=dict)
    pending_restore: set[int] = field(default_factory=set)
    steps: int = 0
    by_position: bool = False  # StreamingLLM: park the oldest tokens, never restore
    # Layer-0 keys by position (this rank's KV heads, as the cache stores them): what decode
    # scoring reads instead of gathering from the paged cache every step.
    keys: torch.Tensor | None = None

    @classmethod
    def after_prefill(cls, plan, num_tokens: int, block_size: int) -> "DecodeState":
        return cls(
            slot_pos=apply_plan_to_positions(plan, num_tokens, block_size),
            score=np.zeros(num_tokens, dtype=np.float32),
        )

    def ensure(self, num_slots: int) -> None:
        if num_slots > len(self.slot_pos):
            self.slot_pos = np.concatenate([self.slot_pos, np.full(num_slots - len(self.slot_pos), -1)])
        if num_slots > len(self.score):
            self.score = np.concatenate([self.score, np.zeros(num_slots - len(self.score), dtype=np.float32)])
        if self.keys is not None and num_slots > self.keys.shape[0]:
            extra = max(num_slots - self.keys.shape[0], self.keys.shape[0] // 2)  # amortised growth
            self.keys = torch.cat([self.keys, self.keys.new_zeros((extra,) + tuple(self.keys.shape[1:]))])

    def live_slots(self, block_ids: list[int], block_size: int) -> np.ndarray:
        blocks = np.asarray(block_ids[: math.ceil(len(self.slot_pos) / block_size)])
        n = min(len(self.slot_pos), len(blocks) * block_size)
        s = np.arange(n)
        return s[(self.slot_pos[:n] >= 0) & (blocks[s // block_size] != 0)]

    def value(self, entry: BinEntry) -> float:
        return float(self.score[entry.positions].mean())


@dataclass
class DecodeActions:
    """What one request's decode step decided (reported to the scheduler)."""

    parked: list[tuple[int, int]] = field(default_factory=list)  # (logical index, block id)
    parked_positions: list[int] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    restore: list[tuple[int, int]] = field(default_factory=list)


def decode_limit(cfg: EvictionConfig, num_tokens: int) -> int:
    if cfg.decode_budget_tokens is not None:
        return cfg.decode_budget_tokens
    return math.ceil(cfg.decode_budget * num_tokens - 1e-9)


def choose_parking(
    ds: DecodeState, cfg: EvictionConfig, block_ids: list[int], end: int, block_size: int,
    protected_prefix: int = 0, live: np.ndarray | None = None,
):
    """Victim slots to park now (ranked) and the swap plan, or None.

    Slots below ``protected_prefix`` are prefix-cache hits shared with other requests: their
    blocks are never rewritten, so no token in them moves.  ``live``: ``ds.live_slots``
    when the caller has it already (nothing moved since)."""
    bs = block_size
    if live is None:
        live = ds.live_slots(block_ids, bs)
    excess = len(live) - decode_limit(cfg, end)
    k = excess // bs if excess > 0 else 0
    if k == 0:
        return None
    pos = ds.slot_pos[live]
    evictable = (
        (pos >= cfg.sink_tokens)
        & (pos < end - cfg.decode_recent_tokens)
        & (live // bs < end // bs)
        & (live >= protected_prefix)
    )
    cand = live[evictable]
    if len(cand) < bs:
        return None
    scores = ds.slot_pos[cand] if ds.by_position else ds.score[ds.slot_pos[cand]]
    order = np.argsort(scores, kind="stable")
    ranked = cand[order]
    plan = plan_compaction(ranked[: k * bs], end, bs)
    if plan.is_empty:
        return None
    assert all(h * bs >= protected_prefix for h in plan.hole_blocks)
    return plan


def weakest_live_value(
    ds: DecodeState, cfg: EvictionConfig, block_ids, end: int, bs: int, protected_prefix: int = 0
) -> float | None:
    live = ds.live_slots(block_ids, bs)
    live = live[live >= protected_prefix]
    pos = ds.slot_pos[live]
    pos = pos[(pos >= cfg.sink_tokens) & (pos < end - cfg.decode_recent_tokens)]
    if len(pos) < bs:
        return None
    return float(np.sort(ds.score[pos])[:bs].mean())
