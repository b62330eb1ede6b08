"""The worker's layout changed (issue 18: prefill, decode, holes and trace in their own modules)
with no behaviour change: the same workload gives the same evictions, parks, restores and tokens
as the code before the split, recorded in tests/data/worker_golden.json.

Regenerate (only for an intended behaviour change, and say so in the commit):
    python tests/test_worker_golden.py --write
"""

import json
import sys
from pathlib import Path

import pytest

from hae_vllm.testing.scenario import RequestSpec, ScenarioSpec, run_in_subprocess

pytestmark = pytest.mark.engine

GOLDEN = Path(__file__).parent / "data" / "worker_golden.json"
# score_interval 1: the golden record was made when decode scoring ran every step (the default
# is 8 since issue 20; k = 1 must still behave exactly as before).
EVICTION = {"method": "hae", "budget": 0.5, "decode_budget": 0.5, "decode_start": 0, "bin_capacity": 2,
            "rescore_interval": 4, "restore_margin": 0.5, "score_interval": 1}
REQS = [
    RequestSpec(text="Tell me a long story about this picture.", images=[191], max_tokens=96),
    RequestSpec(text="Describe both pictures at length.", images=[192, 193], max_tokens=64,
                extra_args={"kv_eviction_decode_budget_tokens": 200}),
    RequestSpec(text="A long story, from text only.", images=[], max_tokens=64),
    RequestSpec(text="SnapKV keeps what the window reads.", images=[194], max_tokens=16,
                extra_args={"kv_eviction": "snapkv", "kv_eviction_budget": 0.4}),
    RequestSpec(text="MadaKV per head.", images=[195], max_tokens=16,
                extra_args={"kv_eviction": "madakv", "kv_eviction_budget": 0.4}),
    RequestSpec(text="H2O, heavy hitters.", images=[196, 197], max_tokens=16,
                extra_args={"kv_eviction": "h2o", "kv_eviction_budget": 0.3}),
]


def observed() -> list[dict]:
    # Chunked prefill too: images straddle chunks, scoring accumulates across them.
    record = run_in_subprocess(ScenarioSpec(model="llava", requests=REQS, eviction=EVICTION,
                                            max_num_batched_tokens=128, max_num_seqs=4))
    out = []
    for r in record["results"]:
        out.append({
            "token_ids": r["token_ids"],
            "prefill": [(e["num_tokens"], e["evicted_positions"], e["hole_blocks"]) for e in r["evictions"]],
            "decode": [(e["kind"], e["num_tokens"], e["positions"]) for e in r["decode_events"]],
        })
    return json.loads(json.dumps(out))  # tuples as lists, as stored


def test_same_evictions_and_tokens_as_before_the_split():
    want = json.loads(GOLDEN.read_text())["requests"]
    got = observed()
    assert any(r["decode"] for r in got) and all(r["prefill"] for i, r in enumerate(got) if i != 2)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g["prefill"] == w["prefill"], f"request {i}: prefill evictions differ"
        assert g["decode"] == w["decode"], f"request {i}: decode parks/restores differ"
        assert g["token_ids"] == w["token_ids"], f"request {i}: tokens differ"
    assert len(got) == len(want)


if __name__ == "__main__" and sys.argv[1:] == ["--write"]:
    import subprocess

    GOLDEN.write_text(json.dumps({
        "note": "recorded from the worker before the module split (tests/test_worker_golden.py)",
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "requests": observed()}, indent=1))
    print(f"wrote {GOLDEN}")
