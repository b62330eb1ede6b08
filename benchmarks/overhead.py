"""Cost of eviction when it evicts nothing: ``hae`` with a 100% budget (scoring on) vs ``none``.

    python benchmarks/overhead.py [--num-requests 16] [--max-tokens 64] [--repeats 3]

Same workload in fresh engines, alternating none/hae ``--repeats`` times; TTFT and TPOT per
request come from vLLM's own request metrics; the medians over requests are compared, and the
best (lowest) repeat of each method is used to damp machine noise.

Last line: ttft_overhead=<fraction> tpot_overhead=<fraction>
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hae_vllm.testing.scenario import RequestSpec, ScenarioSpec, environment_info, run_in_subprocess  # noqa: E402


def medians(rec):
    res = rec["results"]
    return statistics.median(r["ttft_s"] for r in res), statistics.median(r["tpot_s"] for r in res)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    reqs = [RequestSpec(text="Describe the picture.", images=[200 + i], max_tokens=args.max_tokens)
            for i in range(args.num_requests)]
    common = dict(model="llava", requests=reqs, log_stats=True, logprobs=False, trace=False, max_num_batched_tokens=1024)
    runs = {"none": [], "hae": []}
    for _ in range(args.repeats):
        runs["none"].append(medians(run_in_subprocess(ScenarioSpec(eviction="none", **common))))
        runs["hae"].append(medians(run_in_subprocess(ScenarioSpec(eviction={"method": "hae", "budget": 1.0}, **common))))
    best = {k: (min(t for t, _ in v), min(p for _, p in v)) for k, v in runs.items()}
    ttft_over = best["hae"][0] / best["none"][0] - 1.0
    tpot_over = best["hae"][1] / best["none"][1] - 1.0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps({
        "benchmark": "overhead", "args": vars(args), "workload": [asdict(r) for r in reqs],
        "runs_median_ttft_tpot_s": runs, "best": best, "ttft_overhead": ttft_over, "tpot_overhead": tpot_over,
        "machine": environment_info()}, indent=2))
    print(f"median TTFT none={best['none'][0]*1e3:.1f}ms hae={best['hae'][0]*1e3:.1f}ms; "
          f"median TPOT none={best['none'][1]*1e3:.2f}ms hae={best['hae'][1]*1e3:.2f}ms")
    print(f"ttft_overhead={ttft_over:.4f} tpot_overhead={tpot_over:.4f}")


if __name__ == "__main__":
    main()
