"""Growth-aware admission (hae_vllm.engine.admission): the reserve is the running set's peak
net growth, against a step-by-step simulation."""

from dataclasses import dataclass

import numpy as np
import pytest

from hae_vllm.engine import admission
from hae_vllm.engine.admission import GrowthReserve, peak_extra_blocks


def simulate(num_tokens, remaining, bs):
    """Step by step: every unfinished request writes one token; a request frees its blocks
    after its last token.  The most blocks in use beyond the start."""
    tokens, left = list(num_tokens), list(remaining)
    start = sum(-(-n // bs) for n in tokens)
    tokens = [t if x > 0 else 0 for t, x in zip(tokens, left)]  # nothing left: done before step 1
    peak = 0
    while any(x > 0 for x in left):
        for r in range(len(tokens)):
            if left[r] > 0:
                tokens[r] += 1
        peak = max(peak, sum(-(-n // bs) for n in tokens) - start)
        for r in range(len(tokens)):
            if left[r] > 0:
                left[r] -= 1
                if left[r] == 0:
                    tokens[r] = 0  # finished: its blocks go back
    return peak


@pytest.mark.parametrize("seed", range(30))
def test_peak_matches_a_step_by_step_simulation(seed):
    rng = np.random.default_rng(seed)
    R = int(rng.integers(1, 12))
    bs = int(rng.choice([4, 16, 32]))
    n = rng.integers(1, 200, R)
    rem = rng.integers(0, 150, R)
    assert peak_extra_blocks(n, rem, bs) == simulate(n.tolist(), rem.tolist(), bs)


def test_requests_near_their_end_make_room_for_the_others():
    # One request about to finish holding 10 blocks; another will grow by 4: no reserve.
    assert peak_extra_blocks([319, 33], [1, 128], 32) == 0
    # Both need a block at their next token, before the first frees its 10.
    assert peak_extra_blocks([320, 32], [1, 128], 32) == 2
    # Both at the start of 128 tokens: 4 new blocks each, all needed before either finishes.
    assert peak_extra_blocks([32, 32], [128, 128], 32) == 8
    assert peak_extra_blocks([], [], 32) == 0


def test_many_requests_evaluate_quantile_times():
    rng = np.random.default_rng(0)
    n, rem = rng.integers(1, 500, 1000), rng.integers(1, 4000, 1000)
    got = peak_extra_blocks(n, rem, 16)
    exact_times = admission.MAX_EVAL_TIMES
    try:
        admission.MAX_EVAL_TIMES = 10**6
        exact = peak_extra_blocks(n, rem, 16)
    finally:
        admission.MAX_EVAL_TIMES = exact_times
    assert 0.97 * exact <= got <= exact


@dataclass
class Req:
    num_tokens: int
    num_output_tokens: int
    max_tokens: int


def test_ratio_decays_and_preemptions_raise_it():
    g = GrowthReserve(num_blocks=1000, block_size=16)
    running = [Req(num_tokens=16, num_output_tokens=0, max_tokens=1600)]
    assert g.blocks(running) == 70  # 0.7 of 1600 tokens after a full block of 16
    for _ in range(admission.DECAY_STEPS + 10):
        last = g.blocks(running)
    floor = admission.INIT_RATIO * admission.MIN_RATIO_FACTOR
    assert g.ratio == pytest.approx(floor) and last == 10  # ceil(0.098 x 1600) = 157 tokens
    g.preempted([Req(num_tokens=200, num_output_tokens=100, max_tokens=160)] * 4)
    assert g.ratio == pytest.approx((400 + 4 * admission.RETRACT_STEPS) / 640)
    g.preempted([Req(num_tokens=20, num_output_tokens=0, max_tokens=1000)])
    assert g.ratio == pytest.approx((400 + 4 * admission.RETRACT_STEPS) / 640)  # never lowered by a preemption
    assert g.blocks([]) == 0 and g.ratio == admission.INIT_RATIO  # idle: starts again


def test_reserve_is_at_most_half_the_pool():
    g = GrowthReserve(num_blocks=100, block_size=16)
    assert g.blocks([Req(num_tokens=16, num_output_tokens=0, max_tokens=100_000)]) == 50
    assert g.blocks([]) == 0
