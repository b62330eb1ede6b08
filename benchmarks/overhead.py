"""Cost of eviction when it evicts nothing: ``hae`` with a 100% budget (scoring on) vs ``none``.

    python benchmarks/overhead.py [--pairs 256] [--rounds 10] [--num-requests 16] [--max-tokens 64]

Two engines live side by side (``none`` and ``hae``, each in its own process, each warmed up by
``--warmup`` short requests); TTFT and TPOT come from vLLM's own request metrics.  This
machine's speed drifts by 20-30% within seconds, so the two are compared at the finest grain
that still measures what a user sees:

* **per request** (the last line): ``--pairs`` single requests, each sent to one engine and
  then the other (the order flips every pair; a fresh image every pair, so nothing comes from
  the prefix cache).  The overhead is the median over pairs of the ratio hae/none, minus one;
* **concurrent** (reported too): ``--rounds`` paired rounds of ``--num-requests`` requests sent
  together, ratio of the per-round median TTFT (and TPOT).  Queueing behind other requests
  makes these rounds several times noisier (see the per-round ratios in the JSON).

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
    ap.add_argument("--pairs", type=int, default=256,
                    help="single-request pairs (the reported overhead; with 64 the median moved by +-4%% between runs here)")
    ap.add_argument("--rounds", type=int, default=10, help="paired concurrent rounds (reported too)")
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
    single = {"none": [], "hae": []}
    with LiveScenario(specs["none"]) as none_engine, LiveScenario(specs["hae"]) as hae_engine:
        engines = {"none": none_engine, "hae": hae_engine}
        for i in range(args.pairs):
            for name in (("none", "hae") if i % 2 == 0 else ("hae", "none")):
                r = engines[name].round(100_000 + 16 * i, subset=[i % len(reqs)])["results"][0]
                single[name].append((r["ttft_s"], r["tpot_s"]))
        for i in range(args.rounds):
            # Both engines get the same images in a round; the order flips every round.
            for name in (("none", "hae") if i % 2 == 0 else ("hae", "none")):
                runs[name].append(medians(engines[name].round(1000 * (i + 1))["results"]))

    def paired(a, b, k):
        return [x[k] / y[k] for x, y in zip(a, b)]

    ttft_ratios, tpot_ratios = paired(single["hae"], single["none"], 0), paired(single["hae"], single["none"], 1)
    ttft_over = statistics.median(ttft_ratios) - 1.0
    tpot_over = statistics.median(tpot_ratios) - 1.0
    conc_ttft, conc_tpot = paired(runs["hae"], runs["none"], 0), paired(runs["hae"], runs["none"], 1)
    conc = {"ttft_overhead": statistics.median(conc_ttft) - 1.0, "tpot_overhead": statistics.median(conc_tpot) - 1.0,
            "paired_ttft_ratios": conc_ttft, "paired_tpot_ratios": conc_tpot, "rounds_median_ttft_tpot_s": runs}
    med = {k: (statistics.median(t for t, _ in v), statistics.median(p for _, p in v)) for k, v in single.items()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps({
        "benchmark": "overhead", "args": vars(args), "workload": [asdict(r) for r in reqs],
        "single_ttft_tpot_s": single, "paired_ttft_ratios": ttft_ratios, "paired_tpot_ratios": tpot_ratios,
        "median": med, "ttft_overhead": ttft_over, "tpot_overhead": tpot_over, "concurrent": conc,
        "machine": environment_info()}, indent=2))
    q = statistics.quantiles
    print(f"concurrent ({args.rounds} paired rounds of {args.num_requests}): ttft_overhead={conc['ttft_overhead']:.4f} "
          f"tpot_overhead={conc['tpot_overhead']:.4f}, round ratios {min(conc_ttft):.3f}..{max(conc_ttft):.3f}")
    print(f"per request ({args.pairs} pairs): median TTFT none={med['none'][0]*1e3:.1f}ms hae={med['hae'][0]*1e3:.1f}ms, "
          f"TPOT none={med['none'][1]*1e3:.2f}ms hae={med['hae'][1]*1e3:.2f}ms; TTFT ratio quartiles "
          f"{', '.join(f'{x:.3f}' for x in q(ttft_ratios, n=4))}")
    print(f"ttft_overhead={ttft_over:.4f} tpot_overhead={tpot_over:.4f}")

if __name__ == "__main__":
    main()
