"""The slot layout is derived from the CPU backend's own cache-update op, for every ISA/dtype.

The AMX cases run on every machine: ``cpu_attn_reshape_and_cache`` with isa "amx" is plain
scalar code (only the attention kernel needs the tile unit), so the layout an AMX machine gets is
probed and moved here too.  Only which ISA vLLM *picks* depends on the machine, and no test
relies on that."""

import pytest
import torch

from hae_vllm.layout import LayoutProbeError, SlotLayout, _axis_digits

ops = pytest.importorskip("vllm._custom_ops")


def cpu_writer(isa, bs):
    def write(k, v, cache, slots):
        n, h, _, _ = cache.shape
        kv = cache.view(n, h, 2 * bs, -1)
        kc, vc = kv.chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")

    return write


# (dtype, isa, block_size, H, D).  The op takes head sizes that are multiples of 16 and, for
# "vec"/"amx", block sizes that are multiples of 32.  vLLM picks "amx" for bf16 only (and
# "vec16" for head sizes that are not multiples of 32), but the op tiles fp16 and fp32 the same
# way, so they are covered too.
CASES = [
    (torch.float32, "vec", 32, 2, 32),
    (torch.bfloat16, "vec", 32, 2, 64),
    (torch.float16, "vec", 64, 4, 32),
    (torch.bfloat16, "vec", 128, 3, 80),
    (torch.bfloat16, "vec16", 16, 1, 48),
    (torch.float16, "vec16", 16, 2, 128),
    (torch.bfloat16, "amx", 32, 2, 64),
    (torch.bfloat16, "amx", 32, 1, 32),
    (torch.bfloat16, "amx", 64, 3, 128),
    (torch.bfloat16, "amx", 128, 4, 64),
    (torch.bfloat16, "amx", 64, 2, 48),  # head size not a multiple of 32: the op does not tile
    (torch.bfloat16, "amx", 32, 1, 80),
    (torch.float16, "amx", 32, 2, 64),
    (torch.float16, "amx", 128, 1, 128),
    (torch.float32, "amx", 64, 2, 32),
]


def tiled(isa, D):
    """Whether the op tiles the planes for the matrix unit (so no plain plane view exists)."""
    return isa == "amx" and D % 32 == 0


def probe(dtype, isa, bs, H, D, nb=9):
    return SlotLayout.probe(cpu_writer(isa, bs), (nb, H, bs, 2 * D), dtype, nb, bs, H, D)


@pytest.mark.parametrize("dtype,isa,bs,H,D", CASES)
def test_probe_gather_move_roundtrip(dtype, isa, bs, H, D):
    nb = 9
    write = cpu_writer(isa, bs)
    layout = probe(dtype, isa, bs, H, D, nb)
    cache = torch.zeros(nb, H, bs, 2 * D, dtype=dtype)
    g = torch.Generator().manual_seed(bs + D)
    n = 3 * bs + 5
    slots = torch.randperm(nb * bs, generator=g)[:n]
    k = torch.randn(n, H, D, generator=g).to(dtype)
    v = torch.randn(n, H, D, generator=g).to(dtype)
    write(k, v, cache, slots)
    got = layout.gather(cache, slots)
    assert torch.equal(got[:, 0], k) and torch.equal(got[:, 1], v)
    assert torch.equal(layout.gather_keys(cache, slots), k)
    plane = layout.key_plane(cache)
    if tiled(isa, D):
        assert plane is None  # callers gather the keys instead
    else:
        assert torch.equal(plane[slots // bs, slots % bs], k)
    # Move 17 tokens into free slots; bit-exact, and untouched slots stay untouched.
    used = set(slots.tolist())
    free = torch.tensor([s for s in range(nb * bs) if s not in used][:17])
    before = cache.clone()
    layout.move(cache, slots[:17], free)
    moved = layout.gather(cache, free)
    assert torch.equal(moved[:, 0], k[:17]) and torch.equal(moved[:, 1], v[:17])
    assert torch.equal(layout.gather(cache, slots), layout.gather(before, slots))
    # Swap written tokens with each other: both sides keep their data.
    layout.swap(cache, slots[:5], slots[5:10])
    assert torch.equal(layout.gather_keys(cache, slots[5:10]), k[:5])
    assert torch.equal(layout.gather(cache, slots[:5])[:, 1], v[5:10])
    # Empty moves touch nothing.
    after = cache.clone()
    empty = torch.zeros(0, dtype=torch.int64)
    layout.move(cache, empty, empty)
    layout.swap_many([cache], empty, empty)
    assert torch.equal(cache, after)
    assert layout.gather_keys(cache, empty).shape == (0, H, D)


@pytest.mark.parametrize("dtype,isa,bs,H,D", CASES)
def test_layout_is_digit_affine_on_every_isa(dtype, isa, bs, H, D):
    """Every layout the CPU backend writes has a slot geometry (the fast path); vec/vec16 and
    untiled ones are plain affine, AMX's tiled one is affine digit by digit."""
    layout = probe(dtype, isa, bs, H, D)
    cache = torch.zeros(9, H, bs, 2 * D, dtype=dtype)
    geom = layout.geometry(cache)
    assert geom is not None
    assert geom.plain() == (not tiled(isa, D))
    assert (layout.key_plane(cache) is None) == tiled(isa, D)
    views = layout._plane_views(cache)
    assert views[0].shape[0] == 9 and views[0].numel() == 9 * bs * H * D


@pytest.mark.parametrize("bs,H,D", [(32, 2, 64), (64, 1, 32), (128, 3, 128)])
def test_amx_bf16_layout_formula(bs, H, D):
    """The AMX bf16 layout vLLM 0.32 writes, written out (a canary: nothing relies on it, the
    probe finds whatever the op does).  In a head's ``[2*bs, D]`` rows, the key plane holds
    16-token tiles of VNNI pairs (two consecutive dims of a token side by side), the value
    plane 16-dim column tiles of token pairs."""
    layout = probe(torch.bfloat16, "amx", bs, H, D)
    geom = layout.geometry(torch.zeros(9, H, bs, 2 * D, dtype=torch.bfloat16))
    o, h, d = torch.meshgrid(torch.arange(bs), torch.arange(H), torch.arange(D), indexing="ij")
    head = h * 2 * bs * D
    key = head + (o // 16) * 16 * D + (d // 2) * 32 + 2 * (o % 16) + d % 2
    value = head + bs * D + (d // 16) * 16 * bs + (o // 2) * 32 + 2 * (d % 16) + o % 2
    assert torch.equal(geom.offsets(0), key) and torch.equal(geom.offsets(1), value)


def test_probe_refuses_unknown_dtype():
    with pytest.raises(LayoutProbeError):
        SlotLayout.probe(lambda *a: None, (4, 1, 16, 32), torch.int8, 4, 16, 1, 16)


def test_probe_detects_a_layout_it_cannot_decode():
    def lossy(k, v, cache, slots):  # writes only keys: values never land
        cache.view(cache.shape[0], -1)[1, : k.numel()] = k.flatten()

    with pytest.raises(LayoutProbeError):
        SlotLayout.probe(lossy, (4, 1, 16, 32), torch.float32, 4, 16, 1, 16)


def test_probe_handles_flash_attention_style_layout():
    """CUDA FlashAttention keeps [2, num_blocks, block_size, heads, dim]: block dim is 1."""
    bs, H, D, nb = 16, 2, 8, 5

    def fa_write(k, v, cache, slots):  # what reshape_and_cache_flash does, in torch
        b, o = slots // bs, slots % bs
        cache[0, b, o] = k
        cache[1, b, o] = v

    layout = SlotLayout.probe(fa_write, (2, nb, bs, H, D), torch.float16, nb, bs, H, D)
    assert layout.block_dim == 1
    cache = torch.zeros(2, nb, bs, H, D, dtype=torch.float16)
    slots = torch.tensor([3, 17, 40, 79])
    k, v = torch.randn(4, H, D).half(), torch.randn(4, H, D).half()
    fa_write(k, v, cache, slots)
    assert torch.equal(layout.gather_keys(cache, slots), k)
    layout.move(cache, slots[:2], torch.tensor([60, 61]))
    assert torch.equal(layout.gather(cache, torch.tensor([60, 61]))[:, 1], v[:2])


def test_non_contiguous_cache_uses_coordinates():
    """A cache that is a strided view (padding in the last dim) takes the per-dimension path."""
    bs, H, D, nb = 16, 2, 8, 5

    def fa_write(k, v, cache, slots):
        b, o = slots // bs, slots % bs
        cache[0, b, o] = k
        cache[1, b, o] = v

    layout = SlotLayout.probe(fa_write, (2, nb, bs, H, D), torch.float32, nb, bs, H, D)
    cache = torch.zeros(2, nb, bs, H, D + 3)[..., :D]
    assert not cache.is_contiguous()
    slots = torch.tensor([1, 20, 33, 70])
    k, v = torch.randn(4, H, D), torch.randn(4, H, D)
    fa_write(k, v, cache, slots)
    assert torch.equal(layout.gather_keys(cache, slots), k)
    layout.swap(cache, slots[:2], slots[2:])
    assert torch.equal(layout.gather(cache, slots[2:])[:, 1], v[:2])
    assert torch.equal(layout.gather(cache, slots[:2])[:, 0], k[2:])


def offset_table(layout):
    """The same layout with the fast path switched off: every move through the per-element
    offset table (the path for layouts that are not digit-affine)."""
    table = SlotLayout(layout.block_dim, layout.block_size, layout.num_kv_heads, layout.head_size, layout.index)
    table.geometry = lambda kv: None
    return table


@pytest.mark.parametrize("carved", [False, True])
@pytest.mark.parametrize("dtype,isa,bs,H,D", CASES)
def test_strided_plane_path_equals_offset_table_path(dtype, isa, bs, H, D, carved):
    """Moves and swaps through the plane views (one dimension per digit where the backend
    tiles) give bit-for-bit what the per-element offset table gives, on separate layer caches
    and on layers carved from one buffer (moved all at once)."""
    nb = 9
    layout = probe(dtype, isa, bs, H, D, nb)
    g = torch.Generator().manual_seed(bs * H + D)
    shape = (nb, H, bs, 2 * D)
    if carved:
        per = nb * H * bs * 2 * D
        buf = torch.randn(3 * per, generator=g).to(dtype)
        caches = [buf[i * per : (i + 1) * per].view(shape) for i in range(3)]
        ref_buf = buf.clone()
        ref = [ref_buf[i * per : (i + 1) * per].view(shape) for i in range(3)]
    else:
        caches = [torch.randn(shape, generator=g).to(dtype) for _ in range(3)]
        ref = [c.clone() for c in caches]
    assert layout.geometry(caches[0]) is not None, "CPU layouts are digit-affine"
    table = offset_table(layout)
    perm = torch.randperm(nb * bs, generator=g)
    a, b = perm[:40], perm[40:80]
    layout.swap_many(caches, a, b)
    table.swap_many(ref, a, b)
    layout.move_many(caches, perm[80:100], perm[100:120])
    table.move_many(ref, perm[80:100], perm[100:120])
    layout.move_many(caches, perm[:0], perm[:0])
    for c, r in zip(caches, ref):
        assert torch.equal(c, r)
    assert not torch.equal(caches[0], caches[1])
    assert torch.equal(layout.gather_keys(caches[1], perm[:50]), table.gather_keys(ref[1], perm[:50]))
    assert torch.equal(layout.gather(caches[2], perm[50:90]), table.gather(ref[2], perm[50:90]))


def test_non_affine_layout_falls_back_to_offset_table():
    """A block whose elements are not digit-affine (dims reversed for one head) is moved
    element by element, correctly."""
    bs, H, D, nb = 8, 2, 4, 4

    def odd_write(k, v, cache, slots):
        b, o = slots // bs, slots % bs
        for i in range(len(slots)):
            for h in range(H):
                dims = range(D) if h == 0 else reversed(range(D))
                for j, d in enumerate(dims):
                    cache[b[i], 0, h, o[i], j] = k[i, h, d]
                    cache[b[i], 1, h, o[i], j] = v[i, h, d]

    layout = SlotLayout.probe(odd_write, (nb, 2, H, bs, D), torch.float32, nb, bs, H, D)
    cache = torch.zeros(nb, 2, H, bs, D)
    assert layout._plane_views(cache) is None and layout.key_plane(cache) is None
    slots = torch.tensor([1, 9, 17, 30])
    k, v = torch.randn(4, H, D), torch.randn(4, H, D)
    odd_write(k, v, cache, slots)
    layout.swap(cache, slots[:2], slots[2:])
    assert torch.equal(layout.gather_keys(cache, slots[2:]), k[:2])
    assert torch.equal(layout.gather(cache, slots[:2])[:, 1], v[2:])


@pytest.mark.parametrize("offsets,want", [
    ([0], ()),
    ([0, 3, 6, 9], ((4, 3),)),
    ([0, 2, 4, 6, 32, 34, 36, 38], ((2, 32), (4, 2))),
    ([0, 1, 32, 33, 64, 65], ((3, 32), (2, 1))),
    ([0, 1, 10, 11, 100, 101, 110, 111], ((2, 100), (2, 10), (2, 1))),
    ([0, 1, 2, 10, 11], None),  # a run of 3 does not divide 5
    ([0, -1, -2], None),  # as_strided cannot go backwards
])
def test_axis_digits(offsets, want):
    assert _axis_digits(torch.tensor(offsets)) == want
