"""Prefix caching and preemption with eviction on, checked against the HF oracle."""

import pytest

from hae_vllm.testing.scenario import RequestSpec, ScenarioSpec, run_in_subprocess
from tests.engine_helpers import assert_matches, oracle_compare

pytestmark = pytest.mark.engine

NONE = {"kv_eviction": "none"}

PREFIX_REQS = [
    # A registers its blocks (eviction off for it); B shares A's prefix with eviction on:
    # the shared blocks must be protected; C repeats A and must read uncorrupted blocks.
    RequestSpec(text="What is in the top left corner of this picture?", images=[21], max_tokens=8, extra_args=NONE),
    RequestSpec(text="What changed between the pictures?", images=[21, 23], max_tokens=8),
    RequestSpec(text="What is in the top left corner of this picture?", images=[21], max_tokens=8, extra_args=NONE),
    # D evicts and must not register its compacted blocks; E (eviction off, same prompt)
    # would read them if it did.
    RequestSpec(text="Describe everything you see.", images=[22], max_tokens=8),
    RequestSpec(text="Describe everything you see.", images=[22], max_tokens=8, extra_args=NONE),
]


@pytest.fixture(scope="module")
def prefix_record():
    return run_in_subprocess(
        ScenarioSpec(model="llava", requests=PREFIX_REQS, eviction="hae", enable_prefix_caching=True, sequential=True)
    )


def test_prefix_cache_shared_blocks_protected(prefix_record, oracle_for):
    res = prefix_record["results"]
    a, b, c = res[0], res[1], res[2]
    assert a["eviction"] is None and c["eviction"] is None and b["eviction"] is not None
    common = 0
    for x, y in zip(a["prompt_token_ids"], b["prompt_token_ids"]):
        if x != y:
            break
        common += 1
    protected = (common - 1) // 32 * 32  # at most this many tokens can be prefix-cache hits
    assert protected >= 256, "the scenario should share the first image's blocks"
    assert min(b["eviction"]["evicted_positions"]) >= protected
    assert (c["token_ids"], c["logprobs"]) == (a["token_ids"], a["logprobs"])
    oracle = oracle_for(prefix_record["model_path"])
    for i in range(5):
        r, ref = oracle_compare(oracle, prefix_record, PREFIX_REQS, i)
        assert_matches(r, ref, f"request {i}")


def test_evicting_requests_do_not_register_blocks(prefix_record, oracle_for):
    d, e = prefix_record["results"][3], prefix_record["results"][4]
    assert d["eviction"] is not None and e["eviction"] is None
    oracle = oracle_for(prefix_record["model_path"])
    r, ref = oracle_compare(oracle, prefix_record, PREFIX_REQS, 4, evicted=[])
    assert_matches(r, ref, "request after an evicting twin")
    assert prefix_record["free_blocks_after"] == prefix_record["free_blocks_before"]


PREEMPT_REQS = [RequestSpec(text=f"Tell me about picture number {i}.", images=[30 + i], max_tokens=96) for i in range(4)]


@pytest.fixture(scope="module")
def preempt_record():
    # 20 blocks of 32 tokens cannot hold four 270-token prompts growing by 96 tokens each:
    # the scheduler preempts and recomputes, and eviction is planned again on recompute.
    # Without prefix caching: a preempted request cannot resume from the cache it kept
    # (tests/test_engine_sessions.py covers that path).  vLLM's admission (no reserve): with
    # the default reserve (one of the 20 blocks) this scenario preempts nothing.
    return run_in_subprocess(
        ScenarioSpec(model="llava", requests=PREEMPT_REQS, eviction={"method": "hae", "admission_reserve": 0},
                     num_gpu_blocks_override=20, max_model_len=512,
                     max_num_seqs=4, logprobs=True, enable_prefix_caching=False)
    )


def test_preemption_replans_and_matches_oracle(preempt_record, oracle_for):
    res = preempt_record["results"]
    replanned = [r for r in res if len(r["evictions"]) > 1]
    assert replanned, "no request was preempted: the scenario does not exercise resume"
    # Under pressure evicted blocks are freed in the prefill step itself (the other path).
    assert preempt_record["eviction_stats"]["pressure_steps"] > 0
    assert any(not e["at_first_decode_step"] for r in res for e in r["evictions"])
    oracle = oracle_for(preempt_record["model_path"])
    from hae_vllm.testing.scenario import build_prompt

    for i, r in enumerate(res):
        p = build_prompt(preempt_record["model_kind"], PREEMPT_REQS[i])
        events = [(t["num_tokens"], t["evicted_positions"]) for t in r["evictions"]]
        ref = oracle.generate(p["prompt"], [p["multi_modal_data"]["image"]], len(r["token_ids"]), events=events)
        assert_matches(r, ref, f"request {i} ({len(events)} eviction events)")
    assert preempt_record["free_blocks_after"] == preempt_record["free_blocks_before"]
