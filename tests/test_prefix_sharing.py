"""Blocks no eviction can touch stay in the prefix cache (issue 19, first part): a system prompt
shared by evicting requests is served from the cache, and what it serves is what HF computes."""

import pytest

from hae_vllm.testing.scenario import RequestSpec, ScenarioSpec, run_in_subprocess
from tests.engine_helpers import assert_matches, oracle_compare

pytestmark = pytest.mark.engine

BLOCK = 32
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the user's questions about the pictures it is shown. ") * 2
REQS = [
    RequestSpec(prefix=SYSTEM, text="Describe the picture.", images=[61], max_tokens=8),
    # Same system prompt, another image: the system prompt's blocks come from the cache.
    RequestSpec(prefix=SYSTEM, text="What colour is the biggest shape?", images=[62], max_tokens=8),
    # Eviction off, the first request again: reads the first request's registered blocks (the
    # system prompt) and must compute its image blocks itself (those were compacted).
    RequestSpec(prefix=SYSTEM, text="Describe the picture.", images=[61], max_tokens=8,
                extra_args={"kv_eviction": "none"}),
    # A text-evicting method protects only its sinks: nothing of the prompt is registered.
    RequestSpec(prefix=SYSTEM, text="Describe the picture.", images=[63], max_tokens=8,
                extra_args={"kv_eviction": "snapkv", "kv_eviction_budget": 0.5}),
]


@pytest.fixture(scope="module")
def record():
    return run_in_subprocess(ScenarioSpec(model="llava", requests=REQS, eviction={"method": "hae", "budget": 0.5},
                                          block_size=BLOCK, enable_prefix_caching=True, sequential=True))


def _first_image_token(rec, i):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(rec["model_path"])
    image_token = getattr(cfg, "image_token_id", None) or cfg.image_token_index
    return rec["results"][i]["prompt_token_ids"].index(image_token)


def test_system_prompt_blocks_shared_between_evicting_requests(record):
    res = record["results"]
    untouched = _first_image_token(record, 0) // BLOCK * BLOCK
    assert untouched >= 2 * BLOCK, "the system prompt should fill whole blocks"
    assert res[0]["eviction"] is not None and res[1]["eviction"] is not None
    # The second evicting request is served the system prompt's blocks from the prefix cache.
    assert res[1]["num_cached_tokens"] >= untouched
    # Nothing before the first candidate was evicted or moved out of its block.
    for i in (0, 1):
        assert min(res[i]["eviction"]["evicted_positions"]) >= untouched
        assert min(res[i]["eviction"]["hole_blocks"]) * BLOCK >= untouched
    # The non-evicting twin of request 0 reads the system prompt, never request 0's compacted
    # image blocks (a block cache hit stops at the first block that was not registered).
    assert untouched <= res[2]["num_cached_tokens"] < untouched + BLOCK


def test_text_evicting_method_registers_nothing_it_may_rewrite(record):
    res = record["results"]
    assert res[3]["eviction"] is not None
    # Served from what the hae requests registered; its own sinks-only prefix is under a block.
    assert res[3]["num_cached_tokens"] <= _first_image_token(record, 0) // BLOCK * BLOCK


def test_every_request_matches_the_oracle(record, oracle_for):
    oracle = oracle_for(record["model_path"])
    for i in range(len(REQS)):
        r, ref = oracle_compare(oracle, record, REQS, i)
        assert_matches(r, ref, f"request {i}")
    assert record["free_blocks_after"] == record["free_blocks_before"]
