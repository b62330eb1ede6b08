"""How eviction's cost grows with the prompt: many-image prompts from ~1k to ~32k tokens.

    python benchmarks/scaling.py [--lengths 1000,4000,8000,16000,32000] [--rounds 3]
        [--methods none,hae,streamingllm,h2o,snapkv,fastv,madakv,random] [--modes oneshot,chunked]

Tiny LLaVA declared for 40960 positions (``hae_lab.tiny_models.long_context_path``; RoPE
computes any position), float32, one request at a time: ``n`` images of 256 tokens and a
question after them, ``n`` chosen for each length.  Every method runs in its own engine process
beside a vanilla (``none``) engine, each request sent to one and then the other (the order
flips every round, fresh images every round, prefix caching off; a first request of each size
in each engine is not measured), so each ratio is paired.
Two prefill modes: ``oneshot`` (the whole prompt in one step) and ``chunked`` (2048-token
chunks, vLLM's chunked prefill).

Per method, mode and length (medians over rounds, paired ratio quartiles):

* ``ttft_ratio``: the request's time to its first token **with its eviction applied**,
  against vanilla's: the time of ``generate`` with ``max_tokens=2`` (prefill, the deferred
  scoring, selection and compaction that run before the next step, one decode step).  Stricter
  than vLLM's TTFT, which eviction's deferred work does not delay;
* ``eviction_share``: the share of that time spent in the worker's eviction hooks (scoring in
  the forward, deferred scoring, selection, compaction, bookkeeping; timers around
  ``EvictionRuntime``'s entry points);
* ``extra_peak_mib``: the most resident memory eviction's work added while it ran: for every
  call into the worker's eviction hooks, the peak resident set during the call (``VmHWM``, reset
  through ``/proc/self/clear_refs`` at its start) above the resident set at its start; the
  largest over the request's calls (every host tensor eviction allocates; this machine has no
  device memory).  Also recorded: the request's own peak above vanilla's
  (``request_peak_over_none_mib``), which is zero where eviction's peak stays under the
  prefill's;
* ``blocks_freed``: KV blocks the request's eviction returned to vLLM's pool.

The HF oracle checks every method's tokens and log-probs (float32: exact tokens, 1e-3) with the
engine's evicted positions removed, at the lengths up to ``--oracle-max-tokens``.  A log-log
plot of added time and extra memory against prompt length goes beside the result file
(``benchmarks/results/scaling.png``; ``benchmarks/report.py`` renders the table into
docs/results.md).

Last line::

    max_prompt_tokens=<n> hae_ttft_ratio_at_max=<x> worst_ttft_ratio_at_max=<y> worst_method=<m> eviction_peak_mib_at_max=<p> memory_growth_exponent=<e> hf_oracle_match=<true|false>

``eviction_peak_mib_at_max``: the largest extra peak of any method at the longest prompt;
``memory_growth_exponent``: the largest log-log slope of extra peak against prompt length of
any method whose extra peak at the longest prompt is at least 1 MiB, fitted over its lengths
with readings of at least 1 MiB (below that the reading is the allocator's page granularity).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

POSITIONS = 40960
IMAGE_TOKENS = 256
QUESTION = "Describe every picture, one by one."
VIDEO_QUESTION = "Describe what happens in the video, scene by scene."
FRAME_TOKENS = 32  # tiny Qwen2-VL, 224-pixel frames: 64 tokens per pair of frames
MODEL_KIND = {"images": "llava", "video": "qwen2vl"}
METHODS = ["none", "hae", "streamingllm", "h2o", "snapkv", "fastv", "madakv", "random"]
CHUNK = 2048
MARK = "@@hae_scaling "  # the worker's replies on stdout, among vLLM's log lines
RESULT = REPO / "benchmarks" / "results" / "scaling.json"
# (module, class, method) of the worker's eviction entry points: together, all its work.
HOOKS = [("hae_vllm.worker.runtime", "EvictionRuntime", "score"),
         ("hae_vllm.worker.runtime", "EvictionRuntime", "on_states_updated"),
         ("hae_vllm.worker.runtime", "EvictionRuntime", "after_forward"),
         ("hae_vllm.worker.runtime", "EvictionRuntime", "strip_holes")]


# ---------------------------------------------------------------------------------- worker


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def media_request(prompt: str, n: int, seed: int):
    """The request of ``n`` media units: ``n`` images of 256 tokens (tiny LLaVA), or a video of
    ``n`` frames, 32 tokens a frame (tiny Qwen2-VL, 224 pixels: 64 tokens per pair of frames)."""
    from hae_vllm.testing.scenario import RequestSpec

    if prompt == "video":
        return RequestSpec(VIDEO_QUESTION, videos=[seed], video_frames=n)
    return RequestSpec(QUESTION, list(range(seed, seed + n)))


def mm_limit(prompt_kind: str, units: int) -> dict:
    return {"video": 1} if prompt_kind == "video" else {"image": units}


def worker(method: str, mode: str, max_images: int, layers: int | None = None, prompt_kind: str = "images") -> None:
    """One engine; a JSON request per stdin line, a JSON reading per stdout line."""
    import importlib
    import tempfile

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    from hae_lab.tiny_models import long_context_path
    from hae_vllm.testing.scenario import RequestSpec, build_prompt

    kind = MODEL_KIND[prompt_kind]
    path = str(long_context_path(kind, POSITIONS, layers))
    trace = Path(tempfile.mkdtemp(prefix="hae_scaling_")) / "trace.jsonl"
    kwargs = dict(model=path, dtype="float32", max_model_len=POSITIONS, enforce_eager=True, block_size=32,
                  enable_prefix_caching=False, limit_mm_per_prompt=mm_limit(prompt_kind, max_images), seed=0,
                  max_num_batched_tokens=POSITIONS if mode == "oneshot" else CHUNK, max_num_seqs=1)
    if method != "none":
        kwargs["additional_config"] = {"kv_eviction": {"method": method, "trace_path": str(trace)}}
    llm = LLM(**kwargs)
    spent = [0.0]
    depth = [0]
    hook_peak = [0]  # KiB: the most resident memory any eviction hook call added while it ran
    for module, cls_name, name in HOOKS:
        cls = getattr(importlib.import_module(module), cls_name)
        orig = getattr(cls, name)

        def timed(*a, __orig=orig, **k):
            depth[0] += 1
            outer = depth[0] == 1
            if outer:
                rss = _status_kib("VmRSS")
                _reset_peak()
            t = time.perf_counter()
            try:
                return __orig(*a, **k)
            finally:
                depth[0] -= 1
                if outer:
                    spent[0] += time.perf_counter() - t
                    hook_peak[0] = max(hook_peak[0], _status_kib("VmHWM") - rss)

        setattr(cls, name, timed)
    sched = llm.llm_engine.engine_core.engine_core.scheduler
    sp = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, logprobs=1)
    warm = build_prompt(kind, media_request(prompt_kind, 2, 1), path)
    llm.generate([warm], sp, use_tqdm=False)
    print(MARK + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        prompt = build_prompt(kind, media_request(prompt_kind, cmd["images"], cmd["seed"]), path)
        freed0 = _freed(sched)
        seen = trace.stat().st_size if trace.exists() else 0
        spent[0] = 0.0
        hook_peak[0] = 0
        rss0 = _status_kib("VmRSS")
        _reset_peak()
        t = time.perf_counter()
        out = llm.generate([prompt], sp, use_tqdm=False)[0]
        wall = time.perf_counter() - t
        peak = _status_kib("VmHWM")
        evicted: list[int] = []
        if trace.exists():
            with trace.open() as f:
                f.seek(seen)
                for rec in map(json.loads, filter(str.strip, f.read().splitlines())):
                    if rec.get("kind", "prefill") == "prefill":
                        evicted = rec["evicted_positions"]
        comp = out.outputs[0]
        print(MARK + json.dumps({
            "wall_s": wall, "eviction_s": spent[0], "request_peak_kib": peak - rss0, "eviction_peak_kib": hook_peak[0],
            "prompt_tokens": len(out.prompt_token_ids), "blocks_freed": _freed(sched) - freed0,
            "token_ids": list(comp.token_ids),
            "logprobs": [lp[tok].logprob for tok, lp in zip(comp.token_ids, comp.logprobs)],
            "evicted_positions": evicted,
        }), flush=True)


def _freed(sched) -> int:
    """Blocks freed by prefill eviction so far (the eviction scheduler's counter; 0 for vanilla)."""
    stats = getattr(sched, "eviction_stats", None)
    return 0 if stats is None else int(stats.as_dict()["freed_blocks"])


# ------------------------------------------------------------------------------ controller


class Engine:
    """A worker process kept alive."""

    def __init__(self, method: str, mode: str, max_images: int, log, layers: int | None = None,
                 prompt_kind: str = "images") -> None:
        self.method = method
        # Every allocation of 16 KiB or more its own mapping, returned to the system when freed
        # (glibc), so the resident set follows what is allocated: eviction's transient tensors
        # show in it instead of reusing memory freed earlier.  (At 64 KiB, allocations of
        # 16-64 KiB came from heap memory freed earlier and did not show: MadaKV's reading at
        # 4k tokens was 1.35 MiB there, 1.6 here, and its fitted growth steeper.)  Both
        # engines run so.
        env = {**os.environ, "PYTHONPATH": str(REPO), "MALLOC_MMAP_THRESHOLD_": "16384"}
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", method, mode, str(max_images), str(layers or 0),
                                      prompt_kind],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        self._read()

    def _read(self) -> dict:
        while line := self.proc.stdout.readline():  # vLLM logs to stdout too
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        raise RuntimeError(f"{self.method} engine exited (exit {self.proc.wait()}); see the log")

    def run(self, images: int, seed: int) -> dict:
        self.proc.stdin.write(json.dumps({"images": images, "seed": seed}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=120)


def units_for(length: int, prompt_kind: str = "images") -> int:
    """Images (or video frames, in pairs) for a prompt of about ``length`` tokens."""
    if prompt_kind == "video":
        return 2 * max(1, round((length - 30) / (2 * FRAME_TOKENS)))
    return max(1, round((length - 20) / IMAGE_TOKENS))


def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def slope(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def oracle_check(rows: list[dict], max_tokens: int, layers: int | None = None, prompt_kind: str = "images") -> list[dict]:
    """Every measured request up to ``max_tokens`` prompt tokens (its first round) against the HF
    oracle with the engine's evicted positions removed."""
    from hae_lab.tiny_models import long_context_path
    from hae_vllm.testing.oracle import HFOracle
    from hae_vllm.testing.scenario import RequestSpec, build_prompt

    kind = MODEL_KIND[prompt_kind]
    path = str(long_context_path(kind, POSITIONS, layers))
    oracle = HFOracle(path, "float32")
    out = []
    for row in rows:
        for rec in row["oracle_inputs"]:
            if rec["prompt_tokens"] > max_tokens:
                continue
            p = build_prompt(kind, media_request(prompt_kind, rec["images"], rec["seed"]), path)
            media = next(iter(p["multi_modal_data"].values()))
            media = media if isinstance(media, list) else [media]
            ref = oracle.generate(p["prompt"], media, len(rec["token_ids"]), rec["evicted_positions"])
            diff = max(abs(a - b) for a, b in zip(ref.logprobs, rec["logprobs"]))
            ok = ref.token_ids == rec["token_ids"] and diff <= 1e-3
            out.append({"method": row["method"], "mode": row["mode"], "prompt_tokens": rec["prompt_tokens"],
                        "evicted": len(rec["evicted_positions"]), "ok": ok, "max_logprob_diff": diff})
    return out


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]) or None, sys.argv[6])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1000,4000,8000,16000,32000")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--modes", default="oneshot,chunked")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--oracle-max-tokens", type=int, default=4200)
    ap.add_argument("--prompt", choices=("images", "video"), default="images",
                    help="many-image prompts (tiny LLaVA) or one long video (tiny Qwen2-VL, M-RoPE)")
    ap.add_argument("--out", default=None, help="result file (default: benchmarks/results/scaling.json, "
                                                "scaling_video.json for --prompt video)")
    ap.add_argument("--log", default="/tmp/hae_scaling.log")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers of the tiny model (default: its 4); more repeats its layers, "
                         "for the TTFT ratio at a realistic depth (write to another --out)")
    args = ap.parse_args()
    if args.prompt == "video" and "chunked" in args.modes.split(","):
        # vLLM encodes a video whole and sizes its encoder cache from max_num_batched_tokens (and
        # its own per-video estimate, 14 frames): with 2048-token chunks it refuses a video of
        # more than 2048 tokens, eviction or not (VLLMValidationError, vanilla engine included).
        ap.error("--prompt video runs --modes oneshot only: vLLM refuses a video longer than the "
                 "2048-token chunk with chunked prefill (its encoder cache is sized by the chunk)")
    if args.out is None:
        args.out = str(RESULT if args.prompt == "images" else RESULT.with_name("scaling_video.json"))
    from hae_vllm.testing.scenario import environment_info

    lengths = [int(x) for x in args.lengths.split(",")]
    methods = [m for m in args.methods.split(",") if m != "none"]
    modes = args.modes.split(",")
    max_images = max(units_for(n, args.prompt) for n in lengths)
    rows = []
    t_start = time.time()
    seed = 1000
    with open(args.log, "a") as log:
        for mode in modes:
            base = Engine("none", mode, max_images, log, args.layers, args.prompt)
            for method in methods:
                eng = Engine(method, mode, max_images, log, args.layers, args.prompt)
                for length in lengths:
                    n = units_for(length, args.prompt)
                    pairs, oracle_inputs = [], []
                    seed += max_images + 1
                    for e in (base, eng):  # first request of this size in each engine: not measured
                        e.run(n, seed)
                    for r in range(args.rounds):
                        seed += max_images + 1
                        order = [eng, base] if r % 2 else [base, eng]
                        got = {e.method: e.run(n, seed) for e in order}
                        m, v = got[method], got["none"]
                        pairs.append({"wall_s": m["wall_s"], "none_wall_s": v["wall_s"], "eviction_s": m["eviction_s"],
                                      "extra_peak_mib": m["eviction_peak_kib"] / 1024,
                                      "request_peak_mib": m["request_peak_kib"] / 1024,
                                      "none_request_peak_mib": v["request_peak_kib"] / 1024,
                                      "blocks_freed": m["blocks_freed"], "prompt_tokens": m["prompt_tokens"]})
                        if r == 0:
                            oracle_inputs.append({**m, "seed": seed, "images": n})
                    ratios = [p["wall_s"] / p["none_wall_s"] for p in pairs]
                    row = {"method": method, "mode": mode, "length": length, "images": n,
                           "prompt_tokens": pairs[0]["prompt_tokens"], "rounds": pairs,
                           "ttft_ratio": statistics.median(ratios), "ttft_ratio_q": quartiles(ratios),
                           "wall_s": statistics.median(p["wall_s"] for p in pairs),
                           "none_wall_s": statistics.median(p["none_wall_s"] for p in pairs),
                           "eviction_share": statistics.median(p["eviction_s"] / p["wall_s"] for p in pairs),
                           "eviction_s": statistics.median(p["eviction_s"] for p in pairs),
                           "extra_peak_mib": statistics.median(p["extra_peak_mib"] for p in pairs),
                           "request_peak_over_none_mib": statistics.median(
                               p["request_peak_mib"] - p["none_request_peak_mib"] for p in pairs),
                           "blocks_freed": statistics.median(p["blocks_freed"] for p in pairs),
                           "oracle_inputs": oracle_inputs}
                    rows.append(row)
                    print(f"{mode:8s} {method:12s} {row['prompt_tokens']:6d} tokens: ttft x{row['ttft_ratio']:.3f} "
                          f"(q {row['ttft_ratio_q'][0]:.3f}-{row['ttft_ratio_q'][1]:.3f}) eviction "
                          f"{row['eviction_share']:.1%} extra peak {row['extra_peak_mib']:.1f} MiB "
                          f"freed {row['blocks_freed']:.0f} blocks", flush=True)
                eng.close()
            base.close()
    checks = oracle_check(rows, args.oracle_max_tokens, args.layers, args.prompt)
    for row in rows:
        row.pop("oracle_inputs")
    summary = summarize(rows, checks, lengths)
    result = {"benchmark": "scaling", "config": {**vars(args), "model": f"tiny {MODEL_KIND[args.prompt]}, {POSITIONS} positions, {args.layers or 4} layers",
                                                 "dtype": "float32", "chunk": CHUNK, "max_tokens": 2},
              "environment": environment_info(), "elapsed_s": time.time() - t_start,
              "rows": rows, "oracle": checks, "summary": summary}
    Path(args.out).write_text(json.dumps(result, indent=1))
    plot(result, Path(args.out).with_suffix(".png"))  # beside the result file
    s = summary
    print(f"max_prompt_tokens={s['max_prompt_tokens']} hae_ttft_ratio_at_max={s['hae_ttft_ratio_at_max']:.3f} "
          f"worst_ttft_ratio_at_max={s['worst_ttft_ratio_at_max']:.3f} worst_method={s['worst_method']} "
          f"eviction_peak_mib_at_max={s['eviction_peak_mib_at_max']:.1f} "
          f"memory_growth_exponent={s['memory_growth_exponent']:.2f} hf_oracle_match={str(s['hf_oracle_match']).lower()}")


def summarize(rows: list[dict], checks: list[dict], lengths: list[int]) -> dict:
    top = max(lengths)
    at_max = [r for r in rows if r["length"] == top]
    worst = max(at_max, key=lambda r: r["ttft_ratio"])
    hae = [r["ttft_ratio"] for r in at_max if r["method"] == "hae"]
    exponents = {}
    for key in {(r["method"], r["mode"]) for r in rows}:
        mine = sorted((r for r in rows if (r["method"], r["mode"]) == key), key=lambda r: r["length"])
        # Readings under 1 MiB are the allocator's page granularity, not a size to fit.
        fit = [r for r in mine if r["extra_peak_mib"] >= 1.0]
        if len(fit) >= 2 and fit[-1] is mine[-1]:
            exponents[f"{key[0]}/{key[1]}"] = slope([r["prompt_tokens"] for r in fit], [r["extra_peak_mib"] for r in fit])
    return {"max_prompt_tokens": max(r["prompt_tokens"] for r in rows),
            "hae_ttft_ratio_at_max": max(hae) if hae else float("nan"),
            "worst_ttft_ratio_at_max": worst["ttft_ratio"], "worst_method": f"{worst['method']}/{worst['mode']}",
            "eviction_peak_mib_at_max": max(r["extra_peak_mib"] for r in at_max),
            "memory_growth_exponents": exponents,
            "memory_growth_exponent": max(exponents.values()) if exponents else 0.0,
            "hf_oracle_match": bool(checks) and all(c["ok"] for c in checks)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    rows = result["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    for key in sorted({(r["method"], r["mode"]) for r in rows}):
        mine = sorted((r for r in rows if (r["method"], r["mode"]) == key), key=lambda r: r["length"])
        x = [r["prompt_tokens"] for r in mine]
        style = dict(color=colors[key[0]], linestyle="-" if key[1] == "oneshot" else "--",
                     marker="o" if key[1] == "oneshot" else "x", label=f"{key[0]} ({key[1]})")
        # Floors: a time the paired medians cannot tell from zero, memory under the page granularity.
        axes[0].plot(x, [max(r["wall_s"] - r["none_wall_s"], 1e-3) for r in mine], **style)
        axes[1].plot(x, [max(r["extra_peak_mib"], 0.1) for r in mine], **style)
    for ax, title in zip(axes, ["time added to the first token (s; floor 1 ms)", "eviction's extra peak memory (MiB; floor 0.1)"]):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    x = sorted({r["prompt_tokens"] for r in rows})
    none = [statistics.median(r["none_wall_s"] for r in rows if r["prompt_tokens"] == n) for n in x]
    axes[0].plot(x, none, "k:", label="vanilla prefill itself")
    axes[1].plot(x, [x_ / x[0] for x_ in x], "k:", label="linear (slope 1)")
    axes[0].legend(fontsize=6, ncol=2)
    axes[1].legend(fontsize=6, ncol=2)
    fig.suptitle("Eviction's cost against prompt length (tiny LLaVA, many-image prompts, CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
