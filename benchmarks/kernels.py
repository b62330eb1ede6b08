"""Time the Triton kernels against their torch references and the device's copy bandwidth.

    python benchmarks/kernels.py            (needs a CUDA GPU; torch + triton, no vLLM)
    python benchmarks/kernels.py --cpu-layouts   (CPU; vLLM's CPU build: see cpu_layouts)

Mirrors tests/test_kernels.py op by op.  For each op: milliseconds (triton, torch), bytes moved
and achieved GB/s against the measured device-to-device copy bandwidth.  Decode scoring
(``decode_mass`` over the decode bank's rows, torch only: there is no Triton kernel for it) is
timed too: the keys it must read once against the time the gather and the product take.  Results, with the
device name, go to benchmarks/results/kernels_<device>.json.

Last line: kernels=<n> scoring_gbps=<x> compaction_gbps=<y> copy_gbps=<z>

``--cpu-layouts`` times eviction's cache operations (compaction, parking, key gathers, scoring)
on the CPU backend's bf16 layouts instead, vec against AMX, through the fast path and the
offset-table fallback (:func:`cpu_layouts`); it writes benchmarks/results/kernels_cpu_layouts.json
(config, machine, versions) and ends with the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hae_vllm.kernels.compaction import SlotGeometry, move_slots, move_slots_ref  # noqa: E402
from hae_vllm.kernels.scoring import attention_stats, attention_stats_ref, dense_attention_stats  # noqa: E402
from hae_vllm.layout import SlotLayout  # noqa: E402
from hae_vllm.policies.attention import decode_mass  # noqa: E402


def bench(fn, iters=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    if not torch.cuda.is_available():
        print("kernels=0 scoring_gbps=nan compaction_gbps=nan copy_gbps=nan (no CUDA device)")
        return
    dev = torch.cuda.get_device_name()
    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    copy_ms = bench(lambda: y.copy_(x))
    copy_gbps = 2 * x.numel() / copy_ms / 1e6
    rows = []
    # Scoring: 32 queries (text after the image) over a 4k-token prompt, Llama-7B-like layer 0.
    H, Hkv, D, bs, T, nq = 32, 32, 128, 16, 4096, 32
    nb = T // bs + 8
    kc = torch.randn(nb, bs, Hkv, D, device="cuda", dtype=torch.float16)
    table = torch.randperm(nb, device="cuda")[: T // bs]
    q = torch.randn(nq, H, D, device="cuda", dtype=torch.float16)
    qpos = torch.full((nq,), T - 1, device="cuda")
    t_tri = bench(lambda: attention_stats(q, kc, table, qpos, T, D**-0.5, per_head=True, impl="triton"))
    t_ref = bench(lambda: attention_stats_ref(q, kc, table, qpos, T, D**-0.5, per_head=True))
    # Two passes, each reading every key once per KV head; the per-KV-head partial rows and
    # the per-head sums written once.
    scoring_bytes = 2 * T * Hkv * D * 2 + Hkv * nq * T * 4 + H * T * 4
    rows.append({"op": "attention_stats", "shape": dict(H=H, Hkv=Hkv, D=D, T=T, nq=nq), "triton_ms": t_tri, "torch_ms": t_ref,
                 "bytes": scoring_bytes, "gbps": scoring_bytes / t_tri / 1e6})
    # Compaction: move 1024 slots in all 32 layers (separate caches) at once.
    L, n = 32, 1024
    caches = [torch.randn(2, nb, bs, Hkv, D, device="cuda", dtype=torch.float16) for _ in range(L)]
    geom = SlotGeometry.flash(nb, bs, Hkv, D)
    perm = torch.randperm(nb * bs, device="cuda")
    src, dst = perm[:n], perm[n : 2 * n]
    t_tri = bench(lambda: move_slots(caches, geom, src, dst, impl="triton"))
    t_ref = bench(lambda: move_slots_ref(caches, geom, src, dst))
    comp_bytes = 2 * L * 2 * n * Hkv * D * 2
    rows.append({"op": "move_slots", "shape": dict(L=L, n=n, Hkv=Hkv, D=D), "triton_ms": t_tri, "torch_ms": t_ref,
                 "bytes": comp_bytes, "gbps": comp_bytes / t_tri / 1e6})
    # Decode scoring: 64 requests' new queries over their 4k-token key rows in the decode bank
    # (head major, fp16), the gather of the rows included; every row fully visible.
    B, R = 64, 96
    bank = torch.randn(R, Hkv, T + 256, D, device="cuda", dtype=torch.float16)
    brows = torch.randperm(R, device="cuda")[:B]
    dq = torch.randn(B, H, D, device="cuda", dtype=torch.float16)
    visible = torch.ones(B, T, dtype=torch.bool, device="cuda")
    t_ref = bench(lambda: decode_mass(dq, bank[:, :, :T].index_select(0, brows), D**-0.5, visible))
    dec_bytes = B * Hkv * T * D * 2
    rows.append({"op": "decode_mass", "shape": dict(B=B, H=H, Hkv=Hkv, D=D, L=T), "triton_ms": None, "torch_ms": t_ref,
                 "bytes": dec_bytes, "gbps": dec_bytes / t_ref / 1e6})
    out = REPO / "benchmarks" / "results" / f"kernels_{dev.replace(' ', '_')}.json"
    out.write_text(json.dumps({"device": dev, "torch": torch.__version__, "copy_gbps": copy_gbps, "rows": rows}, indent=2))
    for r in rows:
        tri = "-" if r["triton_ms"] is None else f"{r['triton_ms']:.3f} ms"
        print(f"{r['op']}: triton {tri}, torch {r['torch_ms']:.3f} ms, {r['gbps']:.0f} GB/s")
    print(f"kernels={len(rows)} scoring_gbps={rows[0]['gbps']:.1f} compaction_gbps={rows[1]['gbps']:.1f} copy_gbps={copy_gbps:.1f}")


def _cpu_times(fns: list, repeats: int) -> list[dict]:
    """Wall-clock milliseconds of each ``fn()`` on the CPU: median, min and max of ``repeats``
    runs after one warm-up.  The runs are interleaved (round r runs every fn once), so that
    load from other users of a shared machine, which drifts over minutes, falls on all of them
    alike; the min is the least disturbed run."""
    for fn in fns:
        fn()
    ms = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, ms):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return [{"median_ms": statistics.median(m), "min_ms": min(m), "max_ms": max(m)} for m in ms]


def _cpu_model() -> dict:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), None)
    flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
    return {"cpu_model": model, "amx_flags": sorted(f for f in flags if f.startswith("amx")),
            "avx512f": "avx512f" in flags}


def _layout_ops(probed, geom, path: str, caches, src, dst, keys, q, qpos):
    """(whether the path scores from a key plane view, {op: fn}) for one layout and path of
    :func:`cpu_layouts`.  caches: L x [nb, H, bs, 2*D]; src/dst: [n] slots; keys: [T] slots;
    q: [nq, H, D] at positions qpos [nq]."""
    bs, H, D = probed.block_size, probed.num_kv_heads, probed.head_size
    T, scale = keys.numel(), D**-0.5
    layout = probed
    if path == "offset_table":
        layout = SlotLayout(probed.block_dim, bs, H, D, probed.index)
        layout.geometry = lambda kv: None
    plane = layout.key_plane(caches[0]) if path != "digit_index" else None

    def gather_keys():
        if path == "digit_index":
            return geom.views(caches[0])[0][geom.slot_index(0, keys)].reshape(-1, H, D)
        return layout.gather_keys(caches[0], keys)

    def score():
        if plane is not None:
            table = keys.view(-1, bs)[:, 0] // bs  # any T // bs blocks: the same work
            return attention_stats(q, plane, table, qpos, T, scale, per_head=True)
        return dense_attention_stats(q, gather_keys(), qpos, scale, True)

    def move(swap):
        if path != "digit_index":
            return (layout.swap_many if swap else layout.move_many)(caches, src, dst)
        for p in range(2):
            a, b = geom.slot_index(p, src), geom.slot_index(p, dst)
            for cache in caches:
                view = geom.views(cache)[p]
                va = view[a]
                if swap:
                    view[a] = view[b]
                view[b] = va

    return plane is not None, {"move_many": lambda: move(False), "swap_many": lambda: move(True),
                               "gather_keys": gather_keys, "score": score}


def cpu_layouts(args) -> None:
    """Eviction's cache operations on the CPU backend's bf16 layouts, same sizes each: the vec
    layout (plain affine planes) and the AMX layout (tiled planes), each through three paths:
    ``geometry`` (what SlotLayout does: plane views, a slot addressed by one row index),
    ``digit_index`` (the same views indexed with one tensor per digit: the obvious alternative,
    kept to show why rows are used) and ``offset_table`` (the per-element fallback for layouts
    that are not digit-affine).  The layouts come from vLLM's own cache-update op (its "amx"
    variant runs on any x86 CPU), so this needs no AMX hardware.

    Ops: ``move_many`` (compaction: n slots into free ones, every layer), ``swap_many``
    (parking: n slot pairs exchanged, every layer), ``gather_keys`` (T keys of one layer: what
    scoring and the decode bank fill read) and ``score`` (attention statistics of nq queries over
    those T keys: the in-place path where the key plane has a ``[nb, bs, H, D]`` view, gathered
    keys where it does not)."""
    from vllm import _custom_ops as ops

    from hae_vllm.testing.scenario import environment_info

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    L, nb, bs, H, D, n, T, nq = args.layers, args.blocks, args.block_size, args.heads, args.head_size, args.slots, \
        args.keys, args.queries
    if 2 * n > nb * bs or T > nb * bs:
        raise SystemExit("--slots/--keys do not fit in --blocks * --block-size")
    dtype = torch.bfloat16
    shape = (nb, H, bs, 2 * D)

    def writer(isa):
        def write(k, v, cache, slots):
            kv = cache.view(cache.shape[0], cache.shape[1], 2 * bs, -1)
            kc, vc = kv.chunk(2, dim=2)
            ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa, k_scale=1.0, v_scale=1.0,
                                           kv_cache_dtype="auto")
        return write

    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(nb * bs, generator=g)
    src, dst = perm[:n], perm[n : 2 * n]
    keys = torch.randperm(nb * bs, generator=g)[:T]
    q = torch.randn(nq, H, D, generator=g).to(dtype)
    qpos = torch.arange(T - nq, T)
    rows, fns = [], []
    for isa in ("vec", "amx"):
        probed = SlotLayout.probe(writer(isa), shape, dtype, nb, bs, H, D)
        caches = [torch.randn(shape, generator=g).to(dtype) for _ in range(L)]
        geom = probed.geometry(caches[0])
        for path in ("geometry", "digit_index", "offset_table"):
            has_plane, ops_ = _layout_ops(probed, geom, path, caches, src, dst, keys, q, qpos)
            for op, fn in ops_.items():
                rows.append({"isa": isa, "path": path, "op": op, "plain_geometry": geom.plain(),
                             "key_plane_view": has_plane})
                fns.append(fn)
    for row, t in zip(rows, _cpu_times(fns, args.repeats)):
        row.update(t)
        print(f"{row['isa']:4s} {row['path']:13s} {row['op']:12s} median {row['median_ms']:9.2f} ms"
              f"  min {row['min_ms']:9.2f} ms")
    # Ratios of minima: the medians of a shared 2-core machine carry other users' load.
    med = {(r["isa"], r["path"], r["op"]): r["min_ms"] for r in rows}
    ratios = {op: {"amx_geometry_over_vec_geometry": med["amx", "geometry", op] / med["vec", "geometry", op],
                   **{f"{isa}_{path}_over_{isa}_geometry": med[isa, path, op] / med[isa, "geometry", op]
                      for isa in ("vec", "amx") for path in ("digit_index", "offset_table")}}
              for op in ("move_many", "swap_many", "gather_keys", "score")}
    config = {"dtype": "bfloat16", "layers": L, "num_blocks": nb, "block_size": bs, "num_kv_heads": H, "head_size": D,
              "slots": n, "keys": T, "queries": nq, "threads": args.threads, "repeats": args.repeats,
              "ratios_of": "min_ms",
              "caches": "one tensor per layer, [num_blocks, H, block_size, 2*D] (vLLM CPU)"}
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / "kernels_cpu_layouts.json"
    out.write_text(json.dumps({"command": " ".join(["python", "benchmarks/kernels.py", *sys.argv[1:]]),
                               "config": config, "machine": {**environment_info(), **_cpu_model(),
                                           # The CPUs are shared: load over the run's minutes.
                                           "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]]},
                               "rows": rows, "ratios": ratios}, indent=2) + "\n")
    print(" ".join(f"{op}_amx_over_vec={r['amx_geometry_over_vec_geometry']:.2f}"
                   f" {op}_amx_table_over_geometry={r['amx_offset_table_over_amx_geometry']:.2f}"
                   f" {op}_amx_digit_index_over_geometry={r['amx_digit_index_over_amx_geometry']:.2f}"
                   for op, r in ratios.items()))
    print(f"wrote {out}")


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-layouts", action="store_true", help="time eviction's ops on the CPU backend's layouts")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--blocks", type=int, default=64)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--heads", type=int, default=8, help="KV heads")
    p.add_argument("--head-size", type=int, default=128)
    p.add_argument("--slots", type=int, default=1024, help="slots moved / slot pairs swapped")
    p.add_argument("--keys", type=int, default=4096, help="keys gathered / scored")
    p.add_argument("--queries", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


if __name__ == "__main__":
    _args = _parse()
    if _args.cpu_layouts:
        cpu_layouts(_args)
    else:
        main()
