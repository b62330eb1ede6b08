"""vLLM's TRITON_ATTN backend (the kernels vLLM runs on NVIDIA and AMD GPUs) in the engine,
executed by Triton's interpreter on CPU tensors (tests/triton_cpu_attn.py), against the HF
oracle: the GPU attention path with eviction's null-block holes and compacted slots.

The interpreter runs a kernel's programs one by one in numpy (a 300-token prefill takes seconds
per layer), so the cases are small: one request, a few tokens."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from engine_helpers import assert_matches, oracle_compare
from hae_vllm.testing import scenario
from hae_vllm.testing.scenario import RequestSpec, ScenarioSpec, run_in_subprocess

pytestmark = pytest.mark.engine

HARNESS = Path(__file__).with_name("triton_cpu_attn.py")
REQS = [RequestSpec("Describe the picture in a few words.", [11], max_tokens=4)]


@pytest.fixture
def on_triton(monkeypatch):
    """Scenario processes start through the harness (TRITON_INTERPRET differs from this
    process, so the suite's launcher runs them as plain subprocesses)."""
    launch = scenario.launcher()

    def through_harness(argv, **kwargs):
        assert argv[1:3] == ["-m", "hae_vllm.testing.scenario"]
        return launch([argv[0], str(HARNESS), "hae_vllm.testing.scenario", *argv[3:]], **kwargs)

    monkeypatch.setattr(scenario, "_launcher", through_harness)


def _run(tmp_path, **kw) -> tuple[dict, dict]:
    """The scenario's record and what ran in its engine process (tests/triton_cpu_attn.py)."""
    calls = tmp_path / "calls.json"
    spec = ScenarioSpec(model="llava", requests=REQS, env={"TRITON_INTERPRET": "1", "HAE_TEST_TRITON_CALLS": str(calls)},
                        engine_kwargs={"attention_backend": "TRITON_ATTN", "enforce_eager": True}, **kw)
    return run_in_subprocess(spec), json.loads(calls.read_text())


def test_prefill_eviction_through_triton_attn_matches_the_oracle(on_triton, oracle_for, llava_path, tmp_path):
    record, calls = _run(tmp_path, eviction={"method": "hae", "budget": 0.5})
    assert calls["impls"] == ["EvictionTritonAttentionBackendImpl"] and calls["forwards"] and calls["kv_writes"], calls
    res = record["results"][0]
    assert res["eviction"] and res["eviction"]["evicted_positions"], "the request evicts (test premise)"
    res, ref = oracle_compare(oracle_for(llava_path), record, REQS, 0)
    assert_matches(res, ref, "hae on TRITON_ATTN")
    # The same engine record against the oracle with other positions removed: it must not match
    # (the comparison can fail).
    kept = sorted(set(range(len(res["prompt_token_ids"]))) - set(record["results"][0]["eviction"]["evicted_positions"]))
    _, ref_wrong = oracle_compare(oracle_for(llava_path), record, REQS, 0, evicted=kept[-8:])
    assert ref_wrong.token_ids != res["token_ids"] or max(
        abs(a - b) for a, b in zip(ref_wrong.logprobs, res["logprobs"])) > 1e-3


ALL = pytest.mark.skipif(os.environ.get("HAE_VLLM_TEST_TRITON_ALL") != "1",
                         reason="the longer TRITON_ATTN cases: HAE_VLLM_TEST_TRITON_ALL=1")


@ALL
def test_eviction_off_equals_vanilla_on_triton_attn(on_triton, tmp_path):
    off, calls = _run(tmp_path, eviction="none")
    assert calls["impls"] == ["EvictionTritonAttentionBackendImpl"], calls
    vanilla, calls = _run(tmp_path, vanilla=True)
    assert calls["impls"] == ["TritonAttentionImpl"], calls
    a, b = off["results"][0], vanilla["results"][0]
    assert a["token_ids"] == b["token_ids"] and a["logprobs"] == b["logprobs"]
