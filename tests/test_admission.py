"""Growth-aware admission (hae_vllm.engine.admission): the reserve follows what the running
requests are expected to grow into."""

from dataclasses import dataclass

import pytest

from hae_vllm.engine import admission
from hae_vllm.engine.admission import GrowthReserve


@dataclass
class Req:
    num_tokens: int
    num_output_tokens: int
    max_tokens: int


def test_reserve_is_expected_growth_beyond_the_last_block():
    g = GrowthReserve(num_blocks=1000, block_size=32)
    assert g.ratio == admission.INIT_RATIO
    # 100 tokens left at 0.7 = 70 tokens; 300 tokens fill 9 blocks and 12 slots of a 10th:
    # 20 slots free, 50 tokens need 2 more blocks.
    a = Req(num_tokens=300, num_output_tokens=28, max_tokens=128)
    # Finished its budget: grows by nothing.
    b = Req(num_tokens=500, num_output_tokens=64, max_tokens=64)
    # 10 tokens left (7 expected) fit in its last block's free slots.
    c = Req(num_tokens=310, num_output_tokens=54, max_tokens=64)
    assert [g.expected_growth(r) for r in (a, b, c)] == [2, 0, 0]
    assert g.blocks([a, b, c]) == 2


def test_ratio_decays_to_its_floor_and_resets_when_idle():
    g = GrowthReserve(num_blocks=1000, block_size=16)
    r = Req(num_tokens=16, num_output_tokens=0, max_tokens=1600)
    first = g.blocks([r])
    for _ in range(admission.DECAY_STEPS + 10):
        last = g.blocks([r])
    assert g.ratio == pytest.approx(admission.INIT_RATIO * admission.MIN_RATIO_FACTOR)
    assert first == 70 and last == 10  # 0.7 then 0.098 of 1600 tokens, in blocks of 16
    assert g.blocks([]) == 0 and g.ratio == admission.INIT_RATIO


def test_preemption_raises_the_ratio_to_what_requests_really_generate():
    g = GrowthReserve(num_blocks=1000, block_size=16)
    running = [Req(num_tokens=200, num_output_tokens=100, max_tokens=128) for _ in range(4)]
    for _ in range(admission.DECAY_STEPS):
        g.blocks(running)
    low = g.ratio
    g.preempted(running)
    # (4 x 100 generated + 20 x 4) / (4 x 128)
    assert g.ratio == pytest.approx(480 / 512) and g.ratio > low and g.preemptions == 1
    g.preempted([Req(num_tokens=20, num_output_tokens=0, max_tokens=1000)])
    assert g.ratio == pytest.approx(480 / 512)  # never lowered by a preemption


def test_reserve_is_at_most_half_the_pool():
    g = GrowthReserve(num_blocks=100, block_size=16)
    assert g.blocks([Req(num_tokens=16, num_output_tokens=0, max_tokens=100_000)]) == 50
