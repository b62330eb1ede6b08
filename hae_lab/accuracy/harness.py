"""Accuracy under eviction: methods x budgets through vLLM, scored exactly.

The harness runs one offline :class:`vllm.LLM` engine started with eviction enabled and sends
every (setting, item) pair as its own request; the setting (method, keep-ratio budget) travels
as per-request knobs (``kv_eviction``, ``kv_eviction_budget``), so every method sees the same
engine, the same batches and the same block size.  ``full`` is the same engine with
``kv_eviction="none"`` (bit-identical to vanilla vLLM, tests/test_identity.py).

Physical memory is measured, not derived from the budget: each request's eviction trace lists
the KV blocks it handed back to vLLM's pool (``hole_blocks``); ``kv_kept_frac`` is
``1 - freed / ceil(prompt_tokens / block_size)``.  The sum over all requests is checked against
the scheduler's own ``freed_blocks`` counter.

Prompts go through the model's chat template (``LLM.chat`` with image parts), so any local HF
VLM that vLLM serves works; images are sent as data URLs.
"""

from __future__ import annotations

import base64
import io
import json
import math
import mimetypes
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from hae_lab.accuracy.tasks import SCORING_MODES, generate, score

FULL = "full"


@dataclass
class EvalItem:
    id: str
    question: str
    answer: str
    images: list[str]  # data URLs
    scoring: str = "exact"
    task: str = "custom"
    max_tokens: int | None = None


@dataclass(frozen=True)
class Setting:
    method: str  # "full" = no eviction
    budget: float | None = None
    # Knobs of this setting only (``(("decode_budget", 0.5), ("bin_capacity", 0))``): they
    # override the run-wide ``extra``.  ``name`` replaces the method in the label and tables.
    knobs: tuple[tuple[str, Any], ...] = ()
    name: str | None = None

    @property
    def label(self) -> str:
        if self.method == FULL:
            return FULL
        return f"{self.name or self.method}@{self.budget:g}"

    @property
    def group(self) -> str:
        """The line this setting belongs to in tables and plots (method, or its name)."""
        return self.name or self.method

    def extra_args(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.method == FULL:
            return {"kv_eviction": "none"}
        args = {"kv_eviction": self.method, "kv_eviction_budget": self.budget}
        for k, v in {**(extra or {}), **dict(self.knobs)}.items():
            args[f"kv_eviction_{k}"] = v
        return args


# --------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------

def pil_data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def image_data_url(src: str, base_dir: Path) -> str:
    """A data URL from an image path (relative to the dataset file), a data URL, or raw base64."""
    if src.startswith("data:"):
        return src
    path = Path(src) if os.path.isabs(src) else base_dir / src
    if path.is_file():
        mime = mimetypes.guess_type(path.name)[0] or "image/png"
        return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()
    try:
        raw = base64.b64decode(src, validate=True)
    except ValueError:
        raise FileNotFoundError(f"image {src!r} is neither a file (looked in {base_dir}) nor base64") from None
    if len(raw) < 8:
        raise ValueError(f"image {src[:40]!r}... decodes to {len(raw)} bytes: not an image")
    return "data:image/png;base64," + src


def load_jsonl(path: str | os.PathLike) -> list[EvalItem]:
    """Items from a JSONL file, one object per line::

        {"id": "q1", "image": "imgs/a.png" | ["a.png", "b.png"] | "<base64>" | "data:...",
         "question": "...", "answer": "B", "scoring": "exact" | "contains" | "cells",
         "task": "optional group name", "max_tokens": 8}

    ``images`` is accepted for ``image``; relative paths are relative to the JSONL file.
    """
    path = Path(path)
    items = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                imgs = d.get("images", d.get("image", []))
                imgs = [imgs] if isinstance(imgs, str) else list(imgs)
                scoring = d.get("scoring", "exact")
                if scoring not in SCORING_MODES:
                    raise ValueError(f"scoring {scoring!r} is not one of {SCORING_MODES}")
                items.append(EvalItem(
                    id=str(d.get("id", n)), question=d["question"], answer=str(d["answer"]),
                    images=[image_data_url(s, path.parent) for s in imgs], scoring=scoring,
                    task=str(d.get("task", "custom")), max_tokens=d.get("max_tokens"),
                ))
            except (KeyError, ValueError, FileNotFoundError, json.JSONDecodeError) as e:
                raise ValueError(f"{path}:{n}: {e}") from e
    if not items:
        raise ValueError(f"{path}: no items")
    return items


def procedural_items(tasks: Iterable[str], n: int, split: str = "heldout") -> list[EvalItem]:
    """Held-out items of the repository's procedural tasks (hae_lab.accuracy.tasks)."""
    out = []
    for task in tasks:
        for it in generate(task, split, n):
            out.append(EvalItem(id=f"{task}-{it.seed}", question=it.question, answer=it.answer,
                                images=[pil_data_url(im) for im in it.images()], scoring=it.scoring,
                                task=task))
    return out


def scene_items(tasks: Iterable[str], n: int, split: str = "heldout") -> list[EvalItem]:
    """Held-out items of the LLaVA-scale scenes (hae_lab.accuracy.scenes: 576 visual tokens per
    image; ``objects`` scoring for ``describe`` and ``walk``)."""
    from hae_lab.accuracy import scenes

    out = []
    for task in tasks:
        for it in scenes.generate(task, split, n):
            out.append(EvalItem(id=f"{task}-{it.seed}", question=it.question, answer=it.answer,
                                images=[pil_data_url(im) for im in it.images()], scoring=it.scoring, task=task))
    return out


def score_item(answer: str, prediction: str, scoring: str) -> float:
    """``score`` of hae_lab.accuracy.tasks, and the scenes' ``objects`` mode (named objects,
    missing and hallucinated ones counting against)."""
    if scoring == "objects":
        from hae_lab.accuracy import scenes

        return scenes.score(answer, prediction, scoring)
    return score(answer, prediction, scoring)


def messages(item: EvalItem) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u}} for u in item.images]
    content.append({"type": "text", "text": item.question})
    return [{"role": "user", "content": content}]


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------

@dataclass
class RunConfig:
    model: str
    settings: list[Setting]
    extra: dict[str, Any] = field(default_factory=dict)  # method knobs for every eviction setting
    block_size: int = 32
    dtype: str = "float32"
    max_model_len: int = 4096
    max_num_seqs: int = 64
    tensor_parallel_size: int = 1
    max_tokens_margin: int = 4
    default_max_tokens: int = 32
    kv_cache_space_gib: int = 2


def _trace_by_request(trace_path: str) -> dict[str, dict]:
    """Last prefill record per request id (a preempted request is re-planned), under both the
    engine-internal id ("<id>-<suffix>") and the id the output carries."""
    out: dict[str, dict] = {}
    if os.path.exists(trace_path):
        with open(trace_path) as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("kind", "prefill") == "prefill" and rec.get("tp_rank", 0) == 0:
                    rid = rec["request_id"]
                    out[rid] = out[rid.rsplit("-", 1)[0]] = rec
    return out


def _decode_events_by_request(trace_path: str) -> dict[str, list[dict]]:
    """Decode-stage ``park`` / ``restore`` records per request id, in trace order (both id forms)."""
    out: dict[str, list[dict]] = {}
    if os.path.exists(trace_path):
        with open(trace_path) as f:
            for line in f:
                rec = json.loads(line)
                if rec.get("kind") in ("park", "restore") and rec.get("tp_rank", 0) == 0:
                    rid = rec["request_id"]
                    lst = out.setdefault(rid, [])
                    out[rid.rsplit("-", 1)[0]] = lst
                    lst.append(rec)
    return out


def decode_memory(prefill_holes: int, events: list[dict], total_tokens: int, block_size: int) -> dict[str, int]:
    """Physical KV of one request over its decode: ``peak_live_blocks`` (blocks it held, holes
    and parked blocks excluded, at its largest: just before each park and at the end),
    ``final_live_blocks``, ``parked`` and ``restored`` block counts.  A parked block's memory
    is free for other requests (the bin only remembers which block it was), so it is not live."""
    holes = prefill_holes
    peak = 0
    parked = restored = 0
    for e in events:
        held = math.ceil(e["num_tokens"] / block_size)
        if e["kind"] == "park":
            peak = max(peak, held - holes)
            holes += e["blocks"]
            parked += e["blocks"]
        else:
            holes -= e["blocks"]
            restored += e["blocks"]
            peak = max(peak, held - holes)
    final = math.ceil(total_tokens / block_size) - holes
    return {"peak_live_blocks": max(peak, final), "final_live_blocks": final, "parked_blocks": parked,
            "restored_blocks": restored}


def run(items: list[EvalItem], cfg: RunConfig) -> dict[str, Any]:
    """Every setting on every item through one vLLM engine; returns per-item rows and the
    scheduler's counters."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.kv_cache_space_gib))
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM, SamplingParams

    tmp = tempfile.mkdtemp(prefix="hae_accuracy_")
    trace_path = os.path.join(tmp, "trace.jsonl")
    max_images = max([len(it.images) for it in items] + [1])
    t0 = time.perf_counter()
    llm = LLM(
        model=cfg.model, dtype=cfg.dtype, max_model_len=cfg.max_model_len, block_size=cfg.block_size,
        max_num_seqs=cfg.max_num_seqs, tensor_parallel_size=cfg.tensor_parallel_size, seed=0,
        # No prefix caching: a full-cache request's blocks would otherwise become cache hits
        # that later requests on the same image must keep, and settings would free differently.
        limit_mm_per_prompt={"image": max_images}, enable_prefix_caching=False,
        additional_config={"kv_eviction": {"method": "hae", "trace_path": trace_path}},
    )
    engine_start_s = time.perf_counter() - t0
    tok = llm.get_tokenizer()
    convs, params, keys = [], [], []
    for s in cfg.settings:
        for it in items:
            mt = it.max_tokens or (len(tok(it.answer, add_special_tokens=False)["input_ids"]) + cfg.max_tokens_margin
                                   if it.answer else cfg.default_max_tokens)
            convs.append(messages(it))
            params.append(SamplingParams(max_tokens=mt, temperature=0.0, extra_args=s.extra_args(cfg.extra)))
            keys.append((s, it))
    t0 = time.perf_counter()
    outs = llm.chat(convs, params, use_tqdm=False)
    generate_s = time.perf_counter() - t0
    traces = _trace_by_request(trace_path)
    decode_events = _decode_events_by_request(trace_path)
    shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for (s, it), o in zip(keys, outs):
        rid = o.request_id
        tr = traces.get(rid)
        T = len(o.prompt_token_ids)
        blocks = math.ceil(T / cfg.block_size)
        freed = len(tr["hole_blocks"]) if tr else 0
        evicted = len(tr["evicted_positions"]) if tr else 0
        text = o.outputs[0].text
        generated = len(o.outputs[0].token_ids)
        # The last generated token is sampled, never written to the cache.
        mem = decode_memory(freed, decode_events.get(rid, []), T + max(generated - 1, 0), cfg.block_size)
        rows.append({
            "setting": s.label, "method": s.method, "group": s.group, "budget": s.budget, "id": it.id,
            "task": it.task, "generated_tokens": generated, "full_blocks": math.ceil((T + max(generated - 1, 0)) / cfg.block_size),
            **mem,
            "question": it.question, "answer": it.answer, "prediction": text,
            "score": score_item(it.answer, text, it.scoring), "prompt_tokens": T, "prompt_blocks": blocks,
            "freed_blocks": freed, "evicted_tokens": evicted,
            "evicted_visual_tokens": tr["num_visual_evicted"] if tr else 0,
            "num_visual_tokens": tr["num_visual_tokens"] if tr else None,
        })
    stats = None
    try:
        stats = llm.llm_engine.engine_core.engine_core.scheduler.eviction_stats.as_dict()
    except AttributeError:  # engine core in another process: no in-process counters
        pass
    del llm
    return {"rows": rows, "scheduler_stats": stats, "engine_start_s": engine_start_s,
            "generate_s": generate_s}


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------

def summarize(rows: list[dict]) -> list[dict]:
    """Per setting: accuracy (overall and per task), physical KV kept (blocks) and logical
    tokens kept, in the order settings first appear."""
    order: list[str] = []
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["setting"] not in groups:
            order.append(r["setting"])
            groups[r["setting"]] = []
        groups[r["setting"]].append(r)
    out = []
    for label in order:
        g = groups[label]
        tasks = sorted({r["task"] for r in g})
        blocks = sum(r["prompt_blocks"] for r in g)
        toks = sum(r["prompt_tokens"] for r in g)
        decode = {}
        if all("peak_live_blocks" in r for r in g):
            full_blocks = sum(r["full_blocks"] for r in g)
            decode = {"peak_kv_frac": sum(r["peak_live_blocks"] for r in g) / full_blocks,
                      "final_kv_frac": sum(r["final_live_blocks"] for r in g) / full_blocks,
                      "parked_blocks": sum(r["parked_blocks"] for r in g),
                      "restored_blocks": sum(r["restored_blocks"] for r in g)}
        out.append({
            "setting": label, "method": g[0]["method"], "group": g[0].get("group", g[0]["method"]),
            "budget": g[0]["budget"], "n": len(g), **decode,
            "accuracy": sum(r["score"] for r in g) / len(g),
            "per_task": {t: sum(r["score"] for r in g if r["task"] == t) / sum(1 for r in g if r["task"] == t)
                         for t in tasks},
            "kv_kept_frac": 1.0 - sum(r["freed_blocks"] for r in g) / blocks,
            "tokens_kept_frac": 1.0 - sum(r["evicted_tokens"] for r in g) / toks,
            "freed_blocks": sum(r["freed_blocks"] for r in g),
        })
    return out


def markdown_table(summary: list[dict]) -> str:
    tasks = sorted({t for s in summary for t in s["per_task"]})
    head = ["setting", "KV kept (blocks)", "tokens kept", "accuracy"] + tasks
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary:
        cells = [s["setting"], f"{s['kv_kept_frac']:.3f}", f"{s['tokens_kept_frac']:.3f}", f"{s['accuracy']:.3f}"]
        cells += [f"{s['per_task'][t]:.3f}" if t in s["per_task"] else "-" for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """Accuracy against physical KV kept, one line per method and one panel per task, with
    the full cache as a reference."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for s in summary for t in s["per_task"]})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.2 * len(tasks), 4.2), squeeze=False)
    methods = []
    for s in summary:
        if s.get("group", s["method"]) not in methods and s["method"] != FULL:
            methods.append(s.get("group", s["method"]))
    for ax, task in zip(axes[0], tasks):
        for m in methods:
            pts = sorted((s["kv_kept_frac"], s["per_task"][task]) for s in summary
                         if s.get("group", s["method"]) == m and task in s["per_task"])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=m,
                    linewidth=2.5 if m == "hae" else 1.2)
        for s in summary:
            if s["method"] == FULL:
                ax.axhline(s["per_task"][task], color="black", linestyle="--", linewidth=1, label="full cache")
        ax.set_title(f"task: {task}", fontsize=9)
        ax.set_xlabel("KV cache kept (physical blocks, fraction of full)")
        ax.set_ylabel("accuracy")
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def quick_line(summary: list[dict], budget: float, name_best: bool = False) -> str:
    """``full_acc=<x> hae_acc=<y> best_baseline_acc=<z> budget=<b> kv_kept_frac=<k>``; with
    ``name_best``, ``best_baseline=<name>`` after the baseline's accuracy (``--suite hard``)."""
    full = next(s for s in summary if s["method"] == FULL)
    at_b = [s for s in summary if s["method"] != FULL and s["budget"] == budget]
    hae = next(s for s in at_b if s["method"] == "hae")
    base = [s for s in at_b if s["method"] != "hae"]
    best = max(base, key=lambda s: s["accuracy"]) if base else None
    best_acc = best["accuracy"] if best else float("nan")
    named = f" best_baseline={best['method'] if best else 'none'}" if name_best else ""
    return (f"full_acc={full['accuracy']:.4f} hae_acc={hae['accuracy']:.4f} best_baseline_acc={best_acc:.4f}{named} "
            f"budget={budget:g} kv_kept_frac={hae['kv_kept_frac']:.4f}")


def decode_settings(decode_budget: float, capacities: Iterable[int], method: str = "hae",
                    prefill_budget: float = 1.0, decode_start: float = 0.0) -> list[Setting]:
    """The decode-stage comparison: full cache, greedy decode eviction (``bin_capacity`` 0: a
    parked block is released at once, never restored) and the recycle bin at each capacity,
    all at the same decode budget, so at the same peak of live KV blocks, the stage running from
    ``decode_start`` (0: the first step); and ``default``: the same decode budget with the
    engine's default ``decode_start`` and bin.  ``prefill_budget`` 1.0 evicts nothing at
    prefill: only the decode stage differs."""
    knobs = (("decode_budget", decode_budget), ("decode_start", decode_start))
    out = [Setting(FULL), Setting(method, prefill_budget, knobs + (("bin_capacity", 0),), name="greedy")]
    for c in capacities:
        if c > 0:
            out.append(Setting(method, prefill_budget, knobs + (("bin_capacity", c),), name=f"bin{c}"))
    out.append(Setting(method, prefill_budget, (("decode_budget", decode_budget),), name="default"))
    return out


def decode_table(summary: list[dict]) -> str:
    """Decode comparison: accuracy, peak and final live KV (fraction of the full cache's blocks
    at the end of each request), blocks parked and restored."""
    lines = ["| setting | accuracy | peak KV kept (blocks) | final KV kept | parked blocks | restored blocks |",
             "|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s.get('group', s['method'])} | {s['accuracy']:.3f} | {s.get('peak_kv_frac', 1.0):.3f} | "
                     f"{s.get('final_kv_frac', 1.0):.3f} | {s.get('parked_blocks', 0)} | {s.get('restored_blocks', 0)} |")
    return "\n".join(lines) + "\n"


def decode_quick_line(summary: list[dict], capacity: int) -> str:
    """``describe_full=<x> greedy=<y> bin=<z> kv_kept_frac=<k>`` (k: the bin setting's live KV
    blocks at the end of generation over the full cache's; greedy's is the same budget.  The
    peak is the whole prompt for every setting: all its blocks are held during the prefill.)"""
    by = {s.get("group", s["method"]): s for s in summary}
    full, greedy, binned = by[FULL], by["greedy"], by[f"bin{capacity}"]
    return (f"describe_full={full['accuracy']:.4f} greedy={greedy['accuracy']:.4f} bin={binned['accuracy']:.4f} "
            f"kv_kept_frac={binned['final_kv_frac']:.4f}")

