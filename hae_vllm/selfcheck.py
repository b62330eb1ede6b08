"""Self-check on your own model and hardware: vLLM with eviction against the HF oracle.

    python -m hae_vllm.selfcheck --model PATH [--method hae] [--budget 0.5] [--dtype auto] ...

A small batch (one image, two images, text only, a request with ``kv_eviction: none``, one
with its own budget, one evicting while it decodes) runs through ``vllm.LLM`` with eviction
on and a trace of every eviction.  Each request is then replayed on HuggingFace transformers
(:class:`~hae_vllm.testing.oracle.MaskedReplay`) with the same evictions, parks and restores,
following the engine's tokens, so every generated position is scored by the oracle.  The
engine passes when each token is the oracle's choice (or a near-tie in a 16-bit dtype) and
each log-prob is within the dtype's noise (:data:`~hae_vllm.testing.oracle.DTYPE_NOISE`).

The oracle runs in the dtype vLLM resolved (``auto`` on CPU turns a float32 checkpoint into
bfloat16), on CUDA when there is one.  The last line is machine-readable::

    selfcheck=<pass|fail> requests=<n> token_match=<k>/<n> max_logprob_diff=<x>

where ``k`` counts the requests that agree with the oracle.  Exit status 0 on pass, 1 otherwise.

``--attention-backend NAME`` runs the engine on that backend (asked of vLLM's platform first, as
vLLM asks when a user passes the flag: a backend this machine cannot run for the model stops the
check with the reason and the backends it can run); the check fails when the engine's layers ran
another.  ``--all-backends`` runs the batch once per backend the machine can run, and ends with
one line over all of them, the same line with ``backends=<NAME:pass|fail,...>`` appended.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from hae_vllm.testing.scenario import RequestSpec, ScenarioSpec

if TYPE_CHECKING:  # the oracle imports torch: not needed for --help
    from hae_vllm.testing.oracle import Agreement

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

Events = list[tuple[int, str, list[int]]]


@dataclass(frozen=True)
class Probe:
    """One kind of request in the batch: a label, how many images, per-request knobs."""

    label: str
    num_images: int
    text: str
    extra_args: dict | None = None
    long: bool = False  # generates twice as many tokens (decode eviction needs room)


def probes(budget: float | None, decode_budget: float | None) -> list[Probe]:
    """The request kinds, in the order the batch cycles through them."""
    own_budget = round((budget or 0.5) / 2, 4)
    decode = (Probe("long decode", 1, "Tell me a long story about this picture.", long=True)
              if decode_budget is not None else
              Probe("decode eviction", 1, "Tell me a long story about this picture.",
                    {"kv_eviction_decode_budget": 0.5, "kv_eviction_decode_start": 0}, long=True))
    return [
        Probe("single image", 1, "Describe the picture please."),
        Probe("two images", 2, "Compare the two pictures."),
        Probe("text only", 0, "Only words here and no picture at all, tell me a story."),
        Probe("eviction none", 1, "Describe it without eviction.", {"kv_eviction": "none"}),
        Probe(f"budget {own_budget:g}", 1, "What colour is the largest rectangle in this image?",
              {"kv_eviction_budget": own_budget}),
        decode,
    ]


def plan_requests(num_requests: int, max_tokens: int, budget: float | None, decode_budget: float | None,
                  image_files: Sequence[str] = ()) -> tuple[list[str], list[RequestSpec]]:
    """Labels and requests of the batch: the probes in turn, each image a fresh generated one
    (seeds from 101) or the next of ``image_files``, cycling."""
    kinds = probes(budget, decode_budget)
    labels, reqs = [], []
    next_image = 0
    for i in range(num_requests):
        p = kinds[i % len(kinds)]
        images: list[int | str] = []
        for _ in range(p.num_images):
            images.append(image_files[next_image % len(image_files)] if image_files else 101 + next_image)
            next_image += 1
        labels.append(p.label if i < len(kinds) else f"{p.label} #{i // len(kinds) + 1}")
        reqs.append(RequestSpec(text=p.text, images=images, max_tokens=max_tokens * (2 if p.long else 1),
                                extra_args=p.extra_args))
    return labels, reqs


def image_files_in(directory: str) -> list[str]:
    files = sorted(str(p) for p in Path(directory).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise SystemExit(f"--images {directory}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return files


def scenario(args: argparse.Namespace, reqs: list[RequestSpec], attention_backend: str | None = None) -> ScenarioSpec:
    eviction = {"method": args.method, "budget": args.budget}
    if args.decode_budget is not None:
        eviction["decode_budget"] = args.decode_budget
        eviction["decode_start"] = 0  # park from the first step: the check exercises the decode stage
    tp = args.tensor_parallel_size
    return ScenarioSpec(
        model=args.model, requests=reqs, eviction=eviction, dtype=args.dtype,
        # The plugin's own default block size: what a user gets without choosing one.
        block_size=args.block_size, max_model_len=args.max_model_len,
        tensor_parallel_size=tp, distributed_executor_backend="mp" if tp > 1 else None,
        engine_kwargs={**({"kv_cache_dtype": args.kv_cache_dtype} if args.kv_cache_dtype != "auto" else {}),
                       **({"attention_backend": attention_backend} if attention_backend else {})},
    )


# --------------------------------------------------------------------------------------
# Replay and verdict
# --------------------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    agreement: Agreement
    evicted: int  # prompt tokens evicted after prefill
    parked: int  # tokens parked while decoding, net of restores
    blocks_freed: int  # blocks the request no longer held at its end


@dataclass
class Report:
    model: str
    dtype: str
    device: str
    rows: list[Row]
    problems: list[str]  # batch-level failures (nothing evicted, leaked blocks, ...)
    attention: Sequence[str] = ()  # the attention backends the engine's layers ran

    @property
    def ok(self) -> bool:
        return not self.problems and all(r.agreement.ok for r in self.rows)

    @property
    def max_logprob_diff(self) -> float:
        return max((r.agreement.max_logprob_diff for r in self.rows), default=math.nan)

    def lines(self) -> list[str]:
        tol = self.rows[0].agreement.tolerance if self.rows else None
        out = [f"model: {self.model}", f"dtype: {self.dtype} (vLLM and oracle), oracle on {self.device}"]
        if self.attention:
            out.append(f"attention backend: {', '.join(self.attention)}")
        if tol is not None:
            if tol.near_tie:
                out.append(f"tolerance ({self.dtype}): log-probs within {tol.logprob:g}; an engine token "
                           f"the oracle ranks below its choice by < {tol.near_tie:g} is a near-tie, accepted")
            else:
                out.append(f"tolerance ({self.dtype}): identical tokens, log-probs within {tol.logprob:g}")
        out.append("every engine token is scored by the oracle (it follows the engine's sequence)")
        head = ("request", "tokens equal", "near-ties", "max |dlogprob|", "evicted", "parked", "blocks freed", "verdict")
        table = [head]
        for r in self.rows:
            a = r.agreement
            table.append((r.label, f"{a.equal}/{a.compared}" + ("" if a.compared == a.num_tokens else f" of {a.num_tokens}"),
                          str(a.near_ties), f"{a.max_logprob_diff:.3g}", str(r.evicted), str(r.parked),
                          str(r.blocks_freed), "pass" if a.ok else f"FAIL: {a.problem}"))
        widths = [max(len(row[c]) for row in table) for c in range(len(head) - 1)]
        for row in table:
            out.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
        out += [f"problem: {p}" for p in self.problems]
        n = len(self.rows)
        k = sum(r.agreement.ok for r in self.rows)
        out.append(f"selfcheck={'pass' if self.ok else 'fail'} requests={n} token_match={k}/{n} "
                   f"max_logprob_diff={self.max_logprob_diff:.3g}")
        return out


def shift_positions(events: Events) -> Events:
    """The same events with every position moved one later (clipped to the tokens that exist):
    a plausible-looking but wrong eviction set, for proving that a pass means something."""
    return [(n, kind, sorted({min(p + 1, n - 1) for p in pos})) for n, kind, pos in events]


def oracle_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check(record: dict, labels: Sequence[str], reqs: Sequence[RequestSpec], *, noise: float | None = None,
          device: str | None = None, corrupt: Callable[[Events], Events] | None = None, oracle=None,
          kv_cache_dtype: str = "auto", attention_backend: str | None = None) -> Report:
    """Replay every request of ``record`` (a scenario record) on the oracle and judge it.
    ``corrupt`` rewrites each request's events before the replay (tests: a wrong eviction set
    must fail).  ``oracle``: a ready :class:`HFOracle` in the record's dtype (else one is loaded;
    for an fp8 ``kv_cache_dtype`` one whose K and V are rounded as vLLM stores them, judged at
    the larger of the dtype's and fp8's noise).  ``attention_backend``: the backend the engine
    was asked to run (a problem when its layers ran another)."""
    from hae_vllm.testing.fp8 import RoundedKVOracle, fp8_tolerance
    from hae_vllm.testing.oracle import HFOracle, MaskedReplay, Tolerance, compare_with_oracle, events_from_trace
    from hae_vllm.testing.scenario import blocks_freed_at_end, build_prompt

    dtype = record["dtype"]
    tol = Tolerance.for_dtype(dtype, noise)
    fp8 = kv_cache_dtype not in ("auto", None)
    if fp8 and noise is None:
        tol = max(tol, fp8_tolerance(), key=lambda t: t.logprob)
    device = device or oracle_device()
    if oracle is None:
        oracle = (RoundedKVOracle(record["model_path"], kv_cache_dtype, dtype, device=device) if fp8
                  else HFOracle(record["model_path"], dtype, device))
    replay = MaskedReplay(oracle)
    freed = blocks_freed_at_end(record["trace"])
    rows = []
    for label, req, res in zip(labels, reqs, record["results"]):
        p = build_prompt(record["model_kind"], req, record["model_path"])
        imgs = p.get("multi_modal_data", {}).get("image", [])
        imgs = imgs if isinstance(imgs, list) else [imgs]
        events = events_from_trace(res["evictions"] + res["decode_events"])
        if corrupt is not None:
            events = corrupt(events)
        ref = replay.generate(p["prompt"], imgs, len(res["token_ids"]), events, follow=res["token_ids"])
        parked = sum(len(e["positions"]) * (1 if e["kind"] == "park" else -1) for e in res["decode_events"])
        evicted = len(res["eviction"]["evicted_positions"]) if res["eviction"] else 0
        rows.append(Row(label, compare_with_oracle(res, ref, tol), evicted, parked, freed.get(res["request_id"], 0)))
    return Report(record["model_path"], dtype, str(device), rows,
                  batch_problems(record, reqs, rows, attention_backend), record.get("attention_backends", ()))


def batch_problems(record: dict, reqs: Sequence[RequestSpec], rows: Sequence[Row],
                   attention_backend: str | None = None) -> list[str]:
    """What is wrong with the batch as a whole, whatever the oracle says per request."""
    out = []
    ran = record.get("attention_backends")
    if attention_backend is not None and ran != [f"{attention_backend}+eviction"]:
        out.append(f"asked for attention backend {attention_backend}, the engine's layers ran {ran}")
    if not any(r.evicted or r.parked for r in rows):
        # Every request then equals plain vLLM and the comparison proves nothing.
        out.append("no request evicted anything: is eviction on (plugin loaded, method and budget)?")
    for req, res, row in zip(reqs, record["results"], rows):
        if (req.extra_args or {}).get("kv_eviction") == "none" and (res["evictions"] or res["decode_events"]):
            out.append(f"{row.label}: evicted although the request asked for kv_eviction none")
    before, after = record.get("free_blocks_before"), record.get("free_blocks_after")
    if before is not None and after != before:
        out.append(f"blocks leaked: {before} free before the batch, {after} after")
    return out


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m hae_vllm.selfcheck",
        description="Run a small batch through vLLM with KV eviction and replay it on HuggingFace "
                    "transformers with the same evictions: a pass means eviction on this model and "
                    "hardware computes what it should.  On CPU, VLLM_CPU_KVCACHE_SPACE (GiB) sizes "
                    "the KV cache (default here: 1).")
    ap.add_argument("--model", required=True, help="checkpoint directory (or hub id in the local cache)")
    ap.add_argument("--method", default="hae", help="eviction method (default: hae)")
    ap.add_argument("--budget", type=float, default=0.5, help="keep ratio of prompt tokens (default: 0.5)")
    ap.add_argument("--decode-budget", type=float, default=None,
                    help="engine-wide decode keep ratio (default: off; one request sets 0.5 for itself)")
    ap.add_argument("--dtype", default="auto", help="vLLM dtype (default: auto, what vLLM picks); the oracle uses the same")
    ap.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3", "fp8_e5m2"],
                    help="vLLM's KV cache dtype; with fp8 the oracle rounds K and V the same way")
    ap.add_argument("--tensor-parallel-size", type=int, default=1)
    ap.add_argument("--images", default=None, help="directory of images to use instead of generated ones")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per request (the decode request: twice this)")
    ap.add_argument("--num-requests", type=int, default=6)
    ap.add_argument("--block-size", type=int, default=None, help="KV block size (default: the plugin's)")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--noise", type=float, default=None,
                    help="log-prob tolerance and near-tie margin instead of the dtype's default")
    ap.add_argument("--oracle-device", default=None, help="device of the HF oracle (default: cuda if available)")
    ap.add_argument("--save-record", default=None, help="write the engine's record (results, trace) as JSON "
                    "(with --all-backends: one file per backend, the backend's name before the suffix)")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--attention-backend", default=None, metavar="NAME",
                       help="run vLLM with this attention backend (vLLM's name: " + ", ".join(_BACKENDS) +
                            "); refused with the available ones when this machine cannot run it. "
                            "Default: the one vLLM picks")
    which.add_argument("--all-backends", action="store_true",
                       help="run the check once per attention backend this machine can run for the model")
    return ap


# The backends eviction supports (hae_vllm.attention.backends.SUPPORTED; listed here so that
# --help needs no vLLM import).
_BACKENDS = ("CPU_ATTN", "FLASH_ATTN", "TRITON_ATTN", "FLASHINFER")


def backend_refusals(args: argparse.Namespace) -> dict[str, str | None]:
    """Each backend eviction supports -> why vLLM on this machine would not run it for the
    model's attention layers (head size, dtype, KV-cache dtype, block size), None if it would."""
    from vllm.config import ModelConfig
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from hae_vllm.attention.backends import SUPPORTED, platform_refusal
    from hae_vllm.config import EvictionConfig

    mc = ModelConfig(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len)
    layers = AttentionSelectorConfig(head_size=mc.get_head_size(), dtype=mc.dtype, kv_cache_dtype=args.kv_cache_dtype,
                                     block_size=args.block_size or EvictionConfig.default_block_size)
    return {m: platform_refusal(m, layers) for m in SUPPORTED}


def chosen_backends(args: argparse.Namespace) -> list[str | None]:
    """The backends to check: [None] (vLLM's choice) unless one or all were asked for."""
    if not (args.attention_backend or args.all_backends):
        return [None]
    refusals = backend_refusals(args)
    available = [m for m, why in refusals.items() if why is None]
    if args.all_backends:
        if not available:
            raise SystemExit("--all-backends: this machine can run none of the backends eviction supports: " +
                             "; ".join(f"{m}: {why}" for m, why in refusals.items()))
        return available
    name = args.attention_backend.upper()
    if name not in refusals:
        raise SystemExit(f"--attention-backend {args.attention_backend}: not a backend eviction supports "
                         f"({', '.join(refusals)}); available on this machine: {', '.join(available) or 'none'}")
    if refusals[name] is not None:
        raise SystemExit(f"--attention-backend {name}: this machine cannot run it ({refusals[name]}); "
                         f"available on this machine: {', '.join(available) or 'none'}")
    return [name]


def _record_path(path: str | None, backend: str | None, several: bool) -> str | None:
    if path is None or not several:
        return path
    p = Path(path)
    return str(p.with_name(f"{p.stem}.{backend}{p.suffix}"))


def load_saved(path: str) -> tuple[dict, list[str], list[RequestSpec]]:
    """A record written by ``--save-record``: (record, labels, requests)."""
    saved = json.loads(Path(path).read_text())
    return saved["record"], saved["labels"], [RequestSpec(**r) for r in saved["requests"]]


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.num_requests < 1 or args.max_tokens < 1:
        raise SystemExit("--num-requests and --max-tokens must be positive")
    from hae_vllm.testing.scenario import run_in_subprocess

    files = image_files_in(args.images) if args.images else []
    backends = chosen_backends(args)
    labels, reqs = plan_requests(args.num_requests, args.max_tokens, args.budget, args.decode_budget, files)
    n = len(reqs)
    reports: dict[str | None, Report | None] = {}  # None: the engine failed
    for backend in backends:
        where = f" on attention backend {backend}" if backend else ""
        print(f"running {n} requests through vLLM{where} with kv_eviction method={args.method} "
              f"budget={args.budget} decode_budget={args.decode_budget} ...", flush=True)
        try:
            record = run_in_subprocess(scenario(args, reqs, backend), timeout=3600)
        except Exception as e:  # the engine did not start or crashed: report it, verdict fail
            print(f"engine failed{where}: {e}", file=sys.stderr)
            print(f"selfcheck=fail requests={n} token_match=0/{n} max_logprob_diff=nan")
            reports[backend] = None
            continue
        path = _record_path(args.save_record, backend, len(backends) > 1)
        if path:
            Path(path).write_text(json.dumps({"record": record, "labels": labels, "requests": [asdict(r) for r in reqs]}))
        print(f"replaying on the HF oracle in {record['dtype']} ...", flush=True)
        reports[backend] = check(record, labels, reqs, noise=args.noise, device=args.oracle_device,
                                 kv_cache_dtype=args.kv_cache_dtype, attention_backend=backend)
        print("\n".join(reports[backend].lines()))
    ok = all(r is not None and r.ok for r in reports.values())
    if len(backends) > 1:  # one last line over every backend, in the same format
        done = [r for r in reports.values() if r is not None]
        k = sum(row.agreement.ok for r in done for row in r.rows)
        diff = max((r.max_logprob_diff for r in done), default=math.nan)
        per = ",".join(f"{b}:{'pass' if r is not None and r.ok else 'fail'}" for b, r in reports.items())
        print(f"selfcheck={'pass' if ok else 'fail'} requests={n * len(backends)} token_match={k}/{n * len(backends)} "
              f"max_logprob_diff={diff:.3g} backends={per}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
