"""A two-instance fleet behind a prefix-aware router: do follow-up turns reach the cache their
conversation left, with eviction on as without?

    python benchmarks/fleet.py [--conversations 12] [--turns 3] [--budget 0.4]

Two ``vllm serve`` instances of the tiny LLaVA on loopback, each publishing its KV-event stream
(``--kv-events-config``, ZMQ), and a router in this process (``hae_lab.router``) that replays
both streams as llm-d's precise prefix-cache scorer and Dynamo's KV router do: a request's
overlap with an instance is the longest chain of its block hashes (vLLM's own renderer and
hasher here) the instance announced, and it goes where Dynamo's cost - blocks to prefill there
plus blocks of the requests in flight there - is lowest.  The workload is
``benchmarks/multiturn.py``'s: conversations sharing a system prompt, an image with the first
question, every turn the whole conversation so far, conversations starting staggered and
running side by side.  Once with vanilla instances (``none``), once with ``--kv-eviction hae``;
the same requests, greedy.

Per request: the instance chosen, the prompt tokens the router matched there, the prompt
tokens the instance served from its cache (``usage.prompt_tokens_details.cached_tokens``).
``overpromised_frac``: the share of matched tokens the instance then did not serve.
``orphan_removes`` / ``orphan_parents``: removals of blocks the router did not hold / stored
blocks whose parent it did not hold, over both instances' streams (eviction run).

Last line: fleet_turn2_cached_frac=<x> none_fleet_turn2_cached_frac=<y> orphan_removes=<n>
orphan_parents=<m> overpromised_frac=<o> server_errors=<e>
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BLOCK_SIZE = 32


def conversation_messages(system: str, image_url: str, history: list[tuple[str, str]], question: str) -> list[dict]:
    msgs = [{"role": "system", "content": system}]
    for t, (q, a) in enumerate(history + [(question, None)]):
        content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": q}] if t == 0 else q
        msgs.append({"role": "user", "content": content})
        if a is not None:
            msgs.append({"role": "assistant", "content": a})
    return msgs


def run_fleet(mode: str, args, model: str, hasher, out_dir: Path) -> dict:
    import requests as http

    from hae_lab.conversation import QUESTIONS, SYSTEM
    from hae_lab.router import InstanceView, PrefixRouter
    from hae_lab.server import free_port, image_data_url, vllm_server

    common = ["--block-size", str(BLOCK_SIZE), "--max-model-len", "2048", "--enforce-eager",
              "--enable-prompt-tokens-details", "--max-num-seqs", "8"]
    if mode != "none":
        common += ["--kv-eviction", mode, "--kv-eviction-config", json.dumps({"budget": args.budget})]
    env = {"PYTHONHASHSEED": "0", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    if mode == "none":
        env["VLLM_PLUGINS"] = "lora_filesystem_resolver"  # an allow-list without ours: vanilla vLLM
    instances = []
    with ExitStack() as stack:
        for k in range(2):
            port = free_port()
            endpoint = f"tcp://127.0.0.1:{port}"
            cfg = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{port}", "topic": "kv"}
            log = out_dir / f"fleet_{mode}_{k}_server.log.tmp"
            base = stack.enter_context(vllm_server(model, common + ["--kv-events-config", json.dumps(cfg)], log,
                                                   timeout=300, env=env))
            instances.append(InstanceView(f"{mode}{k}", base, endpoint))
        router = PrefixRouter(instances, hasher, args.overlap_weight)
        stack.callback(router.close)
        time.sleep(1.0)  # the subscriptions are up before the first event
        records: list[dict] = []
        errors: list[str] = []
        lock = threading.Lock()

        def conversation(c: int) -> None:
            time.sleep(c * args.stagger_s)
            image = image_data_url(args.image_base + c)
            history: list[tuple[str, str]] = []
            prev = None
            for t in range(args.turns):
                q = QUESTIONS[t % len(QUESTIONS)]
                body = {"model": model, "messages": conversation_messages(SYSTEM, image, history, q),
                        "max_tokens": args.max_tokens, "temperature": 0}
                inst, matched, n_tokens, charged = router.route(body)
                t0 = time.perf_counter()
                try:
                    r = http.post(inst.base_url + "/v1/chat/completions", timeout=300, json=body)
                finally:
                    router.done(inst, charged)
                rec = {"conversation": c, "turn": t, "instance": inst.name, "previous_instance": prev,
                       "matched_tokens": matched * BLOCK_SIZE, "router_prompt_tokens": n_tokens,
                       "status": r.status_code, "latency_s": time.perf_counter() - t0}
                if r.status_code != 200:
                    with lock:
                        errors.append(f"{mode} c{c} t{t}: {r.status_code} {r.text[:200]}")
                        records.append(rec)
                    return
                body = r.json()
                usage = body["usage"]
                rec["prompt_tokens"] = usage["prompt_tokens"]
                rec["cached_tokens"] = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                answer = body["choices"][0]["message"]["content"] or ""
                history.append((q, answer))
                prev = inst.name
                with lock:
                    records.append(rec)
                time.sleep(args.think_s)  # the turn's events reach the router as a user reads

        threads = [threading.Thread(target=conversation, args=(c,)) for c in range(args.conversations)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        time.sleep(1.0)
        metrics = {}
        for inst in instances:
            text = http.get(inst.base_url + "/metrics").text
            metrics[inst.name] = {line.split(" ")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                                  if line.startswith(("vllm:hae_session_hits", "vllm:prefix_cache_hits_total",
                                                      "vllm:hae_freed_kv_blocks_total"))}
    ok = [r for r in records if r["status"] == 200]

    def cached_frac(turn: int) -> float | None:
        rs = [r for r in ok if r["turn"] == turn]
        return sum(r["cached_tokens"] for r in rs) / sum(r["prompt_tokens"] for r in rs) if rs else None

    matched = sum(r["matched_tokens"] for r in ok)
    over = sum(max(0, r["matched_tokens"] - r["cached_tokens"]) for r in ok)
    follow = [r for r in ok if r["turn"] > 0]
    return {
        "mode": mode, "records": sorted(records, key=lambda r: (r["conversation"], r["turn"])),
        "errors": errors, "server_errors": sum(1 for r in records if r["status"] >= 500),
        "cached_frac_per_turn": [cached_frac(t) for t in range(args.turns)],
        "matched_tokens": matched, "overpromised_tokens": over,
        "overpromised_frac": over / matched if matched else 0.0,
        "underpromised_tokens": sum(max(0, r["cached_tokens"] - r["matched_tokens"]) for r in ok),
        "follow_ups_on_previous_instance": sum(1 for r in follow if r["instance"] == r["previous_instance"]),
        "follow_ups": len(follow),
        "prompt_token_mismatches": sum(1 for r in ok if r["prompt_tokens"] != r["router_prompt_tokens"]),
        "instances": [{k: v for k, v in vars(i).items() if k != "live"} | {"live_blocks": len(i.live)}
                      for i in instances],
        "orphan_removes": sum(i.orphan_removes for i in instances),
        "orphan_parents": sum(i.orphan_parents for i in instances),
        "metrics": metrics,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="hae")
    ap.add_argument("--budget", type=float, default=0.4)
    ap.add_argument("--conversations", type=int, default=12)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--stagger-s", type=float, default=1.5, help="conversation c starts c x this after the first")
    ap.add_argument("--think-s", type=float, default=1.0, help="pause between a turn's answer and the next turn")
    ap.add_argument("--image-base", type=int, default=8100)
    ap.add_argument("--overlap-weight", type=float, default=4.0,
                    help="Dynamo's kv-overlap-score-weight (its default 1): what a block to prefill costs in active "
                         "blocks. 4: short answers, where a prefilled block costs more than holding one while answering")
    ap.add_argument("--tag", default="", help="suffix of the result file name")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    os.environ.setdefault("PYTHONHASHSEED", "0")
    from hae_lab.router import RequestHasher
    from hae_lab.tiny_models import tiny_model_path
    from hae_vllm.testing.scenario import environment_info

    model = str(tiny_model_path("llava"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    hasher = RequestHasher(model, BLOCK_SIZE)
    runs = {mode: run_fleet(mode, args, model, hasher, out) for mode in ("none", args.method)}
    none, meth = runs["none"], runs[args.method]
    summary = {"benchmark": "fleet", "args": vars(args), "block_size": BLOCK_SIZE, "runs": runs,
               "wall_s": time.time() - t0, "machine": environment_info()}
    (out / f"fleet_{args.method}{args.tag}.json").write_text(json.dumps(summary, indent=2))
    for e in none["errors"] + meth["errors"]:
        print("error:", e)
    for mode, r in runs.items():
        print(f"{mode}: cached per turn {[round(x, 3) if x is not None else None for x in r['cached_frac_per_turn']]} "
              f"follow-ups on their previous instance {r['follow_ups_on_previous_instance']}/{r['follow_ups']} "
              f"overpromised {r['overpromised_frac']:.3f} orphans {r['orphan_removes']}/{r['orphan_parents']} "
              f"prompt-token mismatches {r['prompt_token_mismatches']}")
    t2 = 1 if args.turns > 1 else 0
    print(f"fleet_turn2_cached_frac={meth['cached_frac_per_turn'][t2]:.4f} "
          f"none_fleet_turn2_cached_frac={none['cached_frac_per_turn'][t2]:.4f} "
          f"orphan_removes={meth['orphan_removes']} orphan_parents={meth['orphan_parents']} "
          f"overpromised_frac={meth['overpromised_frac']:.4f} server_errors={meth['server_errors']}")


if __name__ == "__main__":
    main()
