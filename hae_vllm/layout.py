"""Slot layout of a paged KV cache, derived from the attention backend itself.

Backends store a block very differently (the CPU backend keeps the key plane of a block
transposed on its vec ISAs and tiles both planes for the matrix unit on AMX; CUDA backends use
``[2, num_blocks, block_size, heads, dim]``).  We never hard-code it: :meth:`SlotLayout.probe`
writes coded values through the backend's own cache-update op into a two-block scratch cache and
reads back where every ``(slot offset, K/V plane, head, dim)`` element landed.  Moving a token is
then an indexed copy over the real cache tensor, whatever its layout: through strided plane
views when the layout is affine in the digits of the slot, head and dim indices (every backend
we know), through a per-element offset table otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from hae_vllm.kernels.compaction import SlotGeometry, move_slots
from hae_vllm.kv_format import ROUNDINGS, KVFormat

# Digits of 6 bits are exact in every floating KV dtype we accept (fp32, fp16, bf16); fp8
# caches get digits of 3 bits (0..7 are exact in e4m3 and e5m2).
_DIGIT_BITS = 6
_BASE = 1 << _DIGIT_BITS
_FP8_BASE = 8

WriteFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""write(key [n, H, D], value [n, H, D], kv_cache, slot_mapping [n]) -> None"""


class LayoutProbeError(RuntimeError):
    pass


@dataclass
class SlotLayout:
    """``index[o]`` holds, for slot offset ``o`` of a block, the coordinates (in the cache
    tensor with its block dimension moved to the front and removed) of its ``2*H*D``
    elements in canonical order ``(plane K/V, head, dim)``.

    Shapes: ``index`` is ``[block_size, 2*H*D, ndim-1]`` int64.
    """

    block_dim: int
    block_size: int
    num_kv_heads: int
    head_size: int
    index: torch.Tensor
    # What an element holds (fp8 bytes and their scales, or the model dtype itself).
    kv_format: KVFormat = field(default_factory=KVFormat)
    # The CPU compaction path's row views of this engine's caches (move_slots_host), kept
    # between moves and freed with the layout.
    host_plans: dict = field(default_factory=dict, repr=False, compare=False)

    # -------------------------------------------------------------- construction
    @classmethod
    def probe(
        cls,
        write: WriteFn,
        cache_shape: tuple[int, ...],
        dtype: torch.dtype,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_size: int,
        device: torch.device | str = "cpu",
        kv_format: KVFormat | None = None,
        write_scales: tuple[float, float] = (1.0, 1.0),
    ) -> "SlotLayout":
        """``write(k, v, scratch, slots)`` stores through the backend's op; for an fp8 cache
        (``kv_format`` quantised, ``dtype`` uint8) it scales by ``write_scales`` (the probing
        layer's ``(k_scale, v_scale)``) and the probe also measures how the op rounds."""
        fmt = kv_format or KVFormat()
        codec = _Codec(dtype, fmt, write_scales)
        candidates = [d for d, s in enumerate(cache_shape) if s == num_blocks]
        if not candidates:
            raise LayoutProbeError(f"no dimension of {cache_shape} has num_blocks={num_blocks}")
        block_dim = candidates[0]
        scratch_shape = list(cache_shape)
        scratch_shape[block_dim] = 2
        H, D, bs = num_kv_heads, head_size, block_size
        n_elem = 2 * bs * H * D
        ids = torch.arange(n_elem, device=device).view(2, bs, H, D)
        base = codec.base
        n_digits = 1
        while base**n_digits < n_elem:
            n_digits += 1
        slots = torch.arange(bs, 2 * bs, device=device, dtype=torch.int64)
        decoded = None
        written = None
        for p in range(n_digits):
            digit = (ids // base**p) % base
            scratch = codec.scratch(scratch_shape, device)
            write(codec.written(digit[0], 0), codec.written(digit[1], 1), scratch, slots)
            blk = codec.read(scratch.movedim(block_dim, 0)[1])
            if decoded is None:
                decoded = torch.zeros(blk.shape, dtype=torch.int64, device=device)
                written = torch.ones(blk.shape, dtype=torch.bool, device=device)
            written &= blk >= 0
            decoded += blk.clamp(min=0).floor().long() * base**p
        assert decoded is not None and written is not None
        # Nothing may land outside block 1.
        other = codec.read(scratch.movedim(block_dim, 0)[0])
        if bool((other != -1).any()):
            raise LayoutProbeError("probe writes landed outside the probed block")
        coords = written.nonzero()  # [n_written, ndim-1]
        codes = decoded[written]
        if codes.numel() != n_elem or torch.unique(codes).numel() != n_elem:
            raise LayoutProbeError(
                f"could not derive the slot layout: {codes.numel()} coded elements for {n_elem}"
            )
        order = torch.argsort(codes)
        coords = coords[order]  # now in id order: (plane, offset, head, dim)
        index = coords.view(2, bs, H * D, -1).permute(1, 0, 2, 3).reshape(bs, 2 * H * D, -1)
        layout = cls(block_dim, bs, H, D, index.contiguous(), fmt)
        if fmt.quantized:
            layout.kv_format = fmt.with_rounding(layout._probe_rounding(write, codec, scratch_shape, device))
        return layout

    def _probe_rounding(self, write: WriteFn, codec: "_Codec", scratch_shape, device) -> str:
        """How the backend's op rounds to fp8, from values spread over the format's range
        (normal, subnormal, beyond the largest finite value): the first of
        :data:`~hae_vllm.kv_format.ROUNDINGS` that reproduces every stored byte."""
        H, D, bs = self.num_kv_heads, self.head_size, self.block_size
        gen = torch.Generator().manual_seed(0)
        spread = torch.logspace(-18, 13, bs, base=2.0)[None, :, None, None]  # one magnitude per slot
        x = (torch.randn(2, bs, H, D, generator=gen) * spread).to(codec.fmt.input_dtype).to(device)
        scratch = codec.scratch(scratch_shape, device)
        slots = torch.arange(bs, 2 * bs, device=device, dtype=torch.int64)
        k_scale, v_scale = codec.scales
        xk, xv = x[0] * k_scale, x[1] * v_scale
        write(xk, xv, scratch, slots)
        stored = self.gather(scratch, slots)  # [bs, 2, H, D] uint8
        for rounding in ROUNDINGS:
            fmt = codec.fmt.with_rounding(rounding)
            want = torch.stack([fmt.encode(xk, k_scale), fmt.encode(xv, v_scale)], dim=1)
            if torch.equal(stored.cpu(), want.cpu()):
                return rounding
        raise LayoutProbeError(f"the backend's {codec.fmt.cache_dtype} rounding is none of {ROUNDINGS}")

    # -------------------------------------------------------------- access
    def _flat(self, kv_cache: torch.Tensor, slots: torch.Tensor, keys_only: bool) -> torch.Tensor | None:
        """Flat element offsets [n, E] into a contiguous cache (one index op instead of one per
        dimension); None when the cache is not contiguous."""
        if not kv_cache.is_contiguous():
            return None
        strides = kv_cache.stride()
        key = (strides, keys_only, str(kv_cache.device))
        cache = self.__dict__.setdefault("_flat_cache", {})
        within = cache.get(key)
        if within is None:
            rest = [st for d, st in enumerate(strides) if d != self.block_dim]
            idx = self.index[:, : self.num_kv_heads * self.head_size] if keys_only else self.index
            within = _offsets(idx, rest).to(kv_cache.device)  # [bs, E]
            cache[key] = within
        slots = slots.to(kv_cache.device, torch.int64)
        return (slots // self.block_size * strides[self.block_dim])[:, None] + within[slots % self.block_size]

    def _affine(self, kv_cache: torch.Tensor):
        """Per K/V plane ``(offset, slot axis, head axis, dim axis)`` (see
        :class:`~hae_vllm.kernels.compaction.SlotGeometry`) when every element of a block sits at
        ``offset + S(o) + Hd(h) + Dd(d)`` with each term affine in the digits of its index (the
        CPU backend's vec layouts and FlashAttention's with one digit per axis, its AMX layout
        with VNNI pairs and 16-wide tiles), else None.  Then a slot is one strided sub-tensor of
        a view, and moving slots needs one ``[n]`` row index per plane instead of an
        ``[n, 2*H*D]`` offset table."""
        strides = kv_cache.stride()
        cache = self.__dict__.setdefault("_affine_cache", {})
        if strides in cache:
            return cache[strides]
        rest = [st for d, st in enumerate(strides) if d != self.block_dim]
        w = _offsets(self.index, rest).cpu()  # [bs, E] element offsets
        H, D, bs = self.num_kv_heads, self.head_size, self.block_size
        w = w.view(bs, 2, H, D)
        planes = []
        for p in range(2):
            base = int(w[0, p, 0, 0])
            axes = [_axis_digits(g - base) for g in (w[:, p, 0, 0], w[0, p, :, 0], w[0, p, 0, :])]
            if any(a is None for a in axes):
                planes = None
                break
            planes.append((base, *axes))
        if planes is not None:
            geom = SlotGeometry(1, bs, H, D, 0, tuple(planes))
            # Each axis was read along the others' zero; the whole block must agree.
            if not all(torch.equal(geom.offsets(p), w[:, p]) for p in range(2)):
                planes = None
            else:
                planes = geom.planes
        cache[strides] = planes
        return planes

    def geometry(self, kv_cache: torch.Tensor) -> SlotGeometry | None:
        """The cache's slot geometry (what the compaction kernel needs) when the layout is
        digit-affine and the cache contiguous, else None."""
        if not kv_cache.is_contiguous():
            return None
        planes = self._affine(kv_cache)
        if planes is None:
            return None
        return SlotGeometry(kv_cache.shape[self.block_dim], self.block_size, self.num_kv_heads, self.head_size,
                            kv_cache.stride(self.block_dim), tuple(planes))

    def _plane_views(self, kv_cache: torch.Tensor) -> list[torch.Tensor] | None:
        """Views of the K and V planes (:meth:`SlotGeometry.views`: ``[num_blocks, block_size,
        H, D]`` for a plain plane, one dimension per digit for a tiled one), or None."""
        geom = self.geometry(kv_cache)
        return None if geom is None else geom.views(kv_cache)

    def key_plane(self, kv_cache: torch.Tensor) -> torch.Tensor | None:
        """``[num_blocks, block_size, H, D]`` view of the key plane (what the scoring kernel
        reads in place), or None when no such view exists: a layout that is not digit-affine, or
        one whose key plane is tiled (AMX: a token's dims sit in pairs 32 elements apart, so the
        dim axis has no single stride).  Callers then gather the request's keys with
        :meth:`gather_keys`, for a tiled plane one indexed read through its digit view: on the
        CPU the same copy the in-place path makes (the scoring kernel's torch reference gathers
        the keys from the plane view too)."""
        geom = self.geometry(kv_cache)
        if geom is None or not geom.plain(0) or self.kv_format.quantized:
            # fp8 bytes cannot be read in place as keys: gather_keys decodes them.
            return None
        return geom.views(kv_cache)[0]

    def _coords(self, kv_cache: torch.Tensor, slots: torch.Tensor, keys_only: bool = False):
        slots = slots.to(self.index.device, torch.int64)
        blocks = (slots // self.block_size)[:, None]
        idx = self.index[slots % self.block_size]  # [n, E, ndim-1]
        if keys_only:
            idx = idx[:, : self.num_kv_heads * self.head_size]
        view = kv_cache.movedim(self.block_dim, 0)
        return view, (blocks.to(kv_cache.device),) + tuple(
            idx[..., r].to(kv_cache.device) for r in range(idx.shape[-1])
        )

    def gather(self, kv_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """[n] slots -> [n, 2, H, D] (K plane, V plane)."""
        geom = self.geometry(kv_cache)
        if geom is not None:
            return torch.stack([geom.gather(kv_cache, slots, p) for p in range(2)], dim=1)
        flat = self._flat(kv_cache, slots, keys_only=False)
        if flat is not None:
            return kv_cache.view(-1)[flat].view(-1, 2, self.num_kv_heads, self.head_size)
        view, coords = self._coords(kv_cache, slots)
        return view[coords].view(-1, 2, self.num_kv_heads, self.head_size)

    def gather_keys(self, kv_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """[n] slots -> keys [n, H, D] (post-RoPE) as attention reads them: an fp8 cache's
        bytes decoded with the layer's key scale, in the model's dtype."""
        keys = self._gather_stored_keys(kv_cache, slots)
        if self.kv_format.quantized:
            return self.kv_format.decode(keys, self.kv_format.scales_of(kv_cache)[0])
        return keys

    def as_stored_keys(self, keys: torch.Tensor, kv_cache: torch.Tensor) -> torch.Tensor:
        """Keys from a layer's input (``[n, H, D]``, any shape) as :meth:`gather_keys` will
        return them once the backend has stored them in ``kv_cache`` (rounded through an fp8
        cache's format and scale; unchanged otherwise)."""
        if not self.kv_format.quantized:
            return keys
        return self.kv_format.round_trip(keys, self.kv_format.scales_of(kv_cache)[0])

    def _gather_stored_keys(self, kv_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        geom = self.geometry(kv_cache)
        if geom is not None:
            return geom.gather(kv_cache, slots, 0)
        flat = self._flat(kv_cache, slots, keys_only=True)
        if flat is not None:
            return kv_cache.view(-1)[flat].view(-1, self.num_kv_heads, self.head_size)
        view, coords = self._coords(kv_cache, slots, keys_only=True)
        return view[coords].view(-1, self.num_kv_heads, self.head_size)

    def move(self, kv_cache: torch.Tensor, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """Copy every element of each source slot into the matching destination slot.

        Source and destination sets must be disjoint (the compaction plan guarantees it)."""
        self.move_many([kv_cache], src_slots, dst_slots)

    def swap(self, kv_cache: torch.Tensor, a_slots: torch.Tensor, b_slots: torch.Tensor) -> None:
        """Exchange the contents of two disjoint slot sets (parking keeps both sides' data)."""
        self.swap_many([kv_cache], a_slots, b_slots)

    def _pairs(self, caches: list[torch.Tensor], a_slots: torch.Tensor, b_slots: torch.Tensor):
        """Per cache: (flat view, offsets of a, offsets of b), or (movedim view, coords a, coords b)
        for a non-contiguous cache.  Offsets are computed once per distinct (strides, device):
        every layer of a model shares them, so one plan costs one index computation."""
        memo: dict = {}
        for kv in caches:
            if kv.is_contiguous():
                key = (kv.stride(), str(kv.device))
                if key not in memo:
                    memo[key] = (self._flat(kv, a_slots, keys_only=False), self._flat(kv, b_slots, keys_only=False))
                fa, fb = memo[key]
                yield kv.view(-1), fa, fb
            else:
                view, ca = self._coords(kv, a_slots)
                _, cb = self._coords(kv, b_slots)
                yield view, ca, cb

    def _split(self, caches: list[torch.Tensor]):
        """(caches grouped by geometry, dtype and device: the compaction kernel's unit; others)."""
        groups: dict = {}
        others = []
        for kv in caches:
            geom = self.geometry(kv)
            if geom is None:
                others.append(kv)
            else:
                groups.setdefault((geom, kv.dtype, str(kv.device)), []).append(kv)
        return [(key[0], group) for key, group in groups.items()], others

    def move_many(self, caches: list[torch.Tensor], src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
        """:meth:`move` on several caches of this layout (the layers of one model): one
        :func:`~hae_vllm.kernels.compaction.move_slots` per geometry (Triton on CUDA, indexed
        plane copies on the CPU and for tiled planes), the offset table for layouts that are
        not digit-affine."""
        self._move_many(caches, src_slots, dst_slots, swap=False)

    def swap_many(self, caches: list[torch.Tensor], a_slots: torch.Tensor, b_slots: torch.Tensor) -> None:
        """:meth:`swap` on several caches of this layout."""
        self._move_many(caches, a_slots, b_slots, swap=True)

    def _move_many(self, caches, a_slots, b_slots, swap: bool) -> None:
        if a_slots.numel() == 0:
            return
        groups, others = self._split(caches)
        for geom, group in groups:
            move_slots(group, geom, a_slots, b_slots, swap=swap, plans=self.host_plans)
        for view, a, b in self._pairs(others, a_slots, b_slots):
            va = view[a].clone() if swap else view[a]
            if swap:
                view[a] = view[b]
            view[b] = va


class _Codec:
    """What the probe writes for a digit and how it reads a stored element back.

    Unquantised caches hold the digit itself.  An fp8 cache stores ``written / scale``, rounded
    the backend's way (unknown yet), so digit ``d`` is written as ``(d + 1/4) * scale``: it is
    stored as a value in ``[d, d + 1/2)`` under truncation and round-to-nearest alike (fp8
    steps are at most 1 below 8), and ``floor`` gives ``d`` back.  Unwritten elements read
    as -1."""

    def __init__(self, dtype: torch.dtype, fmt: KVFormat, scales: tuple[float, float]) -> None:
        self.dtype, self.fmt, self.scales = dtype, fmt, scales
        if fmt.quantized:
            if dtype != torch.uint8 or fmt.input_dtype is None:
                raise LayoutProbeError(f"an {fmt.cache_dtype} KV cache must be uint8 with a known model dtype, "
                                       f"got {dtype} / {fmt.input_dtype}")
            self.base = _FP8_BASE
        elif dtype in (torch.float32, torch.float16, torch.bfloat16):
            self.base = _BASE
        else:
            raise LayoutProbeError(f"KV cache dtype {dtype} is not supported for eviction")

    def scratch(self, shape, device) -> torch.Tensor:
        if not self.fmt.quantized:
            return torch.full(shape, -1.0, dtype=self.dtype, device=device)
        minus_one = torch.tensor(-1.0).to(self.fmt.element).view(torch.uint8)
        return torch.full(shape, int(minus_one), dtype=torch.uint8, device=device)

    def written(self, digits: torch.Tensor, plane: int) -> torch.Tensor:
        if not self.fmt.quantized:
            return digits.to(self.dtype)
        return ((digits.double() + 0.25) * self.scales[plane]).to(self.fmt.input_dtype)

    def read(self, stored: torch.Tensor) -> torch.Tensor:
        if not self.fmt.quantized:
            return stored.float()
        return stored.contiguous().view(self.fmt.element).float()


def _offsets(index: torch.Tensor, strides: list[int]) -> torch.Tensor:
    """Element offsets of probed coordinates ``index [..., ndim-1]`` under ``strides``, on the
    index's device (the probe runs on the cache's device: a CUDA index times a host tensor
    would fail)."""
    return (index * torch.tensor(strides, dtype=torch.int64, device=index.device)).sum(-1)


def _axis_digits(g: torch.Tensor) -> tuple[tuple[int, int], ...] | None:
    """Mixed-radix digits ``((radix, stride), ...)``, most significant first, of one axis
    whose element offsets (relative to index 0) are ``g [n]``, or None.  Found from the lowest
    digit up: a digit is the longest run of equal steps at the start of what is left, and what
    is left is every ``radix``-th offset.  Only a candidate: the caller checks the whole block
    against it.  Negative strides are refused (``as_strided`` cannot express them)."""
    digits = []
    rest = g
    while rest.numel() > 1:
        m = rest.numel()
        s = int(rest[1])
        run = rest == torch.arange(m) * s
        r = m if bool(run.all()) else int((~run).nonzero()[0])
        if s < 0 or m % r:
            return None
        digits.append((r, s))
        rest = rest[::r]
    return tuple(reversed(digits))
