"""Each patch takes effect in the process where it matters (DESIGN §2: EngineCore and worker
are separate processes; a patch applied in the API process only does nothing)."""

import pytest

from hae_vllm.testing.scenario import RequestSpec, ScenarioSpec, run_in_subprocess

pytestmark = pytest.mark.engine

REQS = [RequestSpec(text="Describe the picture please.", images=[41], max_tokens=6),
        RequestSpec(text="Compare the pictures.", images=[42, 43], max_tokens=6)]


@pytest.fixture(scope="module")
def records():
    base = dict(model="llava", requests=REQS, eviction="hae")
    return (run_in_subprocess(ScenarioSpec(multiprocessing=True, **base)),
            run_in_subprocess(ScenarioSpec(multiprocessing=False, **base)))


def test_worker_process_is_patched(records):
    mp, _ = records
    probes = mp["worker_probe"]
    assert probes and all(p["pid"] != mp["driver_pid"] for p in probes), "worker must run in its own process"
    for p in probes:
        assert all(p["runner_patched"].values()), p
        assert "EvictionCPUAttentionBackendImpl" in p["attention_impls"], p
        assert p["runtime_active"], p


def test_engine_core_process_evicts_like_in_process(records):
    mp, inproc = records
    # The trace is written by the worker inside the EngineCore process.
    assert [len(r["evictions"]) for r in mp["results"]] == [1, 1]
    for a, b in zip(mp["results"], inproc["results"]):
        assert a["eviction"]["evicted_positions"] == b["eviction"]["evicted_positions"]
        assert a["token_ids"] == b["token_ids"]
        # Thread counts differ between the two process layouts: float reductions may too.
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-3
