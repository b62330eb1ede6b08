"""Shared checks for tests that run vLLM engines (each scenario runs in a subprocess)."""

from __future__ import annotations

from hae_vllm.testing.scenario import build_prompt

LOGPROB_ATOL = 1e-3


def oracle_compare(oracle, record, reqs, idx, evicted=None):
    """Run the HF oracle for request ``idx`` with ``evicted`` positions (default: the engine's
    trace) removed after prefill; return (vllm_result, oracle_result)."""
    res = record["results"][idx]
    if evicted is None:
        evicted = res["eviction"]["evicted_positions"] if res["eviction"] else []
    p = build_prompt(record["model_kind"], reqs[idx])
    imgs = p.get("multi_modal_data", {}).get("image", [])
    imgs = imgs if isinstance(imgs, list) else [imgs]
    ref = oracle.generate(p["prompt"], imgs, len(res["token_ids"]), evicted)
    return res, ref


def assert_matches(res, ref, what=""):
    assert ref.prompt_token_ids == res["prompt_token_ids"], f"{what}: prompt tokens differ"
    assert ref.token_ids == res["token_ids"], f"{what}: tokens differ\nvllm={res['token_ids']}\nhf  ={ref.token_ids}"
    diff = max(abs(a - b) for a, b in zip(ref.logprobs, res["logprobs"]))
    assert diff <= LOGPROB_ATOL, f"{what}: logprobs differ by {diff}"


def max_logprob_diff(res, ref):
    return max(abs(a - b) for a, b in zip(ref.logprobs, res["logprobs"]))


def assert_replays_on_oracle(replay, record, reqs):
    """Every request of ``record`` equals the HF oracle (a ``MaskedReplay``) replaying its
    eviction events (prefill eviction, decode parks and restores) in order."""
    from hae_vllm.testing.oracle import events_from_trace

    for i, r in enumerate(record["results"]):
        p = build_prompt(record["model_kind"], reqs[i])
        imgs = p.get("multi_modal_data", {}).get("image", [])
        imgs = imgs if isinstance(imgs, list) else [imgs]
        events = events_from_trace(r["evictions"] + r["decode_events"])
        ref = replay.generate(p["prompt"], imgs, len(r["token_ids"]), events)
        assert_matches(r, ref, f"request {i} ({len(events)} events)")



def replay_agreements(replay, record, reqs, corrupt=None):
    """Per request, the ``Agreement`` of the engine with the oracle (``replay``, a
    ``MaskedReplay``) replaying its eviction events while following the engine's tokens, at
    the tolerance of the dtype the engine ran in: the selfcheck's own replay.  ``corrupt``
    rewrites each request's events first."""
    from hae_vllm.selfcheck import check

    report = check(record, [str(i) for i in range(len(reqs))], reqs, oracle=replay.o, corrupt=corrupt)
    return [row.agreement for row in report.rows]
