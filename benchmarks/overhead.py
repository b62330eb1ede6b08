"""Cost of eviction when it evicts nothing: ``hae`` with a 100% budget (scoring on) vs ``none``.

    python benchmarks/overhead.py [--num-requests 16] [--max-tokens 64] [--rounds 12]

Two engines live side by side (``none`` and ``hae``, each in its own process, each warmed up by
``--warmup`` short requests) and run the same workload in interleaved rounds (none, hae, hae,
none, ...; fresh images every round, so nothing comes from the prefix cache).  Adjacent rounds
see the same machine state, which matters on a shared machine whose speed drifts by 20-30%:
each pair gives a ratio of the per-request median TTFT (and TPOT), hae over none, and the
overhead is the median of those ratios minus one.  TTFT and TPOT come from vLLM's own request
metrics.

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

from hae_vllm.testing.scenario import LiveScenario, RequestSpec, ScenarioSpec, environment_info  # noqa: E402


def medians(results):
    return statistics.median(r["ttft_s"] for r in results), statistics.median(r["tpot_s"] for r in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=12, help="paired rounds (each engine runs this many)")
    ap.add_argument("--warmup", type=int, default=4, help="requests run before the measured ones in each engine")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    reqs = [RequestSpec(text="Describe the picture.", images=[200 + i], max_tokens=args.max_tokens)
            for i in range(args.num_requests)]
    common = dict(model="llava", requests=reqs, log_stats=True, logprobs=False, trace=False,
                  max_num_batched_tokens=1024, warmup_requests=args.warmup)
    specs = {"none": ScenarioSpec(eviction="none", **common),
             "hae": ScenarioSpec(eviction={"method": "hae", "budget": 1.0}, **common)}
    runs = {"none": [], "hae": []}
    with LiveScenario(specs["none"]) as none_engine, LiveScenario(specs["hae"]) as hae_engine:
        engines = {"none": none_engine, "hae": hae_engine}
        for i in range(args.rounds):
            # Both engines get the same images in a round; the order flips every round.
            for name in (("none", "hae") if i % 2 == 0 else ("hae", "none")):
                runs[name].append(medians(engines[name].round(1000 * (i + 1))["results"]))
    ttft_ratios = [h[0] / n[0] for h, n in zip(runs["hae"], runs["none"])]
    tpot_ratios = [h[1] / n[1] for h, n in zip(runs["hae"], runs["none"])]
    ttft_over = statistics.median(ttft_ratios) - 1.0
    tpot_over = statistics.median(tpot_ratios) - 1.0
    med = {k: (statistics.median(t for t, _ in v), statistics.median(p for _, p in v)) for k, v in runs.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps({
        "benchmark": "overhead", "args": vars(args), "workload": [asdict(r) for r in reqs],
        "rounds_median_ttft_tpot_s": runs, "paired_ttft_ratios": ttft_ratios,
        "paired_tpot_ratios": tpot_ratios, "median": med, "ttft_overhead": ttft_over, "tpot_overhead": tpot_over,
        "machine": environment_info()}, indent=2))
    print(f"median over rounds: TTFT none={med['none'][0]*1e3:.1f}ms hae={med['hae'][0]*1e3:.1f}ms; "
          f"TPOT none={med['none'][1]*1e3:.2f}ms hae={med['hae'][1]*1e3:.2f}ms; "
          f"paired TTFT ratios {min(ttft_ratios):.3f}..{max(ttft_ratios):.3f}")
    print(f"ttft_overhead={ttft_over:.4f} tpot_overhead={tpot_over:.4f}")


if __name__ == "__main__":
    main()
