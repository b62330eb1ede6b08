"""Compaction: move (or swap) token slots of every layer in one launch.

Caches are FlashAttention-shaped ``[2, num_blocks, block_size, kv_heads, head_dim]`` per layer;
the kernel takes the layers stacked as one tensor ``[L, 2, num_blocks, block_size, Hkv, D]``
(vLLM allocates them from one buffer on CUDA when their shapes agree) and a list of
``(src_slot, dst_slot)`` pairs.  Each program moves one slot pair's ``2 * Hkv * D`` elements of
one layer.  The torch reference (also the CPU path) is an advanced-index copy.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover
    HAS_TRITON = False


def move_slots_ref(caches: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, swap: bool = False) -> None:
    """caches: [L, 2, nb, bs, Hkv, D]; src/dst: [n] flat slot ids (block * bs + offset), disjoint."""
    L, _, nb, bs, H, D = caches.shape
    flat = caches.view(L, 2, nb * bs, H, D)
    src, dst = src.long(), dst.long()
    a = flat[:, :, src].clone()
    if swap:
        flat[:, :, src] = flat[:, :, dst]
    flat[:, :, dst] = a


if HAS_TRITON:

    @triton.jit
    def _move_slots_kernel(
        cache_ptr, src_ptr, dst_ptr,
        stride_l, stride_plane, stride_slot,
        SWAP: tl.constexpr, ELEMS: tl.constexpr, ELEMS_PAD: tl.constexpr,
    ):
        pair = tl.program_id(0)
        layer = tl.program_id(1)
        plane = tl.program_id(2)
        e = tl.arange(0, ELEMS_PAD)
        emask = e < ELEMS
        s = tl.load(src_ptr + pair).to(tl.int64)
        d = tl.load(dst_ptr + pair).to(tl.int64)
        base = cache_ptr + layer.to(tl.int64) * stride_l + plane * stride_plane
        a = tl.load(base + s * stride_slot + e, mask=emask)
        if SWAP:
            b = tl.load(base + d * stride_slot + e, mask=emask)
            tl.store(base + s * stride_slot + e, b, mask=emask)
        tl.store(base + d * stride_slot + e, a, mask=emask)


def move_slots(caches: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, swap: bool = False, impl: str = "auto") -> None:
    """Copy slot ``src[k]`` into ``dst[k]`` (or exchange them) in every layer and K/V plane."""
    if caches.dim() != 6 or caches.shape[1] != 2:
        raise ValueError(f"expected [L, 2, num_blocks, block_size, Hkv, D], got {tuple(caches.shape)}")
    if src.shape != dst.shape:
        raise ValueError("src and dst must have the same length")
    if src.numel() == 0:
        return
    use = impl == "triton" or (impl == "auto" and HAS_TRITON and (caches.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"))
    if not use:
        return move_slots_ref(caches, src, dst, swap)
    L, _, nb, bs, H, D = caches.shape
    if not caches[0, 0].is_contiguous():
        raise ValueError("each layer's K and V planes must be contiguous")
    elems = H * D
    _move_slots_kernel[(src.numel(), L, 2)](
        caches, src.to(torch.int64).contiguous(), dst.to(torch.int64).contiguous(),
        caches.stride(0), caches.stride(1), caches.stride(3),
        SWAP=swap, ELEMS=elems, ELEMS_PAD=triton.next_power_of_2(elems),
    )
