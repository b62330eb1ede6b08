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


def _ray_skip_reason() -> str | None:
    """Why the Ray variant cannot run here, or None.  vLLM's Ray executor needs a platform with
    a Ray device key (CUDA, ROCm, XPU, TPU): on the CPU platform it refuses to start ("current
    platform cpu does not support ray"), eviction or not."""
    if importlib.util.find_spec("ray") is None:
        return "ray extra not installed"
    from vllm.platforms import current_platform

    if not current_platform.ray_device_key:
        return f"vLLM's {current_platform.device_name} platform does not support Ray"
    return None


_RAY_SKIP = _ray_skip_reason()


@pytest.mark.parametrize("backend", ["mp", pytest.param("ray", marks=pytest.mark.skipif(
    _RAY_SKIP is not None, reason=str(_RAY_SKIP)))])
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


DECODE_EVICTION = {"method": "hae", "budget": 0.5, "decode_budget": 0.5, "decode_start": 0, "bin_capacity": 2,
                   "rescore_interval": 4, "restore_margin": 0.5}
DECODE_REQS = [RequestSpec(text="Tell me a long story about this picture.", images=[95], max_tokens=128)]


def test_tp2_decode_eviction_same_on_both_ranks(oracle_for):
    """Decode scoring gathers every rank's heads before deciding: both ranks park and restore
    the same tokens, and the result replays on the HF oracle."""
    from hae_vllm.testing.oracle import MaskedReplay, events_from_trace
    from hae_vllm.testing.scenario import build_prompt

    rec = run_in_subprocess(ScenarioSpec(model="llava", requests=DECODE_REQS, eviction=DECODE_EVICTION,
                                         tensor_parallel_size=2, distributed_executor_backend="mp",
                                         kv_cache_space_gib=1, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}))
    r = rec["results"][0]
    rank1 = [{k: v for k, v in t.items() if k != "tp_rank"} for t in rec["trace"]
             if t.get("tp_rank") == 1 and t.get("kind") in ("park", "restore")]
    rank0 = [{k: v for k, v in t.items() if k != "tp_rank"} for t in r["decode_events"]]
    kinds = [e["kind"] for e in rank0]
    assert "park" in kinds and "restore" in kinds, kinds
    assert rank1 == rank0
    assert rec["free_blocks_after"] == rec["free_blocks_before"], "blocks leaked"
    p = build_prompt(rec["model_kind"], DECODE_REQS[0])
    ref = MaskedReplay(oracle_for(rec["model_path"])).generate(
        p["prompt"], [p["multi_modal_data"]["image"]], len(r["token_ids"]), events_from_trace(r["evictions"] + r["decode_events"]))
    assert_matches(r, ref, "TP=2 decode eviction")


def test_tp2_h2o_column_sums_like_tp1(oracle_for):
    """H2O scores every prompt token: each rank sums its heads' attention columns on the host
    (two flash-attention passes, no queries x keys buffer) and the sums are gathered before
    selection.  TP=2 evicts what TP=1 does and matches the oracle."""
    def run(tp):
        return run_in_subprocess(ScenarioSpec(model="llava", requests=REQS, eviction={"method": "h2o", "budget": 0.5},
                                              tensor_parallel_size=tp, kv_cache_space_gib=1,
                                              env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"} if tp > 1 else {}))

    one, two = run(1), run(2)
    for a, b in zip(one["results"], two["results"]):
        assert a["eviction"]["evicted_positions"] == b["eviction"]["evicted_positions"]
        assert a["token_ids"] == b["token_ids"]
        assert b["evictions_other_ranks"][0]["evicted_positions"] == b["eviction"]["evicted_positions"]
    oracle = oracle_for(two["model_path"])
    for i in range(len(REQS)):
        res, ref = oracle_compare(oracle, two, REQS, i)
        assert_matches(res, ref, f"H2O TP=2 request {i}")
