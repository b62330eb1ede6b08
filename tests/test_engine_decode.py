"""Dynamic Decoding Eviction in the engine: parking into the recycle bin and restoring, replayed
event by event on the HF oracle (masked cache), with exact block accounting."""

import pytest

from hae_vllm.testing.oracle import MaskedReplay, events_from_trace
from hae_vllm.testing.scenario import RequestSpec, ScenarioSpec, blocks_freed_at_end, build_prompt, run_in_subprocess
from tests.engine_helpers import assert_matches, assert_replays_on_oracle

pytestmark = pytest.mark.engine

EVICTION = {"method": "hae", "budget": 0.5, "decode_budget": 0.5, "decode_start": 0, "bin_capacity": 2,
            "rescore_interval": 4, "restore_margin": 0.5}
REQS = [
    RequestSpec(text="Tell me a long story about this picture.", images=[91], max_tokens=160),
    RequestSpec(text="A long story, from text only.", images=[], max_tokens=120),
    RequestSpec(text="Describe both pictures at length.", images=[92, 93], max_tokens=96,
                extra_args={"kv_eviction_decode_budget_tokens": 200}),
    RequestSpec(text="No decode eviction for this one.", images=[94], max_tokens=64,
                extra_args={"kv_eviction": "none"}),
    # The engine's default decode_start (1.0): a short answer never parks; a long one parks once
    # it is decode_start x what its prefill left live.
    RequestSpec(text="A short answer.", images=[95], max_tokens=24, extra_args={"kv_eviction_decode_start": 1.0}),
    RequestSpec(text="Tell me a long story about this picture.", images=[96], max_tokens=200,
                extra_args={"kv_eviction_decode_start": 0.5}),
]


@pytest.fixture(scope="module")
def record():
    return run_in_subprocess(ScenarioSpec(model="llava", requests=REQS, eviction=EVICTION))


def test_parks_and_restores_happen(record):
    st = record["eviction_stats"]
    assert st["parked_blocks"] > 0 and st["restored_blocks"] > 0
    kinds = [e["kind"] for r in record["results"] for e in r["decode_events"]]
    assert "park" in kinds and "restore" in kinds
    assert record["results"][3]["decode_events"] == [] and record["results"][3]["eviction"] is None
    assert record["free_blocks_after"] == record["free_blocks_before"], "blocks leaked"
    assert record["decode_rows_in_use"] is not None, "the worker's runtime was not read"
    assert record["decode_rows_in_use"] == record["decode_states"], "decode bank rows leaked"


def test_the_stage_starts_once_the_answer_is_a_share_of_the_cache(record):
    short, long_ = record["results"][4], record["results"][5]
    assert short["eviction"] is not None and short["decode_events"] == []
    parks = [e for e in long_["decode_events"] if e["kind"] == "park"]
    assert parks, "the long answer parks"
    prompt = len(long_["prompt_token_ids"])
    live = prompt - len(long_["eviction"]["evicted_positions"])
    assert min(e["num_tokens"] for e in parks) - prompt >= 0.5 * live


def test_blocks_freed_at_end_follow_the_scheduler(record):
    """The trace's block counts (what throughput.py's r is computed from) against the
    scheduler's own counters: prefill holes, plus parked, minus restored blocks."""
    st = record["eviction_stats"]
    freed = blocks_freed_at_end(record["trace"])
    prefill = sum(len(r["eviction"]["hole_blocks"]) for r in record["results"] if r["eviction"])
    assert sum(freed.values()) == prefill + st["parked_blocks"] - st["restored_blocks"]
    assert sum(freed.values()) > prefill
    for r in record["results"]:
        total = len(r["prompt_token_ids"]) + len(r["token_ids"])
        assert 0 <= freed.get(r["request_id"], 0) <= -(-total // 32)


def test_budget_is_enforced(record):
    """After each park, the live set is within one block of the budget."""
    for i, r in enumerate(record["results"][:3]):
        events = events_from_trace(r["evictions"] + r["decode_events"])
        live = set()
        for n, kind, pos in events:
            if kind == "prefill":
                live = set(range(n)) - set(pos)
            elif kind == "park":
                live = (live | set(range(max(live, default=-1) + 1, n))) - set(pos)
                limit = 200 if i == 2 else -(-n // 2)
                assert len(live) <= limit + 32, (i, n, len(live))
            else:
                live |= set(pos)


def test_decode_events_replay_on_hf_oracle(record, oracle_for):
    assert_replays_on_oracle(MaskedReplay(oracle_for(record["model_path"])), record, REQS)


STORY = "Once upon a time " + " ".join(f"there was a little town number {i} by the sea." for i in range(12))
SHARED = [
    # A registers its blocks; B hits them in the prefix cache and evicts while decoding: the
    # shared blocks must never be parked or rewritten; C repeats A and must read them intact.
    RequestSpec(text=STORY, images=[], max_tokens=16, extra_args={"kv_eviction": "none"}),
    RequestSpec(text=STORY, images=[], max_tokens=120, extra_args={"kv_eviction_decode_budget_tokens": 96}),
    RequestSpec(text=STORY, images=[], max_tokens=16, extra_args={"kv_eviction": "none"}),
]


@pytest.fixture(scope="module")
def shared_record():
    return run_in_subprocess(ScenarioSpec(model="llava", requests=SHARED, eviction=EVICTION,
                                          enable_prefix_caching=True, sequential=True))


def test_decode_eviction_never_touches_prefix_cache_hits(shared_record, oracle_for):
    a, b, c = shared_record["results"]
    assert any(e["kind"] == "park" for e in b["decode_events"]), "B should have parked blocks"
    assert (c["token_ids"], c["logprobs"]) == (a["token_ids"], a["logprobs"])
    L = len(b["prompt_token_ids"])
    hit = (L - 1) // 32 * 32
    parked = {p for e in b["decode_events"] if e["kind"] == "park" for p in e["positions"]}
    assert hit >= 64 and not (parked & set(range(hit))), "a shared prefix-cache token was parked"
    replay = MaskedReplay(oracle_for(shared_record["model_path"]))
    p = build_prompt("llava", SHARED[1])
    ref = replay.generate(p["prompt"], [], len(b["token_ids"]), events_from_trace(b["evictions"] + b["decode_events"]))
    assert_matches(b, ref, "decode-evicting request on shared prefix")
    assert shared_record["free_blocks_after"] == shared_record["free_blocks_before"]
