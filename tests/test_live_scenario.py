"""LiveScenario (the benchmarks' interleaved engines) records what a one-shot scenario does."""

from hae_vllm.testing.scenario import LiveScenario, RequestSpec, ScenarioSpec, run_in_subprocess

REQS = [RequestSpec(text=f"Describe picture {i}.", images=[40 + i], max_tokens=6) for i in range(3)]
COMMON = dict(model="llava", eviction={"method": "hae", "budget": 0.5}, logprobs=False, log_stats=True)


def test_live_rounds_match_one_shot_runs():
    with LiveScenario(ScenarioSpec(requests=REQS, warmup_requests=1, **COMMON)) as live:
        full = live.round(1000)
        part = live.round(2000, subset=[2])
    # The same requests (images shifted by the offset) in a fresh one-shot engine.
    shifted = [RequestSpec(r.text, [i + 1000 for i in r.images], r.image_size, r.max_tokens) for r in REQS]
    ref = run_in_subprocess(ScenarioSpec(requests=shifted, **COMMON))

    assert len(full["results"]) == 3 and len(part["results"]) == 1
    for got, want in zip(full["results"], ref["results"]):
        assert got["token_ids"] == want["token_ids"]
        assert got["eviction"] is not None
        assert got["eviction"]["evicted_positions"] == want["eviction"]["evicted_positions"]
        assert got["ttft_s"] > 0
    # Each round reports only its own requests' trace records and readings.
    rid = part["results"][0]["request_id"]
    assert part["trace"] and all(t["request_id"] in (rid,) or t["request_id"].rsplit("-", 1)[0] == rid
                                 for t in part["trace"])
    assert part["results"][0]["eviction"] is not None
    for rec in (full, part):
        assert rec["free_blocks_after"] == rec["free_blocks_before"], "blocks leaked"
        assert rec["engine_busy_s"] > 0 and rec["step_profile"]["prefill_tokens"] > 0
    assert full["step_profile"]["prefill_tokens"] > part["step_profile"]["prefill_tokens"]
