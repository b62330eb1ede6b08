"""Time the Triton kernels against their torch references and the device's copy bandwidth.

    python benchmarks/kernels.py            (needs a CUDA GPU; torch + triton, no vLLM)

Mirrors tests/test_kernels.py op by op.  For each op: milliseconds (triton, torch), bytes moved
and achieved GB/s against the measured device-to-device copy bandwidth.  Decode scoring
(``decode_mass`` over the decode bank's rows, torch only: there is no Triton kernel for it) is
timed too: the keys it must read once against the time the gather and the product take.  Results, with the
device name, go to benchmarks/results/kernels_<device>.json.

Last line: kernels=<n> scoring_gbps=<x> compaction_gbps=<y> copy_gbps=<z>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hae_vllm.kernels.compaction import SlotGeometry, move_slots, move_slots_ref  # noqa: E402
from hae_vllm.kernels.scoring import attention_stats, attention_stats_ref  # noqa: E402
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


if __name__ == "__main__":
    main()
