"""vLLM's TRITON_ATTN backend (the kernels vLLM runs on NVIDIA and AMD GPUs) in the engine,
executed by Triton's interpreter on CPU tensors (tests/triton_cpu_attn.py), against the HF
oracle: the GPU attention path with eviction's null-block holes, compacted slots, parked and
restored blocks and session hits in the block tables.

The interpreter runs a kernel's programs one by one in numpy (a 300-token prefill takes seconds
per layer, a decode step about half a second per request), so the cases are small.  Preemption
is not among them: the smallest workload found that preempts and resumes a request from its own
session (four requests decoding 160 tokens in 24 blocks; tests/test_engine_sessions.py runs it
on CPU_ATTN) took more than 20 minutes under the interpreter.  The default
suite runs one engine that covers the most GPU code at once: chunked prefill, hae's own Triton
kernels (scoring, compaction, decode swaps) selected as on a GPU, and a decode request that parks
and restores.  The rest runs with ``HAE_VLLM_TEST_TRITON_ALL=1``::

    HAE_VLLM_TEST_TRITON_ALL=1 python -m pytest -q tests/test_triton_backend.py

Reduced precision is float16: the interpreter does not compute in bfloat16 (it stores bfloat16
as its bit pattern and ``tl.dot`` multiplies the patterns; Triton's debugging guide says so and
triton-lang/triton#11584 shows it), so vLLM's own TritonAttentionImpl gives garbage there with
or without eviction.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from hae_lab.conversation import ConversationSpec, oracle_check
from hae_lab.conversation import run_in_subprocess as run_conversation
from hae_vllm.selfcheck import shift_positions
from hae_vllm.testing import scenario
from hae_vllm.testing.oracle import HFOracle, MaskedReplay, Tolerance
from hae_vllm.testing.scenario import RequestSpec, ScenarioSpec, run_in_subprocess
from tests.engine_helpers import assert_matches, assert_replays_on_oracle, oracle_compare, replay_agreements

pytestmark = pytest.mark.engine

HARNESS = Path(__file__).with_name("triton_cpu_attn.py")
ENGINE = {"attention_backend": "TRITON_ATTN", "enforce_eager": True}
RAN = ["TRITON_ATTN+eviction"]
STORY = "Once upon a time " + " ".join(f"there was a little town number {i} by the sea." for i in range(4))

ALL = pytest.mark.skipif(os.environ.get("HAE_VLLM_TEST_TRITON_ALL") != "1",
                         reason="the longer TRITON_ATTN cases: HAE_VLLM_TEST_TRITON_ALL=1")


@pytest.fixture
def on_triton(monkeypatch):
    """Engine processes (scenarios, conversations, the self-check) start through the harness
    (TRITON_INTERPRET differs from this process, so the suite's launcher runs them as plain
    subprocesses)."""
    launch = scenario.launcher()

    def through_harness(argv, **kwargs):
        assert argv[1] == "-m", argv
        return launch([argv[0], str(HARNESS), *argv[2:]], **kwargs)

    monkeypatch.setattr(scenario, "_launcher", through_harness)


def _env(tmp_path, **more) -> dict:
    return {"TRITON_INTERPRET": "1", "HAE_TEST_TRITON_CALLS": str(tmp_path / "calls.json"), **more}


def _calls(tmp_path) -> dict:
    """What ran in the engine process (tests/triton_cpu_attn.py)."""
    return json.loads((tmp_path / "calls.json").read_text())


def _run(tmp_path, requests, env=None, **kw) -> tuple[dict, dict]:
    spec = ScenarioSpec(model="llava", requests=requests, env=_env(tmp_path, **(env or {})), engine_kwargs=ENGINE, **kw)
    return run_in_subprocess(spec), _calls(tmp_path)


def _assert_ran_triton(record, calls, impl="EvictionTritonAttentionBackendImpl"):
    assert calls["impls"] == [impl] and calls["forwards"] and calls["kv_writes"], calls
    assert record["attention_backends"] == (RAN if impl.startswith("Eviction") else ["TRITON_ATTN"])


# ---------------------------------------------------------------- default suite: one engine

GPU_PATH_EVICTION = {"method": "hae", "budget": 0.5, "bin_capacity": 2, "rescore_interval": 2,
                     "restore_margin": 0.5, "score_interval": 1, "decode_recent_tokens": 4}
GPU_PATH = [
    RequestSpec("Describe the picture in a few words.", [11], max_tokens=4),
    RequestSpec(STORY, [], max_tokens=16, extra_args={"kv_eviction_decode_budget_tokens": 48}),
]


@pytest.fixture(scope="module")
def gpu_path(tmp_path_factory):
    """Chunks of 64 tokens (the image straddles five), hae's Triton kernels, a decode budget."""
    tmp = tmp_path_factory.mktemp("gpu_path")
    mp = pytest.MonkeyPatch()
    launch = scenario.launcher()
    mp.setattr(scenario, "_launcher", lambda argv, **kw: launch([argv[0], str(HARNESS), *argv[2:]], **kw))
    try:
        yield _run(tmp, GPU_PATH, env={"HAE_VLLM_KERNELS": "triton"}, eviction=GPU_PATH_EVICTION,
                   max_num_batched_tokens=64)
    finally:
        mp.undo()


def test_gpu_path_runs_vllms_triton_kernels_and_hae_kernels(gpu_path):
    record, calls = gpu_path
    _assert_ran_triton(record, calls)
    evicting, decoding = record["results"]
    assert len(evicting["prompt_token_ids"]) > 3 * 64, "the prompt is prefilled in several chunks (test premise)"
    assert evicting["eviction"]["evicted_positions"] and evicting["eviction"]["kernels"] == "triton"
    kinds = [e["kind"] for e in decoding["decode_events"]]
    assert "park" in kinds and "restore" in kinds, kinds
    assert record["free_blocks_after"] == record["free_blocks_before"], "blocks leaked"
    assert record["decode_rows_in_use"] == record["decode_states"], "decode bank rows leaked"


def test_gpu_path_matches_the_oracle(gpu_path, oracle_for):
    """Chunked prefill eviction, then every park and restore, replayed on the HF oracle:
    exact tokens, log-probs within 1e-3 (float32)."""
    record, _ = gpu_path
    assert_replays_on_oracle(MaskedReplay(oracle_for(record["model_path"])), record, GPU_PATH)


# ---------------------------------------------------------------- HAE_VLLM_TEST_TRITON_ALL=1

ONE_SHOT = [
    RequestSpec("Describe the picture in a few words.", [11], max_tokens=4),
    # An attention-scored baseline through the same kernels.
    RequestSpec("Describe the picture in a few words.", [12], max_tokens=4, extra_args={"kv_eviction": "snapkv"}),
]


@ALL
def test_one_shot_prefill_eviction_matches_the_oracle(on_triton, oracle_for, llava_path, tmp_path):
    record, calls = _run(tmp_path, ONE_SHOT, eviction={"method": "hae", "budget": 0.5})
    _assert_ran_triton(record, calls)
    oracle = oracle_for(llava_path)
    for i, method in enumerate(("hae", "snapkv")):
        res = record["results"][i]
        assert res["eviction"] and res["eviction"]["evicted_positions"], f"{method} evicts (test premise)"
        res, ref = oracle_compare(oracle, record, ONE_SHOT, i)
        assert_matches(res, ref, f"{method} on TRITON_ATTN")
        # The same engine record against the oracle with other positions removed: it must not
        # match (the comparison can fail).
        kept = sorted(set(range(len(res["prompt_token_ids"]))) - set(res["eviction"]["evicted_positions"]))
        _, wrong = oracle_compare(oracle, record, ONE_SHOT, i, evicted=kept[-8:])
        assert wrong.token_ids != res["token_ids"] or max(
            abs(a - b) for a, b in zip(wrong.logprobs, res["logprobs"])) > 1e-3


@ALL
def test_eviction_off_equals_vanilla_on_triton_attn(on_triton, tmp_path):
    off, calls = _run(tmp_path, ONE_SHOT[:1], eviction="none")
    _assert_ran_triton(off, calls)
    vanilla, calls = _run(tmp_path, ONE_SHOT[:1], vanilla=True)
    _assert_ran_triton(vanilla, calls, impl="TritonAttentionImpl")
    a, b = off["results"][0], vanilla["results"][0]
    assert a["token_ids"] == b["token_ids"] and a["logprobs"] == b["logprobs"]


FP16 = [
    RequestSpec("Describe the picture in a few words.", [13], max_tokens=6),
    RequestSpec(STORY, [], max_tokens=16, extra_args={"kv_eviction_decode_budget_tokens": 48}),
]


@ALL
def test_float16_replays_on_the_oracle_within_noise(on_triton, tmp_path):
    """Reduced precision: float16 engine against the float16 oracle following the engine's
    tokens (the self-check's judgement); the same replay with shifted positions must fail."""
    record, calls = _run(tmp_path, FP16, eviction=GPU_PATH_EVICTION, dtype="float16")
    _assert_ran_triton(record, calls)
    assert record["dtype"] == "float16"
    assert [e["kind"] for e in record["results"][1]["decode_events"]], "the decode request parks (test premise)"
    replay = MaskedReplay(HFOracle(record["model_path"], "float16"))
    for i, a in enumerate(replay_agreements(replay, record, FP16)):
        assert a.ok and a.compared == a.num_tokens, f"request {i}: {a.problem}"
    wrong = replay_agreements(replay, record, FP16, corrupt=shift_positions)
    assert not any(a.ok for a in wrong), "shifted evictions should fail"


def _sessions(r):
    return [t for t in r["trace"] if t["kind"] == "session"]


@ALL
def test_follow_up_turn_served_from_a_session_with_holes(on_triton, oracle_for, llava_path, tmp_path):
    record = run_conversation(ConversationSpec(method="hae", budget=0.4, conversations=1, turns=2, max_tokens=4,
                                               env=_env(tmp_path), engine_kwargs=ENGINE))
    assert _calls(tmp_path)["impls"] == ["EvictionTritonAttentionBackendImpl"]
    (t1,), (t2,) = record["turns"]
    (sess,) = _sessions(t2)
    assert sess["source"] == t1["engine_request_id"] and t2["cached_tokens"] == sess["hit_tokens"] > 0
    # The same block ids, the null block where the first turn's eviction left holes.
    k = sess["hit_tokens"] // 32
    assert t2["blocks_at_start"][:k] == t1["blocks_at_free"][:k]
    (plan,) = [x for x in t1["trace"] if x["kind"] == "prefill"]
    assert [i for i in range(k) if t2["blocks_at_start"][i] == 0] == plan["hole_blocks"] != []
    bad = [c for c in oracle_check(record, oracle_for(llava_path), Tolerance.for_dtype("float32")) if not c["ok"]]
    assert not bad, bad
    assert record["free_blocks_after"] == record["free_blocks_before"]


SELFCHECK_LINE = (r"selfcheck=pass requests=6 token_match=6/6 max_logprob_diff=\S+ "
                  r"backends=CPU_ATTN:pass,TRITON_ATTN:pass")


@ALL
def test_selfcheck_all_backends_runs_triton_attn(on_triton, llava_path, tmp_path):
    """Under the harness this machine can run CPU_ATTN and TRITON_ATTN: ``--all-backends``
    checks both and says so in its last line."""
    proc = scenario.launcher()([sys.executable, "-m", "hae_vllm.selfcheck", "--model", llava_path, "--dtype", "float32",
                                "--num-requests", "3", "--max-tokens", "4", "--all-backends"],
                               env={**os.environ, **_env(tmp_path)}, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert re.fullmatch(SELFCHECK_LINE, proc.stdout.strip().splitlines()[-1]), proc.stdout[-3000:]
    assert "attention backend: TRITON_ATTN+eviction" in proc.stdout
    assert "attention backend: CPU_ATTN+eviction" in proc.stdout
