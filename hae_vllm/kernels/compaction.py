"""Compaction: move (or swap) token slots of every layer in one launch.

A slot's elements sit wherever the attention backend put them; :class:`SlotGeometry` describes
any *digit-affine* layout (what ``SlotLayout`` derives by probing the backend).  In the plain
affine case element ``(plane p, head h, dim d)`` of slot ``o`` of block ``b`` is at element offset
``planes[p].offset + b * block_stride + o * planes[p].slot + h * planes[p].head + d * planes[p].dim``
from the start of a layer's cache: FlashAttention's ``[2, num_blocks, block_size, H, D]`` and the
CPU backend's transposed key plane (ISAs "vec"/"vec16") are plain.  The CPU backend's AMX layout
tiles its planes for the matrix unit (pairs of dims or of tokens interleaved, 16-wide tiles), so
an axis is affine only digit by digit: ``o = o_hi * 16 + o_lo`` contributes
``o_hi * s_hi + o_lo * s_lo``.  A plane is then still one strided view, with a dimension per
digit, and a slot one strided sub-tensor of it.

:func:`move_slots` copies slot ``src[k]`` into ``dst[k]`` (or exchanges them) in every layer and
both K/V planes.  Triton (plain geometries: every CUDA layout we know): one launch, one program
per (slot pair, layer, plane) moving its ``H * D`` elements; layers are addressed as element
offsets from the first layer's cache, so they need not be one tensor.  The torch reference,
:func:`move_slots_ref` (any digit-affine geometry), does one indexed copy per
plane view, a slot addressed by one row index (:func:`row_view`): of all layers at once when
they are equally spaced views of one buffer (as vLLM's runners may carve their KV buffer), of
each layer otherwise.  On host caches :func:`move_slots_host` makes the same row copies on
numpy views (the CPU path: no torch dispatch per call).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from hae_vllm import envs
from hae_vllm.kernels.scoring import use_triton

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover
    HAS_TRITON = False

Axis = int | tuple[tuple[int, int], ...]
"""One axis (slot, head or dim) of a plane: its element stride, or its mixed-radix digits
``((radix, stride), ...)``, most significant first, whose radixes multiply to the axis size:
index ``x = sum_i x_i * prod_{j>i} radix_j`` sits at ``sum_i x_i * stride_i``."""


def axis_digits(axis: Axis, size: int) -> tuple[tuple[int, int], ...]:
    """``axis`` as ``((radix, stride), ...)``; a plain stride is one digit of radix ``size``."""
    return ((size, axis),) if isinstance(axis, int) else axis


def digit_index(x: torch.Tensor, digits: tuple[tuple[int, int], ...]) -> tuple[torch.Tensor, ...]:
    """[n] indices along an axis -> one [n] tensor per digit (most significant first)."""
    out = []
    for r, _ in reversed(digits):
        out.append(x % r)
        x = x // r
    return tuple(reversed(out))


@dataclass(frozen=True)
class SlotGeometry:
    """Where every element of a slot sits in one layer's cache (see the module docstring).

    ``planes[p] = (offset, slot, head, dim)`` for the K (p=0) and V (p=1) planes, each axis an
    :data:`Axis`.  Axes are stored canonically (radix-1 digits dropped, a single digit as its
    stride), so equal layouts compare equal and a plain geometry has integers only."""

    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_size: int
    block_stride: int
    planes: tuple[tuple[int, Axis, Axis, Axis], tuple[int, Axis, Axis, Axis]]

    def __post_init__(self):
        sizes = (self.block_size, self.num_kv_heads, self.head_size)
        planes = []
        for off, *axes in self.planes:
            canon = []
            for axis, size in zip(axes, sizes):
                if not isinstance(axis, int):
                    axis = tuple((int(r), int(s)) for r, s in axis if r != 1)
                    if math.prod(r for r, _ in axis) != size:
                        raise ValueError(f"digits {axis} do not cover an axis of size {size}")
                    axis = axis[0][1] if len(axis) == 1 else (0 if not axis else axis)
                canon.append(int(axis) if isinstance(axis, int) else axis)
            planes.append((int(off), *canon))
        object.__setattr__(self, "planes", tuple(planes))

    @classmethod
    def flash(cls, num_blocks: int, block_size: int, num_kv_heads: int, head_size: int) -> "SlotGeometry":
        """A contiguous FlashAttention cache ``[2, num_blocks, block_size, H, D]``."""
        H, D = num_kv_heads, head_size
        plane = num_blocks * block_size * H * D
        return cls(num_blocks, block_size, H, D, block_size * H * D,
                   ((0, H * D, D, 1), (plane, H * D, D, 1)))

    def plain(self, plane: int | None = None) -> bool:
        """Whether ``plane`` (both when None) is plain affine: one stride per axis."""
        planes = self.planes if plane is None else (self.planes[plane],)
        return all(isinstance(a, int) for p in planes for a in p[1:])

    def digits(self, plane: int) -> tuple[tuple[tuple[int, int], ...], ...]:
        """(slot, head, dim) digits of ``plane``."""
        sizes = (self.block_size, self.num_kv_heads, self.head_size)
        return tuple(axis_digits(a, n) for a, n in zip(self.planes[plane][1:], sizes))

    def plane_shape(self, plane: int) -> tuple[list[int], list[int]]:
        """Sizes and strides of ``plane``'s view below the block dimension, digit by digit."""
        digits = [d for axis in self.digits(plane) for d in axis]
        return [r for r, _ in digits], [s for _, s in digits]

    def views(self, cache: torch.Tensor) -> list[torch.Tensor]:
        """Views of the K and V planes of one layer's cache: ``[num_blocks, block_size, H, D]``
        for a plain plane, ``[num_blocks, *slot digits, *head digits, *dim digits]`` else."""
        out = []
        for p, plane in enumerate(self.planes):
            sizes, strides = self.plane_shape(p)
            out.append(cache.as_strided([self.num_blocks, *sizes], [self.block_stride, *strides],
                                        cache.storage_offset() + plane[0]))
        return out

    def slot_index(self, plane: int, slots: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[n] flat slot ids -> the index of their ``[H..., D...]`` sub-tensors in ``plane``'s
        view: (block, *slot digits), each [n]."""
        return (slots // self.block_size,) + digit_index(slots % self.block_size, self.digits(plane)[0])

    def gather(self, cache: torch.Tensor, slots: torch.Tensor, plane: int = 0) -> torch.Tensor:
        """[n] flat slot ids -> ``[n, H, D]`` elements of ``plane`` (a copy)."""
        slots = slots.to(cache.device, torch.int64)
        view = self.views(cache)[plane]
        index = self.slot_index(plane, slots)
        got = row_view(view, len(index)).index_select(0, slot_rows(view, index))
        return got.reshape(-1, self.num_kv_heads, self.head_size)

    def offsets(self, plane: int) -> torch.Tensor:
        """``[block_size, H, D]`` element offsets of ``plane`` in block 0 (int64, CPU)."""
        parts = []
        for n, axis in zip((self.block_size, self.num_kv_heads, self.head_size), self.digits(plane)):
            x = torch.arange(n)
            parts.append(sum(i * s for i, (_, s) in zip(digit_index(x, axis), axis)))
        o, h, d = parts
        return self.planes[plane][0] + o[:, None, None] + h[None, :, None] + d[None, None, :]


def row_view(view: torch.Tensor, k: int) -> torch.Tensor:
    """``view [*outer (k dims), *inner]`` -> ``[R, *inner]`` on the same memory, row ``r`` being
    the inner sub-tensor ``r`` elements after the view's start.  One ``[n]`` row index then
    addresses a slot, whatever its digits: indexing the view with one index tensor per digit
    makes torch recompute every element's address from each of them, which made CPU moves
    1.3x (vec) and 2.0x (AMX) slower than row copies, AMX key gathers 3.0x (bf16, 16 layers,
    1024 slots: benchmarks/results/kernels_cpu_layouts.json).

    Rows overlap, but the rows of distinct slots are disjoint sets of cache elements, so
    reading and writing (``index_copy_``) the rows of distinct slots is exact; torch refuses
    writes only into tensors it can prove self-overlapping (a zero stride), not this one."""
    span = sum((n - 1) * st for n, st in zip(view.shape[:k], view.stride()[:k])) + 1
    return view.as_strided([span, *view.shape[k:]], [1, *view.stride()[k:]], view.storage_offset())


def slot_rows(view: torch.Tensor, index: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Rows of :func:`row_view` for ``view[index]`` (``index``: one [n] tensor per outer dim)."""
    return sum(i * st for i, st in zip(index, view.stride()))


def layer_stack(caches: list[torch.Tensor], geom: SlotGeometry) -> list[torch.Tensor] | None:
    """``[layers, *view]`` views (``view`` as in :meth:`SlotGeometry.views`) of the K and V
    planes of every layer at once, when the layers are equally spaced, non-overlapping views of
    one allocation (as vLLM's runners may carve their KV buffer); else None."""
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
    out = []
    for p, plane in enumerate(geom.planes):
        sizes, strides = geom.plane_shape(p)
        out.append(anchor.as_strided([len(caches), geom.num_blocks, *sizes], [delta, geom.block_stride, *strides],
                                     offsets[0] + plane[0]))
    return out


def move_slots_ref(caches: list[torch.Tensor], geom: SlotGeometry, src: torch.Tensor, dst: torch.Tensor,
                   swap: bool = False) -> None:
    """Torch reference and CPU path: one indexed copy per plane view (rows of
    :func:`row_view`), of all layers at once where :func:`layer_stack` applies, else of each
    layer.  src/dst: [n] flat slot ids (block * block_size + offset), disjoint sets."""
    if src.numel() == 0:
        return
    dev = caches[0].device
    src, dst = src.to(dev, torch.int64), dst.to(dev, torch.int64)
    stacked = layer_stack(caches, geom)
    layers = [stacked] if stacked is not None else [geom.views(cache) for cache in caches]
    lead = (torch.arange(len(caches), device=dev)[:, None],) if stacked is not None else ()
    for p in range(2):
        # Slot digits differ between planes (AMX tiles K by 16 tokens, V by token pairs).
        ia, ib = lead + geom.slot_index(p, src), lead + geom.slot_index(p, dst)
        for views in layers:
            view = views[p]
            rows = row_view(view, len(ia))
            a, b = slot_rows(view, ia).flatten(), slot_rows(view, ib).flatten()
            va = rows.index_select(0, a)
            if swap:
                rows.index_copy_(0, a, rows.index_select(0, b))
            rows.index_copy_(0, b, va)


def host_view(t: torch.Tensor) -> np.ndarray | None:
    """A numpy view of a host tensor's elements, for bit-exact copies (bfloat16 viewed as
    int16), or None on a device or for a dtype numpy cannot view (``numpy()`` refuses both:
    no separate device check, which would be one more attribute read on a hot path)."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    try:
        return t.numpy()
    except (TypeError, RuntimeError):
        return None


class _HostPlan:
    """:func:`move_slots_ref`'s row views of a set of host caches as numpy arrays, with what
    turns slot ids into their rows (built once per set of caches and geometry)."""

    def __init__(self, caches: list[torch.Tensor], geom: SlotGeometry) -> None:
        self.caches = list(caches)
        stacked = layer_stack(caches, geom)
        layers = [stacked] if stacked is not None else [geom.views(cache) for cache in caches]
        self.lead = np.arange(len(caches))[:, None] if stacked is not None else None
        self.geom = geom
        self.planes = []  # per plane: [(rows as numpy, view strides)] per layer group
        for p in range(2):
            k = (1 if stacked is not None else 0) + 1 + len(geom.digits(p)[0])
            group = []
            for views in layers:
                view = views[p]
                rows = host_view(row_view(view, k))
                if rows is None:
                    raise TypeError("cache dtype has no numpy view")
                group.append((rows, view.stride()[:k]))
            self.planes.append(group)

    def rows(self, p: int, slots: np.ndarray) -> np.ndarray:
        """Row ids (of :func:`row_view`) of ``slots`` in plane ``p``, every layer group."""
        index = (slots // self.geom.block_size,) + digit_index(slots % self.geom.block_size,
                                                               self.geom.digits(p)[0])
        if self.lead is not None:
            index = (self.lead,) + index
        return index


def move_slots_host(caches: list[torch.Tensor], geom: SlotGeometry, src, dst, swap: bool = False,
                    plans: dict | None = None) -> bool:
    """:func:`move_slots_ref` on numpy views of host caches: the same row copies without
    torch's per-call dispatch.  src/dst: [n] flat slot ids (tensors or arrays), disjoint sets.
    ``plans``: a dict the caller owns (one per :class:`~hae_vllm.layout.SlotLayout`, so the
    plans' views of the caches live no longer than it) where the row views are kept between
    calls.  Returns False (nothing done) when a cache has no numpy view."""
    key = (tuple(map(id, caches)), geom)
    plan = plans.get(key) if plans is not None else None
    if plan is None or any(a is not b for a, b in zip(plan.caches, caches)):
        try:
            plan = _HostPlan(caches, geom)
        except TypeError:
            return False
        if plans is not None:
            plans.clear()  # one set of caches per layout in practice
            plans[key] = plan
    a_slots = np.asarray(src, dtype=np.int64)
    b_slots = np.asarray(dst, dtype=np.int64)
    if a_slots.size == 0:
        return True
    for p in range(2):
        ia, ib = plan.rows(p, a_slots), plan.rows(p, b_slots)
        for rows, strides in plan.planes[p]:
            a = sum(i * st for i, st in zip(ia, strides)).reshape(-1)
            b = sum(i * st for i, st in zip(ib, strides)).reshape(-1)
            va = rows[a]
            if swap:
                rows[a] = rows[b]
            rows[b] = va
    return True


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


def _move_on_host(caches, geom, src, dst, swap: bool, impl: str, plans: dict | None) -> None:
    """Host caches: numpy row copies (:func:`move_slots_host`); the torch reference otherwise
    (a device without Triton, ``impl="torch"`` or ``HAE_VLLM_KERNELS=torch``, or a dtype numpy
    cannot view)."""
    host = impl != "torch" and envs.kernels() != "torch"
    if host and caches[0].device.type == "cpu" and src.device.type == "cpu" and dst.device.type == "cpu" \
            and move_slots_host(caches, geom, src.numpy(), dst.numpy(), swap, plans):
        return
    move_slots_ref(caches, geom, src, dst, swap)


def move_slots(caches: list[torch.Tensor], geom: SlotGeometry, src: torch.Tensor, dst: torch.Tensor,
               swap: bool = False, impl: str = "auto", plans: dict | None = None) -> None:
    """Copy slot ``src[k]`` into ``dst[k]`` (or exchange them, ``swap``) in every cache of
    ``caches`` (one per layer, all of this geometry, dtype and device) and both planes.
    ``plans``: the host path's plan cache (see :func:`move_slots_host`)."""
    if src.shape != dst.shape or src.dim() != 1:
        raise ValueError("src and dst must be 1-D and of the same length")
    if not caches:
        raise ValueError("no caches")
    first = caches[0]
    if any(c.dtype != first.dtype or c.device != first.device for c in caches):
        raise ValueError("caches must share dtype and device")
    if src.numel() == 0:
        return
    if not geom.plain():
        # The kernel addresses a slot with one stride per axis; tiled (AMX) layouts are CPU
        # layouts, where the host path is the path anyway.
        if impl == "triton":
            raise ValueError("the Triton kernel moves plain affine geometries only")
        return _move_on_host(caches, geom, src, dst, swap, impl, plans)
    if not use_triton(first, impl):
        return _move_on_host(caches, geom, src, dst, swap, impl, plans)
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
