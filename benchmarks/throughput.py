"""Throughput at saturation: ``none`` vs an eviction method on the same, small KV memory.

    python benchmarks/throughput.py [--method hae] [--budget 0.3] [--max-tokens 128] [--num-requests 64] [--num-blocks 160] [--decode-budget B]

Many concurrent image requests on the tiny LLaVA against a KV pool small enough that capacity
binds (``num_gpu_blocks_override``): 64 one-image requests (274-token prompts) of 128 output
tokens each, on 160 blocks of 32 tokens.  The budget, 0.3, is one at which HAE's accuracy on the
trained VLM is unchanged (``benchmarks/results/accuracy_full.md``).  Reports output tokens/s, peak running requests,
preemptions, TTFT and TPOT p50/p99 (vLLM's request metrics), the measured freed fraction ``r``
and the physical limit ``1/(1-r)`` on how many more sequences fit (DESIGN.md §3).

``r`` is the share of the workload's KV footprint that eviction returned to the pool: blocks
freed (each request's final plan) over the blocks its prompt and output occupy at the end of
generation without eviction.  (Over prompt blocks alone it would overstate the limit.)

The forward time of every step is split into decode-only steps and steps with prefill work
(which eviction adds to and never removes; recomputation after preemption included).  From the
baseline's split, the *decode-only bound* is the ratio eviction would reach if it divided the
baseline's decode-only forward time by the limit and changed nothing else: on this machine the
limit assumes that more sequences per step cost nothing, which holds for decode steps at best.

``--decode-budget`` adds HAE's decode stage (parking into the recycle bin); ``r`` then counts
the blocks each request no longer holds at the end: prefill holes plus parked minus restored
blocks (``blocks_freed_at_end``).

``--watermark`` sets vLLM's scheduler watermark (share of blocks kept free when admitting) for
both engines, to study preemption; the default is vLLM's, 0.

Output tok/s is measured over the engine's stepping time (first ``schedule()`` to the end of
``generate``): ``LLM.generate`` first runs the HF processor over every prompt, identical work in
both runs that a server overlaps with the engine in its API process.  The wall-clock ratio,
processing included, is reported too.

``--from-file benchmarks/results/throughput_hae.json`` prints a saved result again, with the
medians the README quotes (per-engine step profile, decode step cost ratio, recomputed prompt
tokens per preemption, the spread of the rounds), without running anything.

Timing: the two engines take turns of ``--slice-steps`` engine steps within a round (none's
next 4 steps, then the method's, the order flipping every round;
:func:`~hae_vllm.testing.scenario.take_turns`, as ``benchmarks/long_generation.py``), each with
one torch thread, and each engine's time is the sum of its own ``step()`` calls.  This shared
machine's speed moves by up to 2x between consecutive tenths of a second; whole rounds back to
back (seconds apart) gave single-round ratios with quartiles 1.05-3.40 around a median of 1.52.
Turns of a few steps put both engines in the same tenth of a second.  ``--slice-steps 0`` runs
whole rounds.  With turns, a request's TTFT and TPOT (vLLM's request metrics, wall clock)
include the other engine's turns: read them as relative figures only.

``cpu_bound`` is the decode-only bound below, measured in the same run: what eviction could
reach on this CPU if it shortened nothing but the baseline's decode-only steps (by the limit).

Last line: throughput_ratio=<x> limit=<1/(1-r)> r=<r> max_running_ratio=<m> q1=<a> q3=<b> cpu_bound=<c>
(``q1``/``q3``: quartiles of the paired rounds' ratios)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hae_vllm.testing.scenario import (  # noqa: E402
    LiveScenario, RequestSpec, ScenarioSpec, blocks_freed_at_end, environment_info, take_turns,
)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))]


def summarize(rec):
    res = rec["results"]
    n_out = sum(len(r["token_ids"]) for r in res)
    busy = rec["engine_busy_s"]
    ttft = [r["ttft_s"] for r in res]
    tpot = [r["tpot_s"] for r in res]
    return {
        "output_tok_s": n_out / busy,
        "output_tok_s_wall": n_out / rec["generate_s"],
        "engine_busy_s": busy,
        "generate_s": rec["generate_s"],
        "peak_running": rec["peak_running"],
        "peak_blocks_in_use": rec["peak_blocks_in_use"],
        "preemptions": sum(r.get("num_preemptions", 0) for r in res),
        "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
        "tpot_p50_s": pct(tpot, 0.5), "tpot_p99_s": pct(tpot, 0.99),
        "step_profile": rec.get("step_profile"),
        "preemption": rec.get("preemption"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="hae")
    ap.add_argument("--budget", type=float, default=0.3)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--images", type=int, default=1, help="images per request")
    ap.add_argument("--num-blocks", type=int, default=160, help="KV blocks (of 32 tokens) for both runs")
    ap.add_argument("--rounds", type=int, default=25, help="paired rounds (each engine runs this many)")
    ap.add_argument("--slice-steps", type=int, default=4,
                    help="engine steps per turn when the two engines take turns within a round (0: whole rounds)")
    ap.add_argument("--warmup", type=int, default=4, help="requests run before the measured ones in each engine")
    ap.add_argument("--decode-budget", type=float, default=None,
                    help="also evict during decode (HAE's decode stage: live tokens kept within this share)")
    ap.add_argument("--watermark", type=float, default=0.0,
                    help="vLLM's scheduler watermark (share of blocks kept free at admission), both engines")
    ap.add_argument("--admission-reserve", type=float, default=None,
                    help="hae's admission_reserve (share of the pool a waiting request must leave free; default: the config's)")
    ap.add_argument("--tag", default="", help="suffix of the result file (variants of the default run)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--from-file", default=None,
                    help="print the report of a saved result file (no run): every figure the README takes from one")
    args = ap.parse_args()
    if args.from_file:
        report(json.loads(Path(args.from_file).read_text()))
        return
    reqs = [RequestSpec(text="Describe the picture in detail.", images=[300 + args.images * i + j for j in range(args.images)], max_tokens=args.max_tokens)
            for i in range(args.num_requests)]
    common = dict(model="llava", requests=reqs, log_stats=True, logprobs=False, trace=True,
                  num_gpu_blocks_override=args.num_blocks, max_num_seqs=256, max_model_len=1024,
                  max_num_batched_tokens=2048, warmup_requests=args.warmup,
                  engine_kwargs={"watermark": args.watermark} if args.watermark else {},
                  # One torch/OpenMP thread per engine (as long_generation.py): a spinning
                  # OpenMP barrier of the waiting engine would take the running one's core.
                  env={"OMP_NUM_THREADS": "1"} if args.slice_steps else {})
    names = ("none", args.method)
    eviction = {"method": args.method, "budget": args.budget}
    if args.decode_budget is not None:
        eviction["decode_budget"] = args.decode_budget
        eviction["decode_start"] = 0  # from the first step, as the committed decode variant
    if args.admission_reserve is not None:
        eviction["admission_reserve"] = args.admission_reserve
    rounds: dict[str, list] = {n: [] for n in names}
    load_start = os.getloadavg()  # other jobs on the machine make the timing rounds noisy
    with LiveScenario(ScenarioSpec(eviction="none", **common)) as base, \
            LiveScenario(ScenarioSpec(eviction=eviction, **common)) as meth:
        engines = dict(zip(names, (base, meth)))
        for i in range(args.rounds):
            # Same images for both engines in a round; the order flips every round.
            order = list(names if i % 2 == 0 else names[::-1])
            if args.slice_steps:
                recs = take_turns(engines, order, 10_000 * (i + 1), None, args.slice_steps)
            else:
                recs = {name: engines[name].round(10_000 * (i + 1)) for name in order}
            for name in names:
                rounds[name].append(recs[name])
            print(f"round {i}: ratio {summarize(recs[args.method])['output_tok_s'] / summarize(recs['none'])['output_tok_s']:.3f}",
                  flush=True)
    bs = 32
    paired = []
    for b, m in zip(rounds["none"], rounds[args.method]):
        sb, sm = summarize(b), summarize(m)
        # r from each request's final plan (a preempted request is re-planned on recompute; the
        # scheduler's counter would count its blocks twice), over the footprint without eviction.
        res = m["results"]
        footprint = sum(math.ceil((len(x["prompt_token_ids"]) + len(x["token_ids"])) / bs) for x in res)
        prompt_blocks = sum(math.ceil(len(x["prompt_token_ids"]) / bs) for x in res)
        freed = blocks_freed_at_end(m["trace"])
        holes = sum(freed.get(x["request_id"], 0) for x in res)
        r_round = holes / footprint
        # What eviction could give if it only divided the baseline's decode-only forward time
        # by the limit (fewer steps, each at the baseline's cost) and changed nothing else:
        # prefill work and the time outside the forward (scheduling, sampling, outputs) stay.
        dec = sb["step_profile"]["decode_s"]
        decode_bound = sb["engine_busy_s"] / (dec / (1.0 / (1.0 - r_round)) + sb["engine_busy_s"] - dec)
        paired.append({
            "none": sb, args.method: sm, "r": r_round, "r_prompt": holes / prompt_blocks, "decode_bound": decode_bound,
            "prompt_tokens_mean": statistics.mean(len(x["prompt_token_ids"]) for x in res),
            "throughput_ratio": sm["output_tok_s"] / sb["output_tok_s"],
            "throughput_ratio_wall": sm["output_tok_s_wall"] / sb["output_tok_s_wall"],
            "max_running_ratio": sm["peak_running"] / sb["peak_running"],
        })
    med = {k: statistics.median(p[k] for p in paired)
           for k in ("r", "r_prompt", "throughput_ratio", "throughput_ratio_wall", "max_running_ratio", "decode_bound")}
    med["round_ratio_spread"] = spread([p["throughput_ratio"] for p in paired])
    r = med["r"]
    limit = 1.0 / (1.0 - r)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from hae_vllm.config import build_engine_config

    resolved = build_engine_config(args.method, None, **{k: v for k, v in eviction.items() if k != "method"})
    data = {"benchmark": "throughput", "args": vars(args), "eviction_config": resolved.to_dict(), "load_average": {"start": load_start, "end": os.getloadavg()}, "rounds": paired, "median": med, "r": r, "limit": limit,
            "throughput_ratio": med["throughput_ratio"], "max_running_ratio": med["max_running_ratio"],
            "machine": environment_info()}
    (out / f"throughput_{args.method}{'_' + args.tag if args.tag else ''}.json").write_text(json.dumps(data, indent=2))
    report(data)


def spread(ratios: list[float]) -> dict[str, float]:
    """The single rounds' ratios: quartiles (statistics.quantiles, inclusive), min, max."""
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else (ratios[0],) * 3
    return {"q1": q1, "q3": q3, "min": min(ratios), "max": max(ratios)}


def report(data: dict) -> None:
    """Print a result (a fresh run, or a saved file with ``--from-file``): every round, the
    medians over the rounds of each engine's step profile, and the last line."""
    paired, med, limit, r = data["rounds"], data["median"], data["limit"], data["r"]
    method = data["args"]["method"]
    names = ("none", method)
    for i, p in enumerate(paired):
        for name in names:
            s = p[name]
            q = s["step_profile"]
            print(f"round {i} {name:>6}: {s['output_tok_s']:.0f} tok/s, peak running {s['peak_running']}, "
                  f"preemptions {s['preemptions']}, TTFT p50/p99 {s['ttft_p50_s']*1e3:.0f}/{s['ttft_p99_s']*1e3:.0f} ms, "
                  f"TPOT p50/p99 {s['tpot_p50_s']*1e3:.1f}/{s['tpot_p99_s']*1e3:.1f} ms; forward {q['decode_s']:.2f} s in "
                  f"{q['decode_steps']} decode-only steps (mean batch {q['decode_mean_batch']:.1f}) + {q['prefill_s']:.2f} s "
                  f"in {q['prefill_steps']} steps with prefill ({q['prefill_tokens']} prompt tokens)")
        print(f"round {i} ratio {p['throughput_ratio']:.4f} (wall-clock {p['throughput_ratio_wall']:.4f}), r {p['r']:.4f}")

    def step_ms(s):
        q = s["step_profile"]
        return q["decode_s"] / max(1, q["decode_steps"]) * 1e3

    for name in names:
        rows = [p[name] for p in paired]
        # Prompt tokens beyond the workload's own (num_requests x prompt length): recomputation.
        first = data["args"]["num_requests"] * statistics.median(p["prompt_tokens_mean"] for p in paired)
        print(f"{name:>6} (medians of the rounds): peak running {statistics.median(s['peak_running'] for s in rows):g}, "
              f"decode-only steps {statistics.median(s['step_profile']['decode_steps'] for s in rows):g} "
              f"(mean batch {statistics.median(s['step_profile']['decode_mean_batch'] for s in rows):.1f}, "
              f"{statistics.median(step_ms(s) for s in rows):.2f} ms each), "
              f"preemptions {statistics.median(s['preemptions'] for s in rows):g}, "
              f"prompt tokens computed {statistics.median(s['step_profile']['prefill_tokens'] for s in rows):g} "
              f"({statistics.median((s['step_profile']['prefill_tokens'] - first) / max(1, s['preemptions']) for s in rows):.0f} "
              f"recomputed per preemption)")
    if all(p[name].get("preemption") for p in paired for name in names):
        for name in names:
            rows = [p[name]["preemption"] for p in paired]
            # Tokens a preempted request had computed and computed again: what preemption cost.
            recomputed = statistics.median(r["preempted_computed"] - r["resumed_hits"] for r in rows)
            print(f"{name:>6} after preemption (medians of the rounds): {recomputed:g} tokens recomputed; "
                  f"{statistics.median(r['resumed'] for r in rows):g} resumptions served "
                  f"{statistics.median(r['resumed_hits'] for r in rows):g} of "
                  f"{statistics.median(r['resumed_tokens'] for r in rows):g} tokens from the cache")
    cost = statistics.median(step_ms(p[method]) / step_ms(p["none"]) for p in paired)
    print(f"decode step cost {method}/none: {cost:.2f} (median of the rounds' ratios)")
    sp = spread([p["throughput_ratio"] for p in paired])
    print(f"round ratios: quartiles {sp['q1']:.2f}-{sp['q3']:.2f} (min-max {sp['min']:.2f}-{sp['max']:.2f})")
    print(f"median of {len(paired)} paired rounds; freed share of prompt blocks {med['r_prompt']:.4f}; "
          f"wall-clock ratio (input processing included) {med['throughput_ratio_wall']:.4f}")
    print(f"decode-only bound {med['decode_bound']:.4f} ({med['decode_bound'] / limit:.2f} of the limit; {method} reaches "
          f"{med['throughput_ratio'] / med['decode_bound']:.2f} of it): the ratio if "
          f"eviction divided none's decode-only forward time by the limit and left its prefill and "
          f"non-forward time as they are")
    print(f"throughput_ratio={med['throughput_ratio']:.4f} limit={limit:.4f} r={r:.4f} "
          f"max_running_ratio={med['max_running_ratio']:.4f} q1={sp['q1']:.4f} q3={sp['q3']:.4f} "
          f"cpu_bound={med['decode_bound']:.4f}")


if __name__ == "__main__":
    main()
