"""From a ranked victim list to whole-block holes: the compaction plan.

Invariants (see ../shared/DESIGN.md, "Compaction"):

* the number of evicted tokens is a multiple of ``block_size``; which tokens go stays
  token-level (the highest-ranked victims);
* hole blocks are full blocks (never the partly filled tail block, where decode writes next);
* the only data movement is: each *kept* token that sits in a hole block is copied into the
  slot of a victim outside the hole blocks.  The two sets have equal size by construction, so
  after the copy the hole blocks hold nothing that is needed and can be freed;
* positions stay logical: keys were stored after RoPE and decode attention does not depend on
  key order, so a token may live in any slot of its request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class EvictionPlan:
    """What one request's compaction does.  All indices are logical (request-relative)."""

    victims: tuple[int, ...]  # evicted token positions, len == len(hole_blocks) * block_size
    hole_blocks: tuple[int, ...]  # logical block indices that become null holes
    move_src: tuple[int, ...] = field(default=())  # kept positions inside hole blocks
    move_dst: tuple[int, ...] = field(default=())  # victim positions outside hole blocks

    @property
    def num_evicted(self) -> int:
        return len(self.victims)

    @property
    def is_empty(self) -> bool:
        return not self.hole_blocks


EMPTY_PLAN = EvictionPlan(victims=(), hole_blocks=())


def plan_compaction(
    ranked_victims: np.ndarray | list[int],
    num_tokens: int,
    block_size: int,
) -> EvictionPlan:
    """Round the victim list down to whole blocks and choose the hole blocks.

    Args:
        ranked_victims: candidate positions, most evictable first (no duplicates, all
            ``< num_tokens``; protected tokens must already be excluded).
        num_tokens: number of tokens whose KV is in the cache (the request's logical length).
        block_size: tokens per KV block.

    Returns:
        The plan; empty if fewer than ``block_size`` victims were given.
    """
    ranked = np.asarray(ranked_victims, dtype=np.int64)
    k = len(ranked) // block_size
    num_full_blocks = num_tokens // block_size
    k = min(k, num_full_blocks)
    if k == 0:
        return EMPTY_PLAN
    victims = ranked[: k * block_size]
    assert victims.max() < num_tokens  # distinct: checked below (moves pair up one to one)
    blocks = victims // block_size
    counts = np.bincount(blocks, minlength=num_full_blocks + 1)[:num_full_blocks]
    # The k full blocks holding the most victims (ties: the earlier block) need the fewest moves.
    order = np.lexsort((np.arange(num_full_blocks), -counts))
    holes = np.sort(order[:k])
    hole_set = np.zeros(num_full_blocks + 1, dtype=bool)
    hole_set[holes] = True
    is_victim = np.zeros(num_tokens, dtype=bool)
    is_victim[victims] = True
    hole_positions = (holes[:, None] * block_size + np.arange(block_size)[None, :]).ravel()
    src = hole_positions[~is_victim[hole_positions]]
    dst = np.sort(victims[~hole_set[blocks]])
    assert len(src) == len(dst), (len(src), len(dst))
    return EvictionPlan(
        victims=tuple(np.sort(victims).tolist()),
        hole_blocks=tuple(holes.tolist()),
        move_src=tuple(src.tolist()),
        move_dst=tuple(dst.tolist()),
    )


def apply_plan_to_positions(plan: EvictionPlan, num_tokens: int, block_size: int) -> np.ndarray:
    """Reference model of the cache after compaction: slot -> logical position held there,
    -1 for slots in hole blocks.  Used by tests to check the plan without a KV cache."""
    slots = np.arange(num_tokens, dtype=np.int64)
    slots[list(plan.move_dst)] = list(plan.move_src)
    for h in plan.hole_blocks:
        slots[h * block_size : (h + 1) * block_size] = -1
    return slots
