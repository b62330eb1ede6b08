"""Tensor parallelism: every rank holds a slice of the heads, so scores are gathered across the
group before selection; both ranks must evict the same tokens, and TP=2 must produce what
TP=1 produces (through vLLM's own mp executor, and Ray when installed)."""

import importlib.util

import pytest

from hae_vllm.testing.scenario import RequestSpec, ScenarioSpec, run_in_subprocess
from tests.engine_helpers import assert_matches, oracle_compare

pytestmark = pytest.mark.engine

REQS = [
    RequestSpec(text="Describe the picture please.", images=[81], max_tokens=8),
    RequestSpec(text="Compare the two pictures.", images=[82, 83], max_tokens=8),
]


def _run(tp, backend=None):
    return run_in_subprocess(ScenarioSpec(model="llava", requests=REQS, eviction="hae", tensor_parallel_size=tp,
                                          distributed_executor_backend=backend, kv_cache_space_gib=1,
                                          # One core per CPU worker (auto-binding wants a NUMA node each).
                                          env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"} if tp > 1 else {}))


@pytest.fixture(scope="module")
def tp1():
    return _run(1)


@pytest.mark.parametrize("backend", ["mp", pytest.param("ray", marks=pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="ray extra not installed"))])
def test_tp2_evicts_like_tp1(tp1, backend, oracle_for):
    tp2 = _run(2, backend)
    for a, b in zip(tp1["results"], tp2["results"]):
        assert a["eviction"]["evicted_positions"] == b["eviction"]["evicted_positions"]
        assert a["token_ids"] == b["token_ids"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-3
    for r in tp2["results"]:
        others = r["evictions_other_ranks"]
        assert len(others) == 1, "rank 1 should have compacted once"
        assert others[0]["evicted_positions"] == r["eviction"]["evicted_positions"]
        # The scheduler's no-pressure flag reached the worker processes: both ranks compacted
        # at the first decode step.
        assert others[0]["at_first_decode_step"] and r["eviction"]["at_first_decode_step"]
    assert tp2["free_blocks_after"] == tp2["free_blocks_before"]
    oracle = oracle_for(tp2["model_path"])
    for i in range(len(REQS)):
        res, ref = oracle_compare(oracle, tp2, REQS, i)
        assert_matches(res, ref, f"TP=2 request {i}")
