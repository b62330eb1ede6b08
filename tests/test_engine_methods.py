"""Every method runs in the same engine, frees blocks through the same mechanism, and matches
the HF oracle (per-request ``kv_eviction`` selects the method)."""

import pytest

from hae_vllm.policies.registry import POLICIES
from hae_vllm.testing.scenario import RequestSpec, ScenarioSpec, run_in_subprocess
from tests.engine_helpers import assert_matches, oracle_compare

pytestmark = pytest.mark.engine

METHODS = sorted(POLICIES)
REQS = [
    # Same prompt and image for every method: the evicted sets differ only by method.
    RequestSpec(text="Describe the picture, please.", images=[60], max_tokens=8,
                extra_args={"kv_eviction": m, "kv_eviction_budget": 0.5, "kv_eviction_evict_text": True})
    for m in METHODS
]


@pytest.fixture(scope="module")
def record():
    return run_in_subprocess(ScenarioSpec(model="llava", requests=REQS, eviction="hae"))


def test_every_method_evicts_the_same_amount(record):
    counts = {}
    for m, res in zip(METHODS, record["results"]):
        assert res["eviction"] is not None, m
        assert res["eviction"]["method"] == m
        counts[m] = len(res["eviction"]["evicted_positions"])
    assert len(set(counts.values())) == 1, counts
    assert record["eviction_stats"]["freed_blocks"] == sum(len(r["eviction"]["hole_blocks"]) for r in record["results"])
    assert record["free_blocks_after"] == record["free_blocks_before"]


def test_methods_choose_different_tokens(record):
    sets = {m: tuple(r["eviction"]["evicted_positions"]) for m, r in zip(METHODS, record["results"])}
    assert len(set(sets.values())) == len(METHODS), "two methods evicted exactly the same tokens"


def test_every_method_matches_hf_oracle(record, oracle_for):
    oracle = oracle_for(record["model_path"])
    for i, m in enumerate(METHODS):
        res, ref = oracle_compare(oracle, record, REQS, i)
        assert_matches(res, ref, m)


def test_madakv_reports_its_deviation(record):
    res = record["results"][METHODS.index("madakv")]
    share = res["eviction"]["diagnostics"]["madakv_exact_retained"]
    assert 0.0 < share <= 1.0
