"""LiveScenario (the benchmarks' interleaved engines) records what a one-shot scenario does."""

from hae_vllm.testing.scenario import LiveScenario, RequestSpec, ScenarioSpec, run_in_subprocess, take_turns

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


def test_engines_taking_turns_generate_what_whole_rounds_do():
    """Two engines stepping in turns of 2 steps (the long-generation benchmark's timing) give
    each request the tokens of an uninterrupted round, and time every step of their own."""
    reqs = [RequestSpec(text="Describe picture 7.", images=[7], max_tokens=9)]
    spec = dict(model="llava", requests=reqs, logprobs=False, log_stats=True)
    with LiveScenario(ScenarioSpec(eviction="none", **spec)) as a, \
            LiveScenario(ScenarioSpec(eviction={"method": "hae", "budget": 0.5, "decode_budget": 0.5, "decode_start": 0}, **spec)) as b:
        whole = {"a": a.round(500), "b": b.round(500)}
        turns = take_turns({"a": a, "b": b}, ["b", "a"], 500, [0], 2)
    for name in ("a", "b"):
        got, want = turns[name], whole[name]
        assert got["results"][0]["token_ids"] == want["results"][0]["token_ids"]
        assert len(got["results"][0]["token_ids"]) == 9
        # A step per token at batch 1 (the prompt in one step), each timed; the pauses between
        # turns are in no step's time.
        assert len(got["step_wall_s"]) == len(got["step_cpu_s"]) == 9
        assert got["engine_busy_s"] == sum(got["step_wall_s"]) > 0
        assert got["free_blocks_after"] == got["free_blocks_before"]
    assert turns["b"]["results"][0]["evictions"], "the evicting engine evicted"
