"""The slot layout is derived from the CPU backend's own cache-update op, for every ISA/dtype."""

import pytest
import torch

from hae_vllm.layout import LayoutProbeError, SlotLayout

ops = pytest.importorskip("vllm._custom_ops")


def cpu_writer(isa, bs):
    def write(k, v, cache, slots):
        n, h, _, _ = cache.shape
        kv = cache.view(n, h, 2 * bs, -1)
        kc, vc = kv.chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")

    return write


CASES = [
    (torch.float32, "vec", 32, 2, 32),
    (torch.bfloat16, "vec", 32, 2, 64),
    (torch.float16, "vec", 64, 4, 32),
    (torch.bfloat16, "vec16", 16, 1, 48),
]
if torch.cpu._is_amx_tile_supported():
    CASES.append((torch.bfloat16, "amx", 32, 2, 64))


@pytest.mark.parametrize("dtype,isa,bs,H,D", CASES)
def test_probe_gather_move_roundtrip(dtype, isa, bs, H, D):
    nb = 9
    write = cpu_writer(isa, bs)
    layout = SlotLayout.probe(write, (nb, H, bs, 2 * D), dtype, nb, bs, H, D)
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
    # Move 17 tokens into free slots; bit-exact, and untouched slots stay untouched.
    used = set(slots.tolist())
    free = torch.tensor([s for s in range(nb * bs) if s not in used][:17])
    before = cache.clone()
    layout.move(cache, slots[:17], free)
    moved = layout.gather(cache, free)
    assert torch.equal(moved[:, 0], k[:17]) and torch.equal(moved[:, 1], v[:17])
    assert torch.equal(layout.gather(cache, slots), layout.gather(before, slots))


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


@pytest.mark.parametrize("dtype,isa,bs,H,D", CASES)
def test_strided_plane_path_equals_offset_table_path(dtype, isa, bs, H, D):
    """Moves and swaps through the [blocks, slots, H, D] plane views give bit-for-bit what the
    per-element offset table gives (the path for layouts that are not affine)."""
    nb = 9
    write = cpu_writer(isa, bs)
    layout = SlotLayout.probe(write, (nb, H, bs, 2 * D), dtype, nb, bs, H, D)
    g = torch.Generator().manual_seed(bs * H + D)
    caches = [torch.randn(nb, H, bs, 2 * D, generator=g).to(dtype) for _ in range(3)]
    assert layout._plane_views(caches[0]) is not None, "CPU layouts are affine"
    table = SlotLayout(layout.block_dim, bs, H, D, layout.index)
    table.geometry = lambda kv: None  # force the offset-table path for the reference
    ref = [c.clone() for c in caches]
    perm = torch.randperm(nb * bs, generator=g)
    a, b = perm[:40], perm[40:80]
    layout.swap_many(caches, a, b)
    table.swap_many(ref, a, b)
    layout.move_many(caches, perm[80:100], perm[100:120])
    table.move_many(ref, perm[80:100], perm[100:120])
    for c, r in zip(caches, ref):
        assert torch.equal(c, r)
    assert torch.equal(layout.gather_keys(caches[1], perm[:50]), table.gather_keys(ref[1], perm[:50]))


def test_non_affine_layout_falls_back_to_offset_table():
    """A block whose elements are not at offset + o*so + h*sh + d*sd (dims reversed for one
    head) is moved element by element, correctly."""
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
    assert layout._plane_views(cache) is None
    slots = torch.tensor([1, 9, 17, 30])
    k, v = torch.randn(4, H, D), torch.randn(4, H, D)
    odd_write(k, v, cache, slots)
    layout.swap(cache, slots[:2], slots[2:])
    assert torch.equal(layout.gather_keys(cache, slots[2:]), k[:2])
    assert torch.equal(layout.gather(cache, slots[:2])[:, 1], v[2:])
