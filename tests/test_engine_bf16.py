"""bfloat16 end to end: what vLLM on CPU runs by default (``dtype=auto`` downcasts the float32
tiny checkpoints), where the rest of the suite runs float32.

One engine per model runs a batch of every request kind (images, text only, per-request
``none`` and budget, decode eviction with parks and restores) with chunked prefill; every
request is replayed on the HF oracle in bfloat16, following the engine's tokens, and must
agree within bfloat16's noise (``hae_vllm.testing.oracle.DTYPE_NOISE``).  The same replay
with each eviction position shifted by one must not: the tolerance still catches a wrong
eviction set.
"""

import pytest

from hae_vllm.selfcheck import shift_positions
from hae_vllm.testing.oracle import HFOracle, MaskedReplay
from hae_vllm.testing.scenario import RequestSpec, ScenarioSpec, run_in_subprocess
from tests.engine_helpers import replay_agreements

pytestmark = pytest.mark.engine

DECODE = {"kv_eviction_decode_budget": 0.5, "kv_eviction_decode_start": 0, "kv_eviction_bin_capacity": 2, "kv_eviction_rescore_interval": 4,
          "kv_eviction_restore_margin": 0.5}
REQS = [
    RequestSpec(text="Describe the picture please.", images=[1], max_tokens=24),
    RequestSpec(text="Compare the two pictures.", images=[3, 4], max_tokens=24),
    RequestSpec(text="Only words here and no picture at all, tell me a story.", images=[], max_tokens=24),
    RequestSpec(text="Describe it without eviction.", images=[5], max_tokens=24, extra_args={"kv_eviction": "none"}),
    RequestSpec(text="Describe it with a small budget.", images=[6], max_tokens=24, extra_args={"kv_eviction_budget": 0.3}),
    RequestSpec(text="Tell me a long story about this picture.", images=[91], max_tokens=96, extra_args=DECODE),
]
EVICTING = [0, 1, 4, 5]


@pytest.fixture(scope="module", params=["llava", "qwen2vl"])
def record(request):
    return run_in_subprocess(ScenarioSpec(model=request.param, requests=REQS, dtype="bfloat16",
                                          eviction={"method": "hae", "budget": 0.5},
                                          # Chunks of 96 tokens: images straddle chunks and
                                          # decode steps share batches with prefill chunks.
                                          max_num_batched_tokens=96, max_num_seqs=4))


@pytest.fixture(scope="module")
def replay(record):
    return MaskedReplay(HFOracle(record["model_path"], "bfloat16"))


def test_bf16_batch_evicts_as_configured(record):
    assert record["dtype"] == "bfloat16"
    assert [i for i, r in enumerate(record["results"]) if r["eviction"]] == EVICTING
    kinds = {e["kind"] for e in record["results"][5]["decode_events"]}
    assert "park" in kinds, "the decode request should have parked blocks"
    assert record["results"][3]["decode_events"] == []
    assert record["free_blocks_after"] == record["free_blocks_before"], "blocks leaked"
    assert record["decode_rows_in_use"] == record["decode_states"], "decode bank rows leaked"


def test_bf16_replays_on_oracle_within_noise(record, replay):
    for i, a in enumerate(replay_agreements(replay, record, REQS)):
        assert a.ok, f"request {i}: {a.problem}"
        assert a.compared == a.num_tokens


def test_bf16_wrong_evictions_fail(record, replay):
    wrong = replay_agreements(replay, record, REQS, corrupt=shift_positions)
    assert [i for i, a in enumerate(wrong) if not a.ok] == EVICTING, "every evicting request should fail"
