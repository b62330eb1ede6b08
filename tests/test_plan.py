"""Compaction plans: whole blocks, token-level choice, minimal moves, never the tail block."""

import numpy as np
import pytest

from hae_vllm.plan import apply_plan_to_positions, plan_compaction


@pytest.mark.parametrize("seed", range(200))
def test_plan_invariants_random(seed):
    rng = np.random.default_rng(seed)
    bs = int(rng.choice([16, 32]))
    T = int(rng.integers(1, 12 * bs))
    n_victims = int(rng.integers(0, T + 1))
    ranked = rng.permutation(T)[:n_victims]
    plan = plan_compaction(ranked, T, bs)
    k = min(n_victims // bs, T // bs)
    assert len(plan.hole_blocks) == k
    assert plan.num_evicted == k * bs
    # Token-level choice: the highest-ranked victims go.
    assert set(plan.victims) == set(ranked[: k * bs].tolist())
    # Holes are full blocks, never the partly filled tail.
    assert all(h < T // bs for h in plan.hole_blocks)
    # After the moves, every kept token lives in a non-hole slot exactly once.
    slots = apply_plan_to_positions(plan, T, bs)
    held = slots[slots >= 0]
    kept = sorted(set(range(T)) - set(plan.victims))
    assert sorted(held.tolist()) == kept
    # Minimal movement: only kept tokens inside hole blocks move.
    hole_tokens = {p for h in plan.hole_blocks for p in range(h * bs, (h + 1) * bs)}
    assert set(plan.move_src) == hole_tokens - set(plan.victims)
    assert set(plan.move_dst).isdisjoint(hole_tokens)


def test_plan_prefers_blocks_full_of_victims():
    bs = 4
    # Block 2 is entirely victims: it becomes the hole with no data movement.
    plan = plan_compaction([8, 9, 10, 11], 20, bs)
    assert plan.hole_blocks == (2,)
    assert plan.move_src == () and plan.move_dst == ()


def test_plan_scattered_victims_move_kept_tokens():
    bs = 4
    plan = plan_compaction([0, 5, 6, 13], 16, bs)
    assert plan.hole_blocks == (1,)  # block 1 holds two victims (5, 6)
    assert plan.move_src == (4, 7)
    assert plan.move_dst == (0, 13)


def test_plan_too_few_victims_is_empty():
    assert plan_compaction([1, 2, 3], 64, 4 * 8).is_empty
    # Victims only in the tail block region: T // bs full blocks bounds the count.
    assert plan_compaction(list(range(30)), 30, 32).is_empty
