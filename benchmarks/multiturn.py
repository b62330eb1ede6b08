"""Multi-turn image chat with prefix caching: what eviction costs a chat service per turn.

    python benchmarks/multiturn.py [--method hae] [--budget 0.4] [--conversations 8] [--turns 3]

Conversations share a system prompt; each has its own image (``--images`` per conversation)
and ``--turns`` turns; every turn's prompt is the whole conversation so far (system prompt,
earlier questions and answers, as chat clients send it).  The conversations are interleaved:
turn t of all of them is one batch.  The same conversations run on an engine without eviction
(``none``) and on one with the method, each in its own process, prefix caching on.  Per turn:
the share of prompt tokens served from the prefix cache (``RequestOutput.num_cached_tokens``),
prompt tokens computed, median TTFT; per engine the peak KV blocks in use (read from the block
pool after every ``schedule()``).  The method's turn-2 requests are replayed on the HF oracle
with the evictions from the trace.

Last line: turn2_cached_frac=<x> none_turn2_cached_frac=<y> prompt_tokens_computed_ratio=<method/none>
peak_kv_blocks_ratio=<method/none> hf_oracle_match=<true|false>
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the user's questions about the pictures it is shown. ")
QUESTIONS = ["Describe the picture.", "Which shape is the largest?", "What colour is it?", "Anything else?"]


def conversation_prompt(history: list[tuple[str, str]], question: str, num_images: int) -> str:
    """Tiny LLaVA's raw chat format: the images come with the first question."""
    text = SYSTEM
    for t, (q, a) in enumerate(history):
        text += "USER: " + ("<image>\n" * num_images if t == 0 else "") + q + " ASSISTANT: " + a + " "
    text += "USER: " + ("<image>\n" * num_images if not history else "") + question + " ASSISTANT:"
    return text


def run_engine(args, method: str, trace_path: str | None) -> dict:
    """One engine, every turn of every conversation (runs in its own process)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from hae_vllm.testing.scenario import _Instruments
    from hae_vllm.testing.tiny_models import make_test_image, tiny_model_path

    eviction = {"method": method}
    if method != "none":
        eviction["budget"] = args.budget
        if trace_path:
            eviction["trace_path"] = trace_path
    llm = LLM(model=str(tiny_model_path("llava")), dtype=args.dtype, max_model_len=4096, enforce_eager=True,
              block_size=32, enable_prefix_caching=True, seed=0, disable_log_stats=False,
              limit_mm_per_prompt={"image": args.images}, additional_config={"kv_eviction": eviction})
    inst = _Instruments(llm)
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    images = [[make_test_image(7000 + 10 * c + j, 224) for j in range(args.images)] for c in range(args.conversations)]
    history: list[list[tuple[str, str]]] = [[] for _ in range(args.conversations)]
    turns = []
    for t in range(args.turns):
        q = QUESTIONS[t % len(QUESTIONS)]
        prompts = [{"prompt": conversation_prompt(history[c], q, args.images),
                    "multi_modal_data": {"image": images[c] if args.images > 1 else images[c][0]}}
                   for c in range(args.conversations)]
        outs = llm.generate(prompts, sp, use_tqdm=False)
        reqs = []
        for c, o in enumerate(outs):
            history[c].append((q, o.outputs[0].text.strip()))
            m = o.metrics
            reqs.append({"request_id": o.request_id, "prompt": prompts[c]["prompt"], "conversation": c,
                         "prompt_tokens": len(o.prompt_token_ids), "cached_tokens": o.num_cached_tokens or 0,
                         "token_ids": list(o.outputs[0].token_ids),
                         "ttft_s": float(m.first_token_latency) if m is not None else None})
        turns.append(reqs)
    readings = inst.readings(time.perf_counter())
    return {"turns": turns, "peak_blocks_in_use": readings["peak_blocks_in_use"]}


def in_subprocess(args, method: str, trace_path: str | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        cmd = [sys.executable, __file__, "--_engine", method, "--_out", str(out), "--_trace", trace_path or "",
               "--conversations", str(args.conversations), "--turns", str(args.turns), "--images", str(args.images),
               "--max-tokens", str(args.max_tokens), "--budget", str(args.budget), "--dtype", args.dtype]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"{method} engine failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())


def per_turn(rec: dict) -> list[dict]:
    rows = []
    for reqs in rec["turns"]:
        prompt = sum(r["prompt_tokens"] for r in reqs)
        cached = sum(r["cached_tokens"] for r in reqs)
        ttfts = [r["ttft_s"] for r in reqs if r["ttft_s"] is not None]
        rows.append({"cached_frac": cached / prompt, "prompt_tokens": prompt, "computed_tokens": prompt - cached,
                     "median_ttft_s": statistics.median(ttfts) if ttfts else None})
    return rows


def oracle_check(rec: dict, trace: list[dict], images: int, dtype: str, turn: int = 1) -> tuple[bool, list[dict]]:
    """Turn ``turn``'s requests against the HF oracle with the positions the engine evicted."""
    from hae_vllm.testing.oracle import HFOracle
    from hae_vllm.testing.tiny_models import make_test_image, tiny_model_path

    oracle = HFOracle(str(tiny_model_path("llava")), dtype=dtype)
    checks = []
    for r in rec["turns"][turn]:
        evicted = [t["evicted_positions"] for t in trace
                   if t.get("kind", "prefill") == "prefill" and t.get("tp_rank", 0) == 0
                   and (t["request_id"] == r["request_id"] or t["request_id"].rsplit("-", 1)[0] == r["request_id"])]
        imgs = [make_test_image(7000 + 10 * r["conversation"] + j, 224) for j in range(images)]
        ref = oracle.generate(r["prompt"], imgs, len(r["token_ids"]), evicted[-1] if evicted else [])
        ok = ref.token_ids == r["token_ids"]
        checks.append({"request_id": r["request_id"], "evicted": len(evicted[-1]) if evicted else 0, "tokens_equal": ok})
    return bool(checks) and all(c["tokens_equal"] for c in checks), checks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="hae")
    ap.add_argument("--budget", type=float, default=0.4)
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--images", type=int, default=1, help="images per conversation (1 or 2)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--dtype", default="float32", help="float32: the oracle check is exact")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    ap.add_argument("--_engine", help=argparse.SUPPRESS)
    ap.add_argument("--_out", help=argparse.SUPPRESS)
    ap.add_argument("--_trace", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._engine:
        Path(args._out).write_text(json.dumps(run_engine(args, args._engine, args._trace or None)))
        return
    from hae_vllm.testing.scenario import environment_info

    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        trace_path = str(Path(tmp) / "trace.jsonl")
        base = in_subprocess(args, "none", None)
        meth = in_subprocess(args, args.method, trace_path)
        trace = [json.loads(line) for line in Path(trace_path).read_text().splitlines() if line.strip()] \
            if os.path.exists(trace_path) else []
    rows_none, rows_meth = per_turn(base), per_turn(meth)
    oracle_ok, checks = oracle_check(meth, trace, args.images, args.dtype) if args.turns > 1 else (False, [])
    computed_ratio = sum(r["computed_tokens"] for r in rows_meth) / sum(r["computed_tokens"] for r in rows_none)
    peak_ratio = meth["peak_blocks_in_use"] / base["peak_blocks_in_use"]
    summary = {
        "benchmark": "multiturn", "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "per_turn": {"none": rows_none, args.method: rows_meth},
        "peak_blocks_in_use": {"none": base["peak_blocks_in_use"], args.method: meth["peak_blocks_in_use"]},
        "prompt_tokens_computed_ratio": computed_ratio, "peak_kv_blocks_ratio": peak_ratio,
        "hf_oracle_match": oracle_ok, "oracle": checks, "wall_s": time.time() - t0, "machine": environment_info(),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"multiturn_{args.method}.json").write_text(json.dumps(summary, indent=2))
    for name, rows in (("none", rows_none), (args.method, rows_meth)):
        print(name, " ".join(f"turn{t + 1}: cached {r['cached_frac']:.2f} computed {r['computed_tokens']}"
                             for t, r in enumerate(rows)))
    t2 = 1 if args.turns > 1 else 0
    print(f"turn2_cached_frac={rows_meth[t2]['cached_frac']:.4f} none_turn2_cached_frac={rows_none[t2]['cached_frac']:.4f} "
          f"prompt_tokens_computed_ratio={computed_ratio:.4f} peak_kv_blocks_ratio={peak_ratio:.4f} "
          f"hf_oracle_match={str(oracle_ok).lower()}")


if __name__ == "__main__":
    main()
