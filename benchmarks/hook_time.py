"""Where eviction's prefill overhead goes: time spent in the worker's eviction hooks, in-process.

    python benchmarks/hook_time.py [--budget 1.0] [--num-requests 16] [--max-tokens 64]
    python benchmarks/hook_time.py --decode-budget 0.4 --budget 0.3 --max-tokens 256   # decode hooks too

With ``--decode-budget`` (HAE's decode stage: parking into the recycle bin) the decode hooks are
timed as well, and the result goes to ``hook_time_decode.json``: decode scoring (staging every
request's layer-0 query and key, and every ``score_interval`` steps the mass of the queued
queries), the first fill of each request's key row
from the paged cache alone, the per-request decode step (budget check, parking choice, bin, restore proposal) and ``after_forward`` (decode steps,
the parking swaps of all requests, and prefill compaction under memory pressure).  Per
request-step figures divide by the decode steps' request count.

Runs the overhead benchmark's workload (tiny LLaVA, one image per request) in one engine whose
core runs in this process, wraps the worker runtime's hooks with timers, and compares their time
with the model runner's ``execute_model`` and with the whole ``generate`` (after a warm-up
call).  Less noisy than end-to-end TTFT: both sides come from the same run; ``--repeats`` timed calls,
medians reported (calls are those of the last run).

Last line (both modes): scoring_ms=<layer scoring> planning_ms=<selection+compaction+copies> execute_ms=<...> generate_ms=<...>
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hae_vllm.testing.scenario import RequestSpec, build_prompt, environment_info  # noqa: E402

# _run_pending (scoring at selection, selection, planning and the KV copies of requests whose
# prefill ended, at the start of their first decode step) runs inside on_states_updated;
# bookkeeping excludes it.  "scoring" is what the forward spends (copying the scoring queries,
# or scoring requests too large to defer); "deferred_scoring", part of planning, is the scoring
# itself when it runs at selection.
# (module, class, method) -> what its time is reported as.
HOOKS = {("runtime", "EvictionRuntime", "score"): "scoring",
         ("prefill", "PrefillStage", "score_saved"): "deferred_scoring",
         ("prefill", "PrefillStage", "run_pending"): "planning",
         ("runtime", "EvictionRuntime", "on_states_updated"): "bookkeeping"}
# Decode eviction: "decode_scoring" is part of "scoring" (layer 0's hook), "decode_key_fill" part
# of "decode_scoring"; "decode_step" (one call per request and step) part of "after_forward".
DECODE_HOOKS = {("decode_stage", "DecodeStage", "score"): "decode_scoring",
                ("decode_stage", "DecodeStage", "fill_keys"): "decode_key_fill",
                ("decode_stage", "DecodeStage", "step"): "decode_step",
                ("runtime", "EvictionRuntime", "after_forward"): "after_forward",
                ("decode_stage", "DecodeStage", "apply_bin_updates"): "bin_updates"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=1.0)
    ap.add_argument("--num-requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="timed generate calls; medians are reported")
    ap.add_argument("--decode-budget", type=float, default=None,
                    help="also evict during decode and time its hooks (result: hook_time_decode.json)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from hae_lab.tiny_models import tiny_model_path
    import importlib

    spent: collections.Counter = collections.Counter()
    calls: collections.Counter = collections.Counter()

    def timed(cls, name, key):
        fn = getattr(cls, name)

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t
                calls[key] += 1
                if key == "decode_scoring":
                    calls["decode_request_steps"] += len(a[1])  # the step's decode tasks

        setattr(cls, name, wrapper)

    hooks = {**HOOKS, **(DECODE_HOOKS if args.decode_budget is not None else {})}
    for (module, cls, name), key in hooks.items():
        timed(getattr(importlib.import_module(f"hae_vllm.worker.{module}"), cls), name, key)
    eviction = {"method": "hae", "budget": args.budget}
    if args.decode_budget is not None:
        eviction["decode_budget"] = args.decode_budget
        eviction["decode_start"] = 0  # from the first step: every decode hook runs
    llm = LLM(model=str(tiny_model_path("llava")), dtype="float32", enforce_eager=True, block_size=32,
              max_num_batched_tokens=1024, seed=0,
              additional_config={"kv_eviction": eviction})
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    timed(type(runner), "execute_model", "execute_model")
    def batch(first_image: int):  # fresh images every call: nothing comes from the prefix cache
        return [build_prompt("llava", RequestSpec(text="Describe the picture.", images=[first_image + i]))
                for i in range(args.num_requests)]

    sp = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(batch(100)[:2], sp, use_tqdm=False)  # warm-up
    per_run = []
    for rep in range(args.repeats):
        reqs = batch(200 + 1000 * rep)
        spent.clear()
        calls.clear()
        t = time.perf_counter()
        llm.generate(reqs, sp, use_tqdm=False)
        per_run.append({"generate": time.perf_counter() - t, **spent})
        per_run[-1]["bookkeeping"] = per_run[-1].get("bookkeeping", 0.0) - per_run[-1].get("planning", 0.0)
    med = {k: statistics.median(r.get(k, 0.0) for r in per_run) for k in per_run[0]}
    ms = {k: round(v * 1e3, 2) for k, v in med.items() if k != "generate"}
    gen = med["generate"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "hook_time" if args.decode_budget is None else "hook_time_decode"
    extra = {}
    if args.decode_budget is not None:
        # Request-steps from the scoring calls' tasks (with score_interval k > 1 the per-request
        # decode step runs only when a request is scored).
        steps = calls.get("decode_request_steps", 0)
        extra["us_per_request_step"] = {
            k: round(med.get(k, 0.0) * 1e6 / max(steps, 1), 2)
            for k in ("decode_scoring", "decode_key_fill", "decode_step")}
    (out / f"{name}.json").write_text(json.dumps({
        "benchmark": name, "args": vars(args), "ms": ms, "calls": dict(calls), **extra,
        "generate_ms": round(gen * 1e3, 2), "runs_ms": [{k: round(v * 1e3, 2) for k, v in r.items()} for r in per_run],
        "machine": environment_info()}, indent=2))
    if extra:
        per = extra["us_per_request_step"]
        print(f"decode hooks over {steps} request-steps: decode_scoring_ms={ms.get('decode_scoring', 0.0)} "
              f"(first key fill {ms.get('decode_key_fill', 0.0)}) decode_step_ms={ms.get('decode_step', 0.0)} "
              f"after_forward_ms={ms.get('after_forward', 0.0)} bin_updates_ms={ms.get('bin_updates', 0.0)}; "
              f"per request-step: scoring {per['decode_scoring']} us, decode step {per['decode_step']} us")
    print(f"deferred scoring (part of planning): {ms.get('deferred_scoring', 0.0)} ms")
    print(f"scoring_ms={ms.get('scoring', 0.0)} planning_ms={ms.get('planning', 0.0)} "
          f"execute_ms={ms.get('execute_model', 0.0)} generate_ms={round(gen * 1e3, 2)}")


if __name__ == "__main__":
    main()
