"""Accuracy under KV eviction: every method x every budget through vLLM, scored exactly.

    python benchmarks/accuracy.py --quick
    python benchmarks/accuracy.py [--tasks single,cell,needle] [--n 100] [--budgets 0.1,0.2,0.4,0.6]
    python benchmarks/accuracy.py --model /path/to/hf-vlm --dataset data.jsonl --dtype bfloat16

Default model: the VLM trained in this repository (models/grid-llava-v1, see its README.md);
default data: held-out items of the procedural tasks (hae_lab/accuracy/tasks.py).  Any local HF
VLM that vLLM serves and any JSONL dataset (see hae_lab.accuracy.harness.load_jsonl) work too.

All settings run in one engine (per-request method and budget knobs), so every method sees the
same batches.  ``kv_kept_frac`` is physical: KV blocks actually returned to vLLM's pool, over the
prompt's blocks.  Writes accuracy_<name>.json (config, machine, versions, per-item results),
accuracy_<name>.md (table) and accuracy_<name>.png (accuracy against KV kept, one line per
method) to --out.

Last line (stable format), at --default-budget:
    full_acc=<x> hae_acc=<y> best_baseline_acc=<z> budget=<b> kv_kept_frac=<k>

``--suite hard``: the tasks that need the right tokens among look-alikes - ``cell`` (a cell
named by row and column among the other filled cells), ``needle`` (one cell of one of three
images, plus a number given in the text) and ``describe`` (the whole grid, cell by cell, scored
per cell) - on models/grid-llava-v4 (64 visual tokens per image, attention learned; see its README.md).  Last line:
    full_acc=<x> hae_acc=<y> best_baseline_acc=<z> best_baseline=<name> budget=<b> kv_kept_frac=<k>

``--decode``: the decode stage on ``describe`` (long grounded generation): full cache, greedy
decode eviction (bin capacity 0: parked blocks are released at once) and the recycle bin at
``--bin-capacities``, all at ``--decode-budget`` (so they hold the same live KV blocks) with
no prefill eviction.  Restores are counted from each request's trace.  Last line:
    describe_full=<x> greedy=<y> bin=<z> kv_kept_frac=<k>
(``bin`` at ``--bin-capacity``; ``kv_kept_frac``: its live KV blocks at the end of generation over
the full cache's.  The peak is the prompt for every setting: all of it is held during the prefill.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hae_lab.accuracy import harness as H  # noqa: E402
from hae_vllm.testing.scenario import environment_info  # noqa: E402

DEFAULT_MODEL = REPO / "models" / "grid-llava-v1"
HARD_MODEL = REPO / "models" / "grid-llava-v4"
HARD_TASKS = "cell,needle,describe"
BASELINES = ["madakv", "snapkv", "h2o", "fastv", "streamingllm", "random"]


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None,
                    help=f"local HF VLM directory (default: {DEFAULT_MODEL.name}; {HARD_MODEL.name} for --suite hard and --decode)")
    ap.add_argument("--dataset", default=None, help="JSONL dataset (default: procedural held-out tasks)")
    ap.add_argument("--suite", choices=("default", "hard"), default="default",
                    help=f"hard: tasks {HARD_TASKS} on {HARD_MODEL.name}, last line names the best baseline")
    ap.add_argument("--decode", action="store_true", help="decode-stage comparison on describe (see above)")
    ap.add_argument("--decode-budget", type=float, default=0.5, help="--decode: keep ratio of live tokens")
    ap.add_argument("--bin-capacities", default="1,2,4,8", help="--decode: recycle-bin capacities (blocks)")
    ap.add_argument("--decode-start", type=float, default=0.0,
                    help="--decode: decode_start of the greedy and bin settings (0: the stage from the first step); "
                         "the 'default' setting runs the engine's default")
    ap.add_argument("--bin-capacity", type=int, default=4, help="--decode: the capacity on the last line")
    ap.add_argument("--tasks", default=None,
                    help="procedural tasks (default: single,cell,shape,needle,describe; --suite hard: "
                         f"{HARD_TASKS}); see the models' README.md for what each model learned")
    ap.add_argument("--n", type=int, default=None, help="items per procedural task (default 100; 4 with --quick "
                    "for --suite hard and --decode)")
    ap.add_argument("--methods", default=",".join(["hae"] + BASELINES))
    ap.add_argument("--budgets", default="0.1,0.2,0.3,0.4,0.6,0.8", help="keep ratios")
    ap.add_argument("--default-budget", type=float, default=0.4,
                    help="budget of the last line (0.4 frees 5 of the 9 blocks of a one-image prompt at block size 32)")
    ap.add_argument("--extra", default="{}", help="JSON knobs for every eviction setting, e.g. '{\"evict_text\": true}'")
    ap.add_argument("--quick", action="store_true",
                    help="the single-shape questions only (what the default model answers), the default budget")
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--name", default=None, help="result file stem (default: quick or full)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    hard = args.suite == "hard" or args.decode
    model = Path(args.model or (HARD_MODEL if hard else DEFAULT_MODEL))
    n = args.n or (4 if args.quick and hard else 100)
    if not (model / "config.json").is_file():
        sys.exit(f"error: {model} is not a HF model directory (no config.json). The default models are "
                 "trained by `python -m hae_lab.accuracy.train` (their README.md gives the command).")
    methods = [m for m in args.methods.split(",") if m]
    if "hae" not in methods:
        sys.exit("error: --methods must include hae (the last line compares it with the baselines)")
    budgets = [args.default_budget] if args.quick else sorted(set(_floats(args.budgets)) | {args.default_budget})
    if args.dataset:
        items = H.load_jsonl(args.dataset)
    else:
        if args.decode:
            tasks = ["describe"]
        elif args.tasks:
            tasks = [t for t in args.tasks.split(",") if t]
        elif args.suite == "hard":
            tasks = HARD_TASKS.split(",")
        else:
            tasks = ["single"] if args.quick else "single,cell,shape,needle,describe".split(",")
        items = H.procedural_items(tasks, n)
    if args.decode:
        caps = [args.bin_capacity] if args.quick else sorted(set(int(c) for c in args.bin_capacities.split(",") if c)
                                                             | {args.bin_capacity})
        settings = H.decode_settings(args.decode_budget, caps, decode_start=args.decode_start)
    else:
        settings = [H.Setting(H.FULL)] + [H.Setting(m, b) for b in budgets for m in methods]
    cfg = H.RunConfig(model=str(model), settings=settings, extra=json.loads(args.extra), block_size=args.block_size,
                      dtype=args.dtype, max_model_len=args.max_model_len,
                      tensor_parallel_size=args.tensor_parallel_size)
    print(f"{len(items)} items x {len(settings)} settings on {model}", flush=True)
    t0 = time.time()
    res = H.run(items, cfg)
    summary = H.summarize(res["rows"])
    stats = res["scheduler_stats"]
    freed_trace = sum(r["freed_blocks"] for r in res["rows"])
    if stats is not None and stats["freed_blocks"] != freed_trace:
        print(f"WARNING: scheduler freed {stats['freed_blocks']} blocks, traces say {freed_trace}")

    name = args.name or ("decode_" if args.decode else "hard_" if args.suite == "hard" else "") + (
        "quick" if args.quick else "full")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{model.name}, {len(items)} items" + (f", {Path(args.dataset).name}" if args.dataset else "")
    md = H.markdown_table(summary)
    if args.decode:
        md = (f"Decode budget {args.decode_budget:g} (live tokens), no prefill eviction. KV kept: live blocks over "
              "the full cache's blocks at the end of each request (peak: the largest live count, which is the "
              "prompt's blocks for every setting, held during the prefill).\n\n" + H.decode_table(summary))
    (out / f"accuracy_{name}.md").write_text(f"# Accuracy under eviction ({title})\n\n"
                                              f"Command: `python benchmarks/accuracy.py {' '.join(sys.argv[1:])}`\n\n" + md)
    if not args.decode:
        H.plot(summary, out / f"accuracy_{name}.png", title)
    record = {
        "benchmark": "accuracy", "argv": sys.argv[1:], "model": str(model), "dataset": args.dataset,
        "settings": [s.label for s in settings], "block_size": args.block_size, "dtype": args.dtype,
        "suite": args.suite, "decode": args.decode,
        "decode_budget": args.decode_budget if args.decode else None,
        "setting_knobs": {s.label if not s.name else s.group: dict(s.knobs) for s in settings},
        "extra": cfg.extra, "environment": environment_info(), "wall_s": time.time() - t0,
        "engine_start_s": res["engine_start_s"], "generate_s": res["generate_s"],
        "scheduler_stats": stats, "freed_blocks_from_traces": freed_trace,
        "summary": summary, "rows": res["rows"],
    }
    (out / f"accuracy_{name}.json").write_text(json.dumps(record, indent=1))
    print(md)
    if args.decode:
        default = next((r for r in summary if r.get("group") == "default"), None)
        if default is not None:  # the decode budget as a user sets it (engine defaults otherwise)
            print(f"describe_default={default['accuracy']:.4f} default_kv_kept_frac={default.get('final_kv_frac', 1.0):.4f}")
        print(H.decode_quick_line(summary, args.bin_capacity))
    else:
        print(H.quick_line(summary, args.default_budget, name_best=args.suite == "hard"))


if __name__ == "__main__":
    main()
