"""The engine on its Triton kernels: layer-0 scoring reading paged keys in place, compaction and
decode-time swaps moving the slots of every layer in one launch.

No GPU here, so the kernels run on the CPU cache (the backend's transposed key plane) through
Triton's interpreter (``HAE_VLLM_KERNELS=triton TRITON_INTERPRET=1``).  The same workload runs
on the torch path; both must evict the same tokens and generate the same outputs, and the
Triton run must match the HF oracle with those tokens removed, decode parks and restores
included."""

import pytest

from hae_vllm.testing.oracle import MaskedReplay
from hae_vllm.testing.scenario import RequestSpec, ScenarioSpec, run_in_subprocess
from tests.engine_helpers import LOGPROB_ATOL, assert_replays_on_oracle

pytestmark = pytest.mark.engine

EVICTION = {"method": "hae", "budget": 0.5, "decode_budget": 0.5, "decode_start": 0, "bin_capacity": 2,
            "rescore_interval": 4, "restore_margin": 0.5}
REQS = [
    RequestSpec(text="Tell me a long story about this picture.", images=[71], max_tokens=72),
    RequestSpec(text="Compare the two pictures.", images=[72, 73], max_tokens=24),
    # Per-head statistics (MadaKV's modality preferences) through the kernel's head sums.
    RequestSpec(text="What is in the image?", images=[74], max_tokens=24,
                extra_args={"kv_eviction": "madakv"}),
]


def _spec(kernels: str, defer: bool = True) -> ScenarioSpec:
    env = {"HAE_VLLM_KERNELS": kernels}
    if kernels == "triton":
        env["TRITON_INTERPRET"] = "1"
    if not defer:
        env["HAE_VLLM_DEFER_SCORING_BYTES"] = "0"
    return ScenarioSpec(model="llava", requests=REQS, eviction=EVICTION, env=env)


@pytest.fixture(scope="module")
def records():
    return {k: run_in_subprocess(_spec(k)) for k in ("torch", "triton")}


@pytest.fixture(scope="module")
def inline_record():
    """Scoring in the forward, chunk by chunk, instead of at selection (requests whose queries
    are too large to keep)."""
    return run_in_subprocess(_spec("torch", defer=False))


def test_scoring_at_selection_equals_scoring_in_the_forward(records, inline_record):
    for i, (x, y) in enumerate(zip(records["torch"]["results"], inline_record["results"])):
        assert x["eviction"]["evicted_positions"] == y["eviction"]["evicted_positions"], f"request {i}"
        assert x["eviction"]["diagnostics"] == y["eviction"]["diagnostics"], f"request {i}"
        assert x["token_ids"] == y["token_ids"], f"request {i}"


def test_each_run_used_the_kernels_it_was_given(records):
    for kind, rec in records.items():
        used = {r["eviction"]["kernels"] for r in rec["results"]}
        assert used == {kind}, (kind, used)


def test_triton_and_torch_evict_the_same_tokens(records):
    a, b = records["torch"]["results"], records["triton"]["results"]
    parks = 0
    for i, (x, y) in enumerate(zip(a, b)):
        assert x["eviction"]["evicted_positions"] == y["eviction"]["evicted_positions"], f"request {i}"
        assert [(e["kind"], e["positions"]) for e in x["decode_events"]] == \
            [(e["kind"], e["positions"]) for e in y["decode_events"]], f"request {i}"
        parks += sum(e["kind"] == "park" for e in y["decode_events"])
        assert x["token_ids"] == y["token_ids"], f"request {i}"
        assert max(abs(p - q) for p, q in zip(x["logprobs"], y["logprobs"])) <= LOGPROB_ATOL
    assert parks > 0, "no decode parking: the swap kernel was not exercised"
    assert records["triton"]["free_blocks_after"] == records["triton"]["free_blocks_before"], "blocks leaked"


def test_triton_run_matches_hf_oracle(records, oracle_for):
    rec = records["triton"]
    assert_replays_on_oracle(MaskedReplay(oracle_for(rec["model_path"])), rec, REQS)
