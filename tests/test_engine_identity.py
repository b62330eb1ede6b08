"""Eviction off is vanilla vLLM, bit for bit; a 100% budget evicts nothing and changes nothing."""

import pytest

from hae_vllm.config import EvictionConfig
from hae_vllm.testing.scenario import RequestSpec, ScenarioSpec, run_in_subprocess

pytestmark = pytest.mark.engine

REQS = [
    RequestSpec(text="Describe the picture please.", images=[11], max_tokens=12),
    RequestSpec(text="Compare the two pictures.", images=[12, 13], max_tokens=12),
    RequestSpec(text="Only words, tell me a story about a cat.", images=[], max_tokens=12),
]


@pytest.fixture(scope="module")
def records():
    base = dict(model="llava", requests=REQS, block_size=32)
    return {
        "vanilla": run_in_subprocess(ScenarioSpec(vanilla=True, **base)),
        "none": run_in_subprocess(ScenarioSpec(eviction="none", **base)),
        "hae_full_budget": run_in_subprocess(ScenarioSpec(eviction={"method": "hae", "budget": 1.0}, **base)),
        "hae": run_in_subprocess(ScenarioSpec(eviction={"method": "hae", "budget": 0.5}, **base)),
    }


def _outputs(rec):
    return [(r["token_ids"], r["logprobs"]) for r in rec["results"]]


def test_vanilla_really_is_vanilla(records):
    assert records["vanilla"]["scheduler_cls"] == "Scheduler"
    assert records["none"]["scheduler_cls"] == "Scheduler"
    assert records["hae"]["scheduler_cls"] == "EvictionScheduler"
    # Admission: vLLM's watermark (0) without eviction; the eviction scheduler sets it to its
    # growth-aware reserve before every schedule() (hae_vllm.engine.admission).
    assert records["vanilla"]["admission_watermark_blocks"] == records["none"]["admission_watermark_blocks"] == 0
    assert EvictionConfig().admission_reserve is None
    assert records["hae"]["admission_watermark_blocks"] == records["hae"]["eviction_stats"]["admission_reserve_blocks"]


@pytest.mark.parametrize("name", ["none", "hae_full_budget"])
def test_identical_to_vanilla(records, name):
    assert _outputs(records[name]) == _outputs(records["vanilla"])


def test_full_budget_evicts_nothing(records):
    assert records["hae_full_budget"]["eviction_stats"]["freed_blocks"] == 0
    assert records["hae_full_budget"]["trace"] == [] or all(
        not t["evicted_positions"] for t in records["hae_full_budget"]["trace"]
    )


def test_eviction_changes_image_requests_only(records):
    van, hae = records["vanilla"]["results"], records["hae"]["results"]
    assert hae[0]["eviction"] and hae[1]["eviction"] and hae[2]["eviction"] is None
    assert (hae[2]["token_ids"], hae[2]["logprobs"]) == (van[2]["token_ids"], van[2]["logprobs"])
    assert (hae[0]["token_ids"], hae[0]["logprobs"]) != (van[0]["token_ids"], van[0]["logprobs"])
    assert records["hae"]["peak_blocks_in_use"] <= records["vanilla"]["peak_blocks_in_use"]
