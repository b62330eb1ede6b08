"""Soak test of `vllm serve --kv-eviction hae` under concurrent, partly hostile load.

    python benchmarks/soak.py [--requests 500] [--concurrency 8]

Starts the server on 127.0.0.1 with a small KV pool (so preemption happens), then drives
requests with the official ``openai`` client from concurrent workers: streaming and not,
clients that disconnect mid-stream, image / two-image / text-only prompts, random per-request
knobs including invalid ones.  Every request must complete or get a 4xx with a message before
its response starts (an invalid knob on a stream is an HTTP 400, as vLLM answers invalid
parameters; an error event inside a started stream counts as a server error); no 5xx; the
server must stay up; KV usage must return to its baseline (read from /metrics).

Last line: requests=<n> ok=<n> client_errors=<n> server_errors=<n> leaked_blocks=<n>
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VALID_KNOBS = [
    {},
    {"kv_eviction_budget": 0.3},
    {"kv_eviction_budget": 0.8},
    {"kv_eviction": "none"},
    {"kv_eviction": "snapkv", "kv_eviction_budget": 0.5},
    {"kv_eviction_decode_budget": 0.5},
    {"kv_eviction": "streamingllm", "kv_eviction_budget": 0.4},
]
INVALID_KNOBS = [
    {"kv_eviction_budget": 2.0},
    {"kv_eviction_budget": "half"},
    {"kv_eviction": "bogus"},
    {"kv_eviction_sinks": 3},
    {"kv_eviction_decode_budget": 0},
]


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            return float(line.rsplit(" ", 1)[1])
    return None


def num_blocks(text: str) -> int | None:
    m = re.search(r'vllm:cache_config_info\{[^}]*num_gpu_blocks="(\d+)"', text)
    return int(m.group(1)) if m else None


async def run_load(base: str, model: str, n: int, concurrency: int, seed: int) -> dict:
    import httpx
    import openai

    from hae_lab.server import image_data_url

    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=300)
    images = [image_data_url(i) for i in range(6)]
    counts = {"ok": 0, "client_errors": 0, "server_errors": 0, "late_errors": 0, "disconnects": 0,
              "unexpected_ok": 0}
    errors: list[str] = []
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def one(i: int) -> None:
        r = random.Random(seed * 100003 + i)
        kind = r.choice(["image", "image", "two_images", "text"])
        parts = []
        if kind != "text":
            parts += [{"type": "image_url", "image_url": {"url": images[r.randrange(6)]}}
                      for _ in range(1 if kind == "image" else 2)]
        parts.append({"type": "text", "text": r.choice(["What is here?", "Describe it.", "Tell me a story."])})
        invalid = r.random() < 0.1
        knobs = r.choice(INVALID_KNOBS if invalid else VALID_KNOBS)
        stream = r.random() < 0.4
        disconnect = stream and r.random() < 0.3
        kw = dict(model=model, messages=[{"role": "user", "content": parts}], max_tokens=r.choice([4, 8, 24]),
                  temperature=0, extra_body={"vllm_xargs": knobs} if knobs else None)
        try:
            if stream:
                s = await client.chat.completions.create(stream=True, **kw)
                got = 0
                async for _chunk in s:
                    got += 1
                    if disconnect and got >= 2:
                        await s.close()
                        counts["disconnects"] += 1
                        break
            else:
                await client.chat.completions.create(**kw)
            if invalid:
                counts["unexpected_ok"] += 1
                errors.append(f"{i}: invalid knobs {knobs} accepted")
            counts["ok"] += 1
        except openai.APIStatusError as e:
            if 400 <= e.status_code < 500:
                counts["client_errors"] += 1
                if not invalid:
                    errors.append(f"{i}: {e.status_code} for valid knobs {knobs}: {e.message[:200]}")
            else:
                counts["server_errors"] += 1
                errors.append(f"{i}: {e.status_code}: {e.message[:200]}")
        except (openai.APIConnectionError, httpx.HTTPError) as e:
            counts["server_errors"] += 1
            errors.append(f"{i}: connection error {e!r}"[:300])
        except openai.APIError as e:
            # An error event inside a stream that already answered 200: a request refused
            # after its response started is a server fault, whatever code the event carries.
            counts["server_errors"] += 1
            counts["late_errors"] += 1
            errors.append(f"{i}: error inside a started stream (knobs {knobs}): {e!r}"[:300])

    async def worker() -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            await one(i)

    t0 = time.time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    counts["elapsed_s"] = time.time() - t0
    counts["errors"] = errors[:50]
    await client.close()
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--num-gpu-blocks", type=int, default=96, help="small KV pool so capacity binds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto", help="model dtype (vLLM's default: bfloat16 on the CPU)")
    ap.add_argument("--tag", default="", help="result file suffix: soak[_TAG].json")
    ap.add_argument("--vanilla", action="store_true",
                    help="vanilla vLLM (hae_vllm's plugin not loaded; eviction knobs are ignored, so invalid "
                         "ones succeed): to tell the engine's own failures from eviction's")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    import requests as http

    from hae_vllm.testing.scenario import environment_info
    from hae_lab.server import is_alive, vllm_server
    from hae_lab.tiny_models import tiny_model_path

    model = str(tiny_model_path("llava"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    serve_args = ([] if args.vanilla else ["--kv-eviction", "hae"]) + ["--dtype", args.dtype, "--max-model-len", "1024", "--enforce-eager",
                  "--max-num-seqs", str(max(8, args.concurrency)), "--num-gpu-blocks-override", str(args.num_gpu_blocks),
                  "--limit-mm-per-prompt", '{"image": 2}']
    import os

    if args.vanilla:
        os.environ["VLLM_PLUGINS"] = "lora_filesystem_resolver"  # an allow-list without ours
    log_path = out / f"soak{'_' + args.tag if args.tag else ''}_server.log.tmp"
    with vllm_server(model, serve_args, log_path) as base:
        m0 = http.get(base + "/metrics").text
        usage0 = metric(m0, "vllm:kv_cache_usage_perc") or 0.0
        counts = asyncio.run(run_load(base, model, args.requests, args.concurrency, args.seed))
        # Wait for the engine to drain (aborted streams finish asynchronously).
        for _ in range(60):
            m1 = http.get(base + "/metrics").text
            if (metric(m1, "vllm:num_requests_running") or 0) == 0 and (metric(m1, "vllm:num_requests_waiting") or 0) == 0:
                break
            time.sleep(1)
        time.sleep(2)
        m1 = http.get(base + "/metrics").text
        usage1 = metric(m1, "vllm:kv_cache_usage_perc") or 0.0
        total = num_blocks(m1) or args.num_gpu_blocks
        leaked = round((usage1 - usage0) * (total - 1))
        alive = is_alive(base)
        if not alive:
            counts["server_errors"] += 1
        freed = metric(m1, "vllm:hae_freed_kv_blocks_total")
    # vLLM's own P0/P1 multimodal cache drift (answered with a retryable 500), counted from the log.
    log_text = log_path.read_text()
    drift = log_text.count("Multi-modal cache miss")
    # ... and the requests eviction's server rendered again with their data and re-submitted.
    resubmitted = log_text.count("rendered again with its data and re-submitted")
    cmd = ["vllm", "serve", model, *serve_args]
    summary = {"benchmark": "soak", "args": vars(args), "server_cmd": cmd, "counts": counts, "server_alive": alive,
               "kv_usage_before": usage0, "kv_usage_after": usage1, "num_gpu_blocks": total, "leaked_blocks": leaked,
               "hae_freed_kv_blocks_total": freed, "mm_cache_drift_events": drift,
               "mm_resubmitted": resubmitted, "vanilla": args.vanilla,
               "machine": environment_info()}
    (out / f"soak{'_' + args.tag if args.tag else ''}.json").write_text(json.dumps(summary, indent=2))
    for e in counts["errors"][:10]:
        print("error:", e)
    print(f"elapsed={counts['elapsed_s']:.0f}s disconnects={counts['disconnects']} late_errors={counts['late_errors']} "
          f"mm_cache_drift={drift} mm_resubmitted={resubmitted} unexpected_ok={counts['unexpected_ok']} "
          f"freed_blocks={freed} alive={alive}")
    print(f"requests={args.requests} ok={counts['ok']} client_errors={counts['client_errors']} "
          f"server_errors={counts['server_errors']} leaked_blocks={leaked}")


if __name__ == "__main__":
    main()
