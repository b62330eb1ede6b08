"""Compaction: move (or swap) token slots of every layer in one launch.

A slot's elements sit wherever the attention backend put them; :class:`SlotGeometry` describes
any *affine* layout (what ``SlotLayout`` derives by probing the backend): element
``(plane p, head h, dim d)`` of slot ``o`` of block ``b`` is at element offset
``planes[p].offset + b * block_stride + o * planes[p].slot + h * planes[p].head + d * planes[p].dim``
from the start of a layer's cache.  FlashAttention's ``[2, num_blocks, block_size, H, D]`` and
the CPU backend's transposed key plane are both affine.

:func:`move_slots` copies slot ``src[k]`` into ``dst[k]`` (or exchanges them) in every layer and
both K/V planes.  Triton: one launch, one program per (slot pair, layer, plane) moving its
``H * D`` elements; layers are addressed as element offsets from the first layer's cache, so
they need not be one tensor.  The torch reference, :func:`move_slots_ref` (the CPU path), does
one indexed copy per plane view: of all layers at once when they are equally spaced views of one
buffer (as vLLM's runners may carve their KV buffer), of each layer otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hae_vllm.kernels.scoring import use_triton

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover
    HAS_TRITON = False


@dataclass(frozen=True)
class SlotGeometry:
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_size: int
    block_stride: int
    # Per K/V plane, in elements: (offset, slot stride, head stride, dim stride).
    planes: tuple[tuple[int, int, int, int], tuple[int, int, int, int]]

    @classmethod
    def flash(cls, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> "SlotGeometry":
        """A contiguous FlashAttention cache ``[2, num_blocks, block_size, H, D]``."""
        H, D = num_kv_heads, head_size
        plane = num_blocks * block_size * H * D
        return cls(num_blocks, block_size, H, D, block_size * H * D,
                   ((0, H * D, D, 1), (plane, H * D, D, 1)))

    def views(self, cache: torch.Tensor) -> list[torch.Tensor]:
        """``[num_blocks, block_size, H, D]`` views of the K and V planes of one layer's cache."""
        size = (self.num_blocks, self.block_size, self.num_kv_heads, self.head_size)
        return [cache.as_strided(size, (self.block_stride, so, sh, sd), cache.storage_offset() + off)
                for off, so, sh, sd in self.planes]


def layer_stack(caches: list[torch.Tensor], geom: SlotGeometry) -> list[torch.Tensor] | None:
    """``[layers, num_blocks, block_size, H, D]`` views of the K and V planes of every layer at
    once, when the layers are equally spaced, non-overlapping views of one allocation (as
    vLLM's runners may carve their KV buffer); else None."""
    if len(caches) < 2:
        return None
    ptr = caches[0].untyped_storage().data_ptr()
    if any(c.untyped_storage().data_ptr() != ptr or not c.is_contiguous() for c in caches):
        return None
    anchor = min(caches, key=lambda c: c.storage_offset())
    offsets = sorted(c.storage_offset() for c in caches)
    delta = offsets[1] - offsets[0]
    if delta < anchor.numel() or any(y - x != delta for x, y in zip(offsets, offsets[1:])):
        return None
    size = (len(caches), geom.num_blocks, geom.block_size, geom.num_kv_heads, geom.head_size)
    return [anchor.as_strided(size, (delta, geom.block_stride, so, sh, sd), offsets[0] + off)
            for off, so, sh, sd in geom.planes]


def move_slots_ref(caches: list[torch.Tensor], geom: SlotGeometry, src: torch.Tensor, dst: torch.Tensor,
                   swap: bool = False) -> None:
    """Torch reference and CPU path: one indexed copy per plane view, of all layers at once
    where :func:`layer_stack` applies, else of each layer.  src/dst: [n] flat slot ids
    (block * block_size + offset), disjoint sets."""
    if src.numel() == 0:
        return
    bs = geom.block_size
    dev = caches[0].device
    src, dst = src.to(dev, torch.int64), dst.to(dev, torch.int64)
    a, b = (src // bs, src % bs), (dst // bs, dst % bs)
    stacked = layer_stack(caches, geom)
    if stacked is not None:
        views = stacked
        a, b = (slice(None),) + a, (slice(None),) + b
    else:
        views = [view for cache in caches for view in geom.views(cache)]
    for view in views:
        if swap:
            va = view[a].clone()
            view[a] = view[b]
            view[b] = va
        else:
            view[b] = view[a]


if HAS_TRITON:

    @triton.jit
    def _move_slots_kernel(
        base_ptr, layer_off_ptr, plane_ptr, src_ptr, dst_ptr, block_stride,
        SWAP: tl.constexpr, BLOCK_SIZE: tl.constexpr, D: tl.constexpr, ELEMS: tl.constexpr,
        ELEMS_PAD: tl.constexpr,
    ):
        pair = tl.program_id(0)
        layer = tl.program_id(1)
        plane = tl.program_id(2)
        e = tl.arange(0, ELEMS_PAD)
        emask = e < ELEMS
        off = tl.load(plane_ptr + plane * 4)
        so = tl.load(plane_ptr + plane * 4 + 1)
        sh = tl.load(plane_ptr + plane * 4 + 2)
        sd = tl.load(plane_ptr + plane * 4 + 3)
        within = (e // D).to(tl.int64) * sh + (e % D).to(tl.int64) * sd
        base = base_ptr + tl.load(layer_off_ptr + layer) + off
        s = tl.load(src_ptr + pair)
        t = tl.load(dst_ptr + pair)
        a_ptr = base + (s // BLOCK_SIZE) * block_stride + (s % BLOCK_SIZE) * so + within
        b_ptr = base + (t // BLOCK_SIZE) * block_stride + (t % BLOCK_SIZE) * so + within
        a = tl.load(a_ptr, mask=emask)
        if SWAP:
            tl.store(a_ptr, tl.load(b_ptr, mask=emask), mask=emask)
        tl.store(b_ptr, a, mask=emask)


def move_slots(caches: list[torch.Tensor], geom: SlotGeometry, src: torch.Tensor, dst: torch.Tensor,
               swap: bool = False, impl: str = "auto") -> None:
    """Copy slot ``src[k]`` into ``dst[k]`` (or exchange them, ``swap``) in every cache of
    ``caches`` (one per layer, all of this geometry, dtype and device) and both planes."""
    if src.shape != dst.shape or src.dim() != 1:
        raise ValueError("src and dst must be 1-D and of the same length")
    if not caches:
        raise ValueError("no caches")
    first = caches[0]
    if any(c.dtype != first.dtype or c.device != first.device for c in caches):
        raise ValueError("caches must share dtype and device")
    if src.numel() == 0:
        return
    if not use_triton(first, impl):
        return move_slots_ref(caches, geom, src, dst, swap)
    size = first.element_size()
    origin = first.data_ptr() - first.storage_offset() * size
    offsets = []
    for c in caches:
        delta = c.data_ptr() - c.storage_offset() * size - origin
        if delta % size:
            raise ValueError("layer caches are not element-aligned with each other")
        offsets.append(delta // size + c.storage_offset())
    dev = first.device
    base = first.as_strided((1,), (1,), 0)  # the storage's start: layer offsets count from it
    layer_off = torch.tensor(offsets, dtype=torch.int64, device=dev)
    planes = torch.tensor(geom.planes, dtype=torch.int64, device=dev)
    elems = geom.num_kv_heads * geom.head_size
    _move_slots_kernel[(src.numel(), len(caches), 2)](
        base, layer_off, planes, src.to(dev, torch.int64).contiguous(), dst.to(dev, torch.int64).contiguous(),
        geom.block_stride,
        SWAP=swap, BLOCK_SIZE=geom.block_size, D=geom.head_size, ELEMS=elems,
        ELEMS_PAD=triton.next_power_of_2(elems),
    )
