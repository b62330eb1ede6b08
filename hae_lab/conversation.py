"""Multi-turn image chats on an in-process engine, recorded for the oracle and the benchmark.

Conversations share a system prompt; each has its own image(s), sent with the first question,
and every turn's prompt is the whole conversation so far (system prompt, earlier questions
and answers), as chat clients send it.  Turn ``t`` of every conversation is one batch.  Per
request the record keeps what the oracle needs (prompt, tokens, log-probs, trace events) and
the scheduler's view of its blocks: the block ids it started with (the prefix-cache or
conversation hit included, holes as 0) and the ids it held when freed.

    record = run_in_subprocess(ConversationSpec(method="hae", budget=0.4, turns=3))
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
          "helpful, detailed, and polite answers to the user's questions about the pictures it is shown. ")
QUESTIONS = ["Describe the picture.", "Which shape is the largest?", "What colour is it?", "Anything else?"]


@dataclass
class ConversationSpec:
    method: str = "hae"
    budget: float | None = 0.4
    conversations: int = 2
    turns: int = 3
    images: int = 1  # per conversation, with its first question
    max_tokens: int = 16
    dtype: str = "float32"
    block_size: int = 32
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: int | None = None
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    max_model_len: int = 4096
    tensor_parallel_size: int = 1
    eviction: dict = field(default_factory=dict)  # more engine-wide eviction settings
    extra_args: dict = field(default_factory=dict)  # per-request knobs (vllm_xargs)
    # Unrelated requests (fresh images) run between turns: they reuse free blocks.
    filler_between_turns: int = 0
    # Staggered arrivals: conversation c starts at round c % turns, so from round turns - 1
    # on every batch mixes conversations at every turn (a chat service's steady state: new
    # conversations arrive while others continue); otherwise turn t of every conversation is
    # one batch (every prompt's prefill at once: the worst case for eviction's peak).
    stagger: bool = False
    image_base: int = 7000
    env: dict = field(default_factory=dict)  # extra environment for the engine process
    engine_kwargs: dict = field(default_factory=dict)  # more vllm.LLM(...) arguments
    # vLLM's KV-event stream on (--kv-events-config, no publisher): every event the scheduler
    # takes from its KV cache manager is recorded (``kv_events``), as a router would receive it.
    kv_events: bool = False


def conversation_prompt(history: list[tuple[str, str]], question: str, num_images: int) -> str:
    """Tiny LLaVA's raw chat format: the images come with the first question."""
    text = SYSTEM
    for t, (q, a) in enumerate(history):
        text += "USER: " + ("<image>\n" * num_images if t == 0 else "") + q + " ASSISTANT: " + a + " "
    text += "USER: " + ("<image>\n" * num_images if not history else "") + question + " ASSISTANT:"
    return text


def image_seeds(spec: ConversationSpec, conv: int) -> list[int]:
    return [spec.image_base + 10 * conv + j for j in range(spec.images)]


def run(spec: ConversationSpec, trace_path: str | None) -> dict[str, Any]:
    """Every turn of every conversation on one engine in this process."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams

    from hae_vllm.testing.scenario import EngineInstruments
    from hae_lab.tiny_models import make_test_image, tiny_model_path

    eviction: dict[str, Any] = {"method": spec.method, **spec.eviction}
    if spec.method != "none":
        if spec.budget is not None:
            eviction["budget"] = spec.budget
        if trace_path:
            eviction["trace_path"] = trace_path
    kwargs: dict[str, Any] = dict(
        model=str(tiny_model_path("llava")), dtype=spec.dtype, max_model_len=spec.max_model_len, enforce_eager=True,
        block_size=spec.block_size, enable_prefix_caching=spec.enable_prefix_caching, seed=0,
        disable_log_stats=False, limit_mm_per_prompt={"image": max(spec.images, 1)},
        additional_config={"kv_eviction": eviction})
    if spec.tensor_parallel_size > 1:
        kwargs["tensor_parallel_size"] = spec.tensor_parallel_size
        kwargs["distributed_executor_backend"] = "mp"
    for name in ("num_gpu_blocks_override", "max_num_batched_tokens", "max_num_seqs"):
        if getattr(spec, name) is not None:
            kwargs[name] = getattr(spec, name)
    if spec.kv_events:
        from vllm.config import KVEventsConfig

        kwargs["kv_events_config"] = KVEventsConfig(enable_kv_cache_events=True, publisher="null")
    llm = LLM(**{**kwargs, **spec.engine_kwargs})
    inst = EngineInstruments(llm)
    events = _EventLog(inst.sched) if spec.kv_events else None
    blocks = _BlockLog(inst.sched)
    sp = SamplingParams(max_tokens=spec.max_tokens, temperature=0.0, ignore_eos=True, logprobs=1,
                        extra_args=dict(spec.extra_args) or None)
    images = [[make_test_image(s, 224) for s in image_seeds(spec, c)] for c in range(spec.conversations)]
    history: list[list[tuple[str, str]]] = [[] for _ in range(spec.conversations)]
    done: dict[tuple[int, int], dict] = {}
    filler_seed = spec.image_base + 5000
    offset = (lambda c: c % spec.turns) if spec.stagger else (lambda c: 0)
    rounds = spec.turns + max(offset(c) for c in range(spec.conversations))
    for rnd in range(rounds):
        batch = [(c, rnd - offset(c)) for c in range(spec.conversations) if 0 <= rnd - offset(c) < spec.turns]
        prompts = [{"prompt": conversation_prompt(history[c], QUESTIONS[t % len(QUESTIONS)], spec.images),
                    "multi_modal_data": {"image": images[c] if spec.images > 1 else images[c][0]}}
                   for c, t in batch]
        outs = llm.generate(prompts, sp, use_tqdm=False)
        for (c, t), prompt, o in zip(batch, prompts, outs):
            out = o.outputs[0]
            history[c].append((QUESTIONS[t % len(QUESTIONS)], out.text.strip()))
            m = o.metrics
            done[(c, t)] = {
                "request_id": o.request_id, "conversation": c, "turn": t, "round": rnd, "prompt": prompt["prompt"],
                "image_seeds": image_seeds(spec, c), "prompt_token_ids": list(o.prompt_token_ids),
                "prompt_tokens": len(o.prompt_token_ids), "cached_tokens": o.num_cached_tokens or 0,
                "token_ids": list(out.token_ids),
                "logprobs": [float(lp[tok].logprob) for tok, lp in zip(out.token_ids, out.logprobs or [])],
                "ttft_s": float(m.first_token_latency) if m is not None else None,
            }
        if spec.filler_between_turns and rnd + 1 < rounds:
            filler = [{"prompt": conversation_prompt([], "Tell me a story about it.", 1),
                       "multi_modal_data": {"image": make_test_image(filler_seed + i, 224)}}
                      for i in range(spec.filler_between_turns)]
            filler_seed += spec.filler_between_turns
            llm.generate(filler, SamplingParams(max_tokens=spec.max_tokens, temperature=0.0, ignore_eos=True,
                                                extra_args={"kv_eviction": "none"}), use_tqdm=False)
    turns = [[done[(c, t)] for c in range(spec.conversations)] for t in range(spec.turns)]
    readings = inst.readings(time.perf_counter())
    sched = inst.sched
    for reqs in turns:
        for r in reqs:
            eng = blocks.engine_id(r["request_id"])
            r["engine_request_id"] = eng
            r["blocks_at_start"] = blocks.at_start.get(eng)
            r["blocks_at_free"] = blocks.at_free.get(eng)
    stats = getattr(sched, "eviction_stats", None)
    pool = inst.pool
    return {
        "spec": asdict(spec), "turns": turns, "peak_blocks_in_use": readings["peak_blocks_in_use"],
        "free_blocks_before": readings["free_blocks_before"], "free_blocks_after": readings["free_blocks_after"],
        "num_gpu_blocks": pool.num_gpu_blocks,
        "blocks_with_refs_after": sum(1 for b in pool.blocks[1:] if b.ref_cnt != 0),
        "eviction_stats": stats.as_dict() if stats is not None else None,
        "kv_events": events.events if events is not None else None,
    }


class _EventLog:
    """The KV events the scheduler publishes (what it takes from its KV cache manager, after
    eviction's own stream), as plain dicts, and between them each request's arrival with its
    block hashes (``{"type": "Arrival"}``: where a router would have placed it)."""

    def __init__(self, sched) -> None:
        from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

        self.events: list[dict] = []
        take, add = sched.kv_cache_manager.take_events, sched.add_request

        def take_events():
            out = take()
            self.events += [kv_event_dict(e) for e in out]
            return out

        def add_request(request, *args, **kwargs):
            self.events.append({"type": "Arrival", "request_id": request.request_id,
                                "block_hashes": [maybe_convert_block_hash(h) for h in request.block_hashes]})
            return add(request, *args, **kwargs)

        sched.kv_cache_manager.take_events = take_events
        sched.add_request = add_request


def router_matches(events: list[dict]) -> dict[str, int]:
    """Per request of an :class:`_EventLog`, the blocks a prefix-aware router replaying the
    stream matched when it arrived (the longest announced chain of its block hashes)."""
    live: set = set()
    matches = {}
    for e in events:
        if e["type"] == "Arrival":
            n = 0
            while n < len(e["block_hashes"]) and e["block_hashes"][n] in live:
                n += 1
            matches[e["request_id"]] = n
        else:
            _, _, live = replay_kv_events([e], live)
    return matches


def kv_event_dict(event) -> dict:
    """A vLLM KV event as a router reads it: its type, block hashes and (stored) parent hash."""
    out = {"type": type(event).__name__, "block_hashes": list(getattr(event, "block_hashes", []))}
    if out["type"] == "BlockStored":
        out["parent"] = event.parent_block_hash
        out["session_id"] = event.session_id
    return out


def replay_kv_events(events: list[dict], live: set | None = None) -> tuple[list, int, set]:
    """A prefix-aware router's ledger over ``events`` (:func:`kv_event_dict`), from the blocks
    ``live`` it already knows: (what no faithful stream does - a stored block whose parent is
    not live, a removal of a block not announced or already removed -, removals seen, the
    blocks live after)."""
    live = set() if live is None else set(live)
    problems, removed = [], 0
    for e in events:
        if e["type"] == "BlockStored":
            if e["parent"] is not None and e["parent"] not in live:
                problems.append(("orphan store", e))
            live.update(e["block_hashes"])
        elif e["type"] == "BlockRemoved":
            removed += len(e["block_hashes"])
            problems += [("removal of a block never announced or already removed", h)
                         for h in e["block_hashes"] if h not in live]
            live.difference_update(e["block_hashes"])
        elif e["type"] == "AllBlocksCleared":
            live.clear()
    return problems, removed, live


class _BlockLog:
    """The scheduler's block ids of each request: right after the ``schedule()`` that first
    gave it blocks (its hit included), and just before they were freed."""

    def __init__(self, sched) -> None:
        self.at_start: dict[str, list[int]] = {}
        self.at_free: dict[str, list[int]] = {}
        mgr = sched.kv_cache_manager.coordinator.single_type_managers[0]
        orig_schedule, orig_free = sched.schedule, sched._free_request_blocks

        def schedule(*a, **k):
            out = orig_schedule(*a, **k)
            for new in out.scheduled_new_reqs:
                self.at_start[new.req_id] = [b.block_id for b in mgr.req_to_blocks.get(new.req_id, [])]
            return out

        def free(request):
            self.at_free[request.request_id] = [b.block_id for b in mgr.req_to_blocks.get(request.request_id, [])]
            return orig_free(request)

        sched.schedule = schedule
        sched._free_request_blocks = free

    def engine_id(self, request_id: str) -> str | None:
        """Engine-internal ids carry a suffix (``<id>-<random>``)."""
        for eng in self.at_start:
            if eng == request_id or eng.rsplit("-", 1)[0] == request_id:
                return eng
        return None


def attach_trace(record: dict[str, Any], trace: list[dict[str, Any]]) -> None:
    """Each request's rank-0 trace records (prefill decisions, session starts)."""
    for reqs in record["turns"]:
        for r in reqs:
            eng = r.get("engine_request_id") or r["request_id"]
            r["trace"] = [t for t in trace if t.get("tp_rank", 0) == 0 and t["request_id"] == eng]


def run_in_subprocess(spec: ConversationSpec, timeout: float = 1200) -> dict[str, Any]:
    """:func:`run` in a fresh Python process, its trace attached."""
    with tempfile.TemporaryDirectory(prefix="hae_conv_") as tmp:
        out = Path(tmp) / "out.json"
        trace_path = Path(tmp) / "trace.jsonl"
        (Path(tmp) / "spec.json").write_text(json.dumps(asdict(spec)))
        env = {**os.environ, **spec.env}
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if spec.tensor_parallel_size > 1:
            env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"  # one core per CPU worker
        from hae_vllm.testing.scenario import launcher

        proc = launcher()([sys.executable, "-m", "hae_lab.conversation", str(Path(tmp) / "spec.json"),
                               str(out), str(trace_path)], env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"conversation run failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
        record = json.loads(out.read_text())
        trace = [json.loads(x) for x in trace_path.read_text().splitlines() if x.strip()] if trace_path.exists() else []
    attach_trace(record, trace)
    return record


def oracle_check(record: dict[str, Any], oracle, tolerance) -> list[dict[str, Any]]:
    """Every request of every conversation against :class:`~hae_vllm.testing.oracle.SessionReplay`,
    turn after turn on one HF cache per conversation.  A request that started from a session
    must have started from its own conversation's previous turn (or from itself, resumed)."""
    from hae_vllm.testing.oracle import SessionReplay, compare_with_oracle, session_events
    from hae_lab.tiny_models import make_test_image

    by_conv: dict[int, list[dict]] = {}
    for reqs in record["turns"]:
        for r in reqs:
            by_conv.setdefault(r["conversation"], []).append(r)
    checks = []
    for conv, reqs in sorted(by_conv.items()):
        replay = SessionReplay(oracle)
        prev = None
        for r in reqs:
            events = session_events(r.get("trace", []))
            problem = None
            for t in r.get("trace", []):
                if t.get("kind") == "session" and t["source"] not in (prev, r.get("engine_request_id")):
                    problem = f"started from {t['source']}, not from its conversation's previous turn {prev}"
            images = [make_test_image(s, 224) for s in r["image_seeds"]]
            ref = replay.generate(r["prompt"], images, events, follow=r["token_ids"])
            agree = compare_with_oracle(r, ref, tolerance)
            checks.append({"request_id": r["request_id"], "conversation": conv, "turn": r["turn"],
                           "events": [(n, k) for n, k, _ in events], "ok": agree.ok and problem is None,
                           "problem": problem or agree.problem, "max_logprob_diff": agree.max_logprob_diff})
            prev = r.get("engine_request_id")
    return checks


if __name__ == "__main__":
    spec_path, out_path, trace_path = sys.argv[1:4]
    spec = ConversationSpec(**json.loads(Path(spec_path).read_text()))
    Path(out_path).write_text(json.dumps(run(spec, trace_path if spec.method != "none" else None)))
