"""Eviction on an fp8 KV cache, end to end, against the HF oracle that rounds the same way.

One engine per (model, format): the tiny LLaVA with ``fp8_e5m2`` and the tiny Qwen2-VL with
``fp8`` (e4m3), float32 models, hae at budget 0.5, chunks of 96 tokens, one request with a
decode budget (parks and restores through the recycle bin).  Every request is replayed by
:class:`~hae_vllm.testing.fp8.RoundedKVOracle` with the engine's eviction events, following the
engine's tokens: each token must be the oracle's choice or a near-tie, log-probs within fp8's
rounding noise (``FP8_LOGPROB_NOISE``).  Two replays that must fail keep the check honest:
the eviction set shifted by one, and an oracle whose cache is not rounded (the engine really
reads fp8 keys and values).
"""

import pytest

from hae_vllm.selfcheck import check, shift_positions
from hae_vllm.testing.fp8 import RoundedKVOracle, fp8_tolerance
from hae_vllm.testing.oracle import HFOracle, MaskedReplay, compare_with_oracle, events_from_trace
from hae_vllm.testing.scenario import RequestSpec, ScenarioSpec, build_prompt, run_in_subprocess

pytestmark = pytest.mark.engine

# Scored every 8 steps (the default 32 would score the 48-token request twice: parks, but no
# restore to replay).
DECODE = {"kv_eviction_decode_budget": 0.5, "kv_eviction_decode_start": 0, "kv_eviction_bin_capacity": 2, "kv_eviction_rescore_interval": 4,
          "kv_eviction_restore_margin": 0.5, "kv_eviction_score_interval": 8}
REQS = [
    RequestSpec(text="Describe the picture please.", images=[1], max_tokens=16),
    RequestSpec(text="Compare the two pictures.", images=[3, 4], max_tokens=16),
    RequestSpec(text="Tell me a long story about this picture.", images=[91], max_tokens=48, extra_args=DECODE),
]


@pytest.fixture(scope="module", params=[("llava", "fp8_e5m2"), ("qwen2vl", "fp8")], ids=lambda p: "-".join(p))
def run(request):
    model, cache_dtype = request.param
    record = run_in_subprocess(ScenarioSpec(model=model, requests=REQS, eviction={"method": "hae", "budget": 0.5},
                                            engine_kwargs={"kv_cache_dtype": cache_dtype},
                                            max_num_batched_tokens=96))
    return cache_dtype, record


def agreements(oracle, record, corrupt=None, requests=(0, 1, 2)):
    """Per request (of ``requests``), the engine's ``Agreement`` with ``oracle`` replaying its
    eviction events (``corrupt`` rewrites them first) while following its tokens."""
    out = []
    replay = MaskedReplay(oracle)
    for i in requests:
        r = record["results"][i]
        p = build_prompt(record["model_kind"], REQS[i])
        imgs = p.get("multi_modal_data", {}).get("image", [])
        imgs = imgs if isinstance(imgs, list) else [imgs]
        events = events_from_trace(r["evictions"] + r["decode_events"])
        if corrupt is not None:
            events = corrupt(events)
        ref = replay.generate(p["prompt"], imgs, len(r["token_ids"]), events, follow=r["token_ids"])
        out.append(compare_with_oracle(r, ref, fp8_tolerance()))
    return out


@pytest.fixture(scope="module")
def rounded(run):
    cache_dtype, record = run
    return RoundedKVOracle(record["model_path"], cache_dtype)


def test_fp8_engine_evicts_parks_and_frees(run):
    cache_dtype, record = run
    r = record["results"]
    assert all(x["eviction"] and x["eviction"]["evicted_positions"] for x in r), "every request should evict"
    kinds = {e["kind"] for e in r[2]["decode_events"]}
    assert {"park", "restore"} <= kinds, f"the decode request should park and restore, got {kinds}"
    assert record["eviction_stats"]["freed_blocks"] > 0
    assert record["free_blocks_after"] == record["free_blocks_before"], "blocks leaked"
    assert record["decode_rows_in_use"] == record["decode_states"], "decode bank rows leaked"
    # One byte per element: 2 (K, V) x layers x KV heads x head dim x block size.
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(record["model_path"]).get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_block = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 32
    assert record["kv_bytes_per_block"] == per_block


def test_fp8_replays_on_rounded_oracle(run, rounded):
    """What ``python -m hae_vllm.selfcheck --kv-cache-dtype ...`` judges: every request within
    fp8's noise of the rounded oracle, every token compared, nothing wrong with the batch."""
    cache_dtype, record = run
    report = check(record, [str(i) for i in range(len(REQS))], REQS, oracle=rounded, kv_cache_dtype=cache_dtype)
    assert report.ok, "\n".join(report.lines())
    for row in report.rows:
        assert row.agreement.compared == row.agreement.num_tokens
        assert row.agreement.tolerance == fp8_tolerance()


def test_fp8_scoring_reads_keys_as_stored(run):
    """Prefill scoring at the forward (``HAE_VLLM_DEFER_SCORING_BYTES=0``: the chunk's keys from
    the layer's input, rounded as the cache stores them) decides exactly what scoring at
    selection decides (every key read back from the fp8 cache).  Without the rounding the
    evictions differ (tried).  On the LLaVA run only: one more engine."""
    cache_dtype, record = run
    if record["model_kind"] != "llava":
        pytest.skip("checked on the LLaVA run")
    now = run_in_subprocess(ScenarioSpec(model="llava", requests=REQS, eviction={"method": "hae", "budget": 0.5},
                                         engine_kwargs={"kv_cache_dtype": cache_dtype}, max_num_batched_tokens=96,
                                         env={"HAE_VLLM_DEFER_SCORING_BYTES": "0"}))
    for a, b in zip(now["results"], record["results"]):
        assert a["eviction"]["evicted_positions"] == b["eviction"]["evicted_positions"]
        assert [(e["kind"], e["positions"]) for e in a["decode_events"]] == \
            [(e["kind"], e["positions"]) for e in b["decode_events"]]
        assert a["token_ids"] == b["token_ids"]


def test_fp8_wrong_evictions_fail(run, rounded):
    _, record = run
    assert [i for i, a in enumerate(agreements(rounded, record, corrupt=shift_positions)) if a.ok] == []


def test_fp8_unrounded_oracle_fails(run):
    """The engine reads fp8 keys and values: an oracle with full-precision ones disagrees (the
    two short requests: enough to show it, at a third of the replay time)."""
    _, record = run
    assert [i for i, a in enumerate(agreements(HFOracle(record["model_path"]), record, requests=(0, 1))) if a.ok] == []
