"""Cost of eviction when it evicts nothing: ``hae`` with a 100% budget (scoring on) vs ``none``.

    python benchmarks/overhead.py [--num-requests 16] [--max-tokens 64] [--repeats 3]

Same workload in fresh engines, alternating none/hae ``--repeats`` times (the order flips every
repeat); TTFT and TPOT per request come from vLLM's own request metrics.  Each repeat gives a
paired ratio of the per-request medians (hae over the none run next to it); the overhead is the
median of those ratios minus one, which damps machine drift better than comparing bests.

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
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    reqs = [RequestSpec(text="Describe the picture.", images=[200 + i], max_tokens=args.max_tokens)
            for i in range(args.num_requests)]
    common = dict(model="llava", requests=reqs, log_stats=True, logprobs=False, trace=False, max_num_batched_tokens=1024)
    runs = {"none": [], "hae": []}
    specs = {"none": ScenarioSpec(eviction="none", **common),
             "hae": ScenarioSpec(eviction={"method": "hae", "budget": 1.0}, **common)}
    for i in range(args.repeats):
        for name in (("none", "hae") if i % 2 == 0 else ("hae", "none")):
            runs[name].append(medians(run_in_subprocess(specs[name])))
    ttft_ratios = [h[0] / n[0] for h, n in zip(runs["hae"], runs["none"])]
    tpot_ratios = [h[1] / n[1] for h, n in zip(runs["hae"], runs["none"])]
    ttft_over = statistics.median(ttft_ratios) - 1.0
    tpot_over = statistics.median(tpot_ratios) - 1.0
    best = {k: (min(t for t, _ in v), min(p for _, p in v)) for k, v in runs.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps({
        "benchmark": "overhead", "args": vars(args), "workload": [asdict(r) for r in reqs],
        "runs_median_ttft_tpot_s": runs, "paired_ttft_ratios": ttft_ratios,
        "paired_tpot_ratios": tpot_ratios, "best": best, "ttft_overhead": ttft_over, "tpot_overhead": tpot_over,
        "machine": environment_info()}, indent=2))
    print(f"best-run median TTFT none={best['none'][0]*1e3:.1f}ms hae={best['hae'][0]*1e3:.1f}ms; "
          f"best-run median TPOT none={best['none'][1]*1e3:.2f}ms hae={best['hae'][1]*1e3:.2f}ms")
    print(f"ttft_overhead={ttft_over:.4f} tpot_overhead={tpot_over:.4f}")


if __name__ == "__main__":
    main()
