"""Triton kernels against their torch references (TRITON_INTERPRET=1 on CPU, CUDA when present):
random inputs, odd shapes (non-powers of two, a single key, empty), every dtype in use, and the
cache layouts the engine meets (FlashAttention's, the CPU backend's transposed key plane, and its
AMX tiling, which only the torch reference moves).

Run through tests/test_kernels.py in a fresh process: importing vLLM on CPU changes Triton's
global state, which breaks the interpreter for later kernels in the same process."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first kernel launch

from hae_vllm.kernels.compaction import (  # noqa: E402
    SlotGeometry, layer_stack, move_slots, move_slots_host, move_slots_ref)
from hae_vllm.kernels.scoring import HAS_TRITON, attention_mass, attention_stats, attention_stats_ref  # noqa: E402

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _key_plane(nb, bs, Hkv, D, dtype, transposed, g):
    """[nb, bs, Hkv, D] keys: contiguous (FlashAttention) or a view of [nb, Hkv, D, bs] storage
    (the CPU backend's transposed key plane)."""
    if transposed:
        return torch.randn(nb, Hkv, D, bs, generator=g).to(dtype).to(DEVICE).permute(0, 3, 1, 2)
    return torch.randn(nb, bs, Hkv, D, generator=g).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("H,Hkv,D,bs,T,nq", [(4, 2, 32, 16, 77, 5), (3, 1, 24, 16, 1, 1), (2, 2, 80, 32, 130, 3),
                                             (8, 4, 64, 16, 40, 0), (6, 2, 16, 32, 150, 21)])
def test_attention_stats_matches_reference(dtype, transposed, H, Hkv, D, bs, T, nq):
    g = torch.Generator().manual_seed(T + D)
    nb = (T + bs - 1) // bs + 3
    plane = _key_plane(nb, bs, Hkv, D, dtype, transposed, g)
    table = torch.randperm(nb, generator=g)[: (T + bs - 1) // bs].to(DEVICE)
    q = torch.randn(nq, H, D, generator=g).to(dtype).to(DEVICE)
    qpos = torch.sort(torch.randint(0, T, (nq,), generator=g)).values.to(DEVICE)
    rows, hs = attention_stats(q, plane, table, qpos, T, D**-0.5, per_head=True, impl="triton")
    ref_rows, ref_hs = attention_stats_ref(q, plane, table, qpos, T, D**-0.5, per_head=True)
    assert rows.shape == (nq, T) and hs.shape == (H, T)
    torch.testing.assert_close(rows, ref_rows, rtol=TOL[dtype], atol=TOL[dtype])
    torch.testing.assert_close(hs, ref_hs, rtol=TOL[dtype], atol=TOL[dtype])
    if nq:  # each row is a sum of H probability distributions over its visible keys
        torch.testing.assert_close(rows.sum(1).cpu(), torch.full((nq,), float(H)), rtol=1e-4, atol=1e-4)
    mass = attention_mass(q, plane, table, qpos, T, D**-0.5, impl="triton")
    assert torch.equal(mass, rows)  # deterministic: no atomics


def test_attention_stats_reference_against_dense_softmax():
    """The reference itself, against a direct per-head softmax over gathered keys."""
    g = torch.Generator().manual_seed(3)
    H, Hkv, D, bs, T = 4, 2, 16, 16, 40
    plane = _key_plane(4, bs, Hkv, D, torch.float32, True, g)
    table = torch.tensor([2, 0, 3])
    q = torch.randn(3, H, D, generator=g)
    qpos = torch.tensor([5, 20, 39])
    rows, hs = attention_stats_ref(q, plane, table, qpos, T, 0.25, per_head=True)
    keys = torch.stack([plane[table[j // bs], j % bs] for j in range(T)])  # [T, Hkv, D]
    want = torch.zeros(H, 3, T)
    for h in range(H):
        for i in range(3):
            n = int(qpos[i]) + 1
            want[h, i, :n] = torch.softmax(keys[:n, h // (H // Hkv)] @ q[i, h] * 0.25, 0)
    torch.testing.assert_close(rows, want.sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hs, want.sum(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("query_heads", [None, 8, 1])
def test_attention_stats_reference_in_slices_reads_only_visible_keys(query_heads, monkeypatch):
    """The CPU path scores queries in slices of a fixed size and reads keys only as far as its
    last query sees: the same numbers as one dense softmax, for unsorted queries that stop
    short of the last key (their later columns exactly zero)."""
    from hae_vllm.kernels import scoring

    if query_heads is not None:  # slices of 2 queries, and of 1
        monkeypatch.setattr(scoring, "SLICE_QUERY_HEADS", query_heads)
        monkeypatch.setattr(scoring, "MIN_SLICE_QUERIES", 1)
    g = torch.Generator().manual_seed(5)
    H, Hkv, D, bs, T = 4, 2, 16, 16, 48
    plane = _key_plane(4, bs, Hkv, D, torch.float32, True, g)
    table = torch.tensor([2, 0, 3])
    q = torch.randn(5, H, D, generator=g)
    qpos = torch.tensor([30, 3, 17, 30, 9])
    rows, hs = attention_stats_ref(q, plane, table, qpos, T, 0.25, per_head=True)
    keys = torch.stack([plane[table[j // bs], j % bs] for j in range(T)])
    want = torch.zeros(H, len(qpos), T)
    for h in range(H):
        for i in range(len(qpos)):
            n = int(qpos[i]) + 1
            want[h, i, :n] = torch.softmax(keys[:n, h // (H // Hkv)] @ q[i, h] * 0.25, 0)
    assert rows.shape == (5, T) and hs.shape == (H, T)
    torch.testing.assert_close(rows, want.sum(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hs, want.sum(1), rtol=1e-5, atol=1e-6)
    assert not rows[:, 31:].any() and not hs[:, 31:].any()


def test_attention_stats_checks_shapes():
    with pytest.raises(ValueError):
        attention_stats(torch.zeros(1, 4, 16), torch.zeros(2, 16, 3, 16), torch.zeros(2), torch.zeros(1), 8, 1.0)
    with pytest.raises(ValueError):
        attention_stats(torch.zeros(1, 4, 16), torch.zeros(2, 16, 2, 16), torch.zeros(1), torch.zeros(1), 40, 1.0)


def _random(g, dtype, *shape):
    """Random cache contents: normal values, or every byte value for a uint8 (fp8) cache."""
    if dtype == torch.uint8:
        return torch.randint(0, 256, shape, generator=g, dtype=torch.uint8).to(DEVICE)
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


def _caches(L, nb, bs, H, D, dtype, layout, g):
    """L separately allocated layer caches and their geometry: FlashAttention's
    [2, nb, bs, H, D], a CPU-like [nb, 2, ...] block with the key plane transposed, or the CPU
    backend's AMX tiling (plane digits as vLLM 0.32 writes bf16; needs bs % 16 == 0, D % 16 == 0)."""
    if layout == "flash":
        caches = [_random(g, dtype, 2, nb, bs, H, D) for _ in range(L)]
        return caches, SlotGeometry.flash(nb, bs, H, D)
    per = bs * H * D
    caches = [_random(g, dtype, nb, 2 * per) for _ in range(L)]
    if layout == "cpu":
        # Per block: K as [H, D, bs] (element (h, d, o) at h*D*bs + d*bs + o), then V as [bs, H, D].
        return caches, SlotGeometry(nb, bs, H, D, 2 * per, ((0, 1, D * bs, bs), (per, H * D, D, 1)))
    # Per head: K as [bs/16, D/2, 16, 2] (VNNI pairs of dims), then V as [D/16, bs/2, 16, 2]
    # (pairs of tokens).
    head = 2 * bs * D
    key = (0, ((bs // 16, 16 * D), (16, 2)), head, ((D // 2, 32), (2, 1)))
    value = (bs * D, ((bs // 2, 32), (2, 1)), head, ((D // 16, 16 * bs), (16, 2)))
    return caches, SlotGeometry(nb, bs, H, D, 2 * per, (key, value))


def _elem(geom, plane, slot, h, d):
    """Element offset of (plane, slot, head, dim), digit by digit in plain Python (independent of
    SlotGeometry's own index arithmetic)."""
    off, *axes = geom.planes[plane]
    total = off + slot // geom.block_size * geom.block_stride
    for x, axis, size in zip((slot % geom.block_size, h, d), axes, (geom.block_size, geom.num_kv_heads,
                                                                     geom.head_size)):
        digits = [(size, axis)] if isinstance(axis, int) else list(axis)
        for radix, stride in reversed(digits):
            total += x % radix * stride
            x //= radix
    return total


def _naive_move(caches, geom, src, dst, swap):
    """Element by element through the geometry's formula (independent of both implementations)."""
    H, D = geom.num_kv_heads, geom.head_size
    for c in caches:
        flat = c.view(-1)
        for s, t in zip(src.tolist(), dst.tolist()):
            for p in range(2):
                for h in range(H):
                    for d in range(D):
                        a, b = _elem(geom, p, s, h, d), _elem(geom, p, t, h, d)
                        va, vb = flat[a].clone(), flat[b].clone()
                        flat[b] = va
                        if swap:
                            flat[a] = vb


# uint8: an fp8 KV cache (vLLM allocates it as bytes).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("layout", ["flash", "cpu"])
@pytest.mark.parametrize("L,nb,bs,H,D,n", [(3, 6, 16, 2, 32, 7), (1, 4, 16, 1, 24, 1), (4, 5, 32, 3, 40, 0)])
def test_move_slots_matches_reference(dtype, swap, layout, L, nb, bs, H, D, n):
    g = torch.Generator().manual_seed(n + D)
    caches, geom = _caches(L, nb, bs, H, D, dtype, layout, g)
    perm = torch.randperm(nb * bs, generator=g)
    src, dst = perm[:n].to(DEVICE), perm[n : 2 * n].to(DEVICE)
    ref = [c.clone() for c in caches]
    move_slots_ref(ref, geom, src, dst, swap)
    move_slots(caches, geom, src, dst, swap, impl="triton")
    for c, r in zip(caches, ref):
        assert torch.equal(c, r)


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("layout", ["flash", "cpu", "amx"])
def test_move_slots_reference_against_naive(swap, layout):
    g = torch.Generator().manual_seed(7)
    caches, geom = _caches(2, 3, 16, 2, 16, torch.float32, layout, g)
    src, dst = torch.tensor([0, 17, 33]), torch.tensor([5, 40, 18])
    want = [c.clone() for c in caches]
    _naive_move(want, geom, src, dst, swap)
    move_slots_ref(caches, geom, src, dst, swap)
    assert all(torch.equal(c, w) for c, w in zip(caches, want))
    assert not all(torch.equal(c, w) for c, w in zip(caches, _caches(2, 3, 16, 2, 16, torch.float32, layout,
                                                                       torch.Generator().manual_seed(7))[0]))


def test_move_slots_views_of_one_buffer():
    """Layers as views into one allocation (how vLLM may carve its KV buffer), at offsets."""
    g = torch.Generator().manual_seed(1)
    nb, bs, H, D = 4, 16, 2, 8
    buf = torch.randn(3 * 2 * nb * bs * H * D + 5, generator=g).to(DEVICE)
    geom = SlotGeometry.flash(nb, bs, H, D)
    per = 2 * nb * bs * H * D
    caches = [buf[5 + i * per : 5 + (i + 1) * per].view(2, nb, bs, H, D) for i in (2, 0, 1)]
    ref_buf = buf.clone()
    ref = [ref_buf[5 + i * per : 5 + (i + 1) * per].view(2, nb, bs, H, D) for i in (2, 0, 1)]
    src, dst = torch.tensor([3, 20, 61]).to(DEVICE), torch.tensor([9, 33, 2]).to(DEVICE)
    move_slots_ref(ref, geom, src, dst, True)
    move_slots(caches, geom, src, dst, True, impl="triton")
    assert torch.equal(buf, ref_buf)


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("layout", ["flash", "cpu", "amx"])
@pytest.mark.parametrize("gap", [0, 7])
def test_move_slots_reference_on_one_buffer_against_naive(swap, layout, gap):
    """Layers carved from one buffer: equally spaced (gap 0) they are moved all at once through
    layer_stack's views, unequally (a gap after the first) layer by layer; both against the
    element-by-element formula, every layer's bytes and the buffer's gaps included."""
    g = torch.Generator().manual_seed(3 + gap)
    L, nb, bs, H, D = 3, 3, 16, 2, 16
    sep, geom = _caches(L, nb, bs, H, D, torch.float32, layout, g)
    per = sep[0].numel()
    starts = [5, 5 + per + gap, 5 + 2 * per + gap]
    buf = torch.randn(starts[-1] + per + 3, generator=g).to(DEVICE)
    caches = [buf[o : o + per].view(sep[0].shape) for o in starts]
    caches = [caches[2], caches[0], caches[1]]  # any order
    assert (layer_stack(caches, geom) is not None) == (gap == 0)
    want_buf = buf.clone()
    want = [want_buf[o : o + per].view(sep[0].shape) for o in starts]
    want = [want[2], want[0], want[1]]
    src, dst = torch.tensor([0, 17, 33]).to(DEVICE), torch.tensor([5, 40, 18]).to(DEVICE)
    _naive_move(want, geom, src, dst, swap)
    move_slots_ref(caches, geom, src, dst, swap)
    assert torch.equal(buf, want_buf) and not torch.equal(buf, buf.clone().zero_())


@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("layout", ["flash", "cpu", "amx"])
@pytest.mark.parametrize("gap", [None, 0, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.skipif(DEVICE != "cpu", reason="the host path moves host caches")
def test_move_slots_host_against_naive(swap, layout, gap, dtype):
    """The numpy host path (what the CPU engine runs when it parks and compacts) against the
    element-by-element formula: separate layer caches (gap None), or carved from one buffer,
    equally spaced (stacked) or not; twice on the same caches (the plan kept in the caller's
    dict the second time)."""
    g = torch.Generator().manual_seed(11 + (gap or 0))
    L, nb, bs, H, D = 3, 3, 16, 2, 16
    sep, geom = _caches(L, nb, bs, H, D, dtype, layout, g)
    if gap is None:
        caches = sep
        want = [c.clone() for c in caches]
    else:
        per = sep[0].numel()
        starts = [5, 5 + per + gap, 5 + 2 * per + gap]
        buf = _random(g, dtype, starts[-1] + per + 3)
        caches = [buf[o : o + per].view(sep[0].shape) for o in starts]
        want_buf = buf.clone()
        want = [want_buf[o : o + per].view(sep[0].shape) for o in starts]
    before = [c.clone() for c in caches]
    plans: dict = {}
    for src, dst in ((torch.tensor([0, 17, 33]), torch.tensor([5, 40, 18])), (torch.tensor([2]), torch.tensor([47]))):
        _naive_move(want, geom, src, dst, swap)
        assert move_slots_host(caches, geom, src.numpy(), dst.numpy(), swap, plans)
        assert all(torch.equal(c, w) for c, w in zip(caches, want))
        assert len(plans) == 1  # the caller's cache holds this set's plan, reused the second time
    assert not all(torch.equal(c, b) for c, b in zip(caches, before))
    if gap is not None:
        assert torch.equal(buf, want_buf)  # the buffer's gaps untouched


def test_layer_stack_refuses_what_it_cannot_stack():
    geom = SlotGeometry.flash(4, 16, 1, 8)
    buf = torch.zeros(3 * 1024)
    same = buf[:1024].view(2, 4, 16, 1, 8)
    assert layer_stack([same], geom) is None  # one layer: nothing to stack
    assert layer_stack([same, same], geom) is None  # the same layer twice
    overlap = [buf[o : o + 1024].view(2, 4, 16, 1, 8) for o in (0, 512, 1024)]
    assert layer_stack(overlap, geom) is None
    apart = [torch.zeros(2, 4, 16, 1, 8) for _ in range(2)]  # separate allocations
    assert layer_stack(apart, geom) is None
    spaced = [buf[o : o + 1024].view(2, 4, 16, 1, 8) for o in (0, 1024, 2048)]
    views = layer_stack(spaced, geom)
    assert views is not None and views[0].shape == (3, 4, 16, 1, 8)
    views[1][2, 3, 15, 0, 7] = 1.0  # the last element of the last layer's V plane
    assert spaced[2][1, 3, 15, 0, 7] == 1.0 and buf[-1] == 1.0


def test_move_slots_checks_shapes():
    geom = SlotGeometry.flash(4, 16, 1, 8)
    with pytest.raises(ValueError):
        move_slots([torch.zeros(2, 4, 16, 1, 8)], geom, torch.zeros(2), torch.zeros(1))
    with pytest.raises(ValueError):
        move_slots([torch.zeros(2, 4, 16, 1, 8), torch.zeros(2, 4, 16, 1, 8, dtype=torch.float16)], geom,
                   torch.zeros(1), torch.zeros(1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("L,nb,bs,H,D,n", [(3, 4, 32, 2, 64, 9), (1, 3, 64, 1, 32, 1), (2, 2, 32, 3, 48, 0)])
def test_tiled_geometry_moves_through_the_reference(dtype, swap, L, nb, bs, H, D, n):
    """A tiled (AMX) geometry is not plain: "auto" takes the torch reference, which matches the
    element-by-element formula, and the Triton kernel refuses it rather than misaddress."""
    g = torch.Generator().manual_seed(n + D + L)
    caches, geom = _caches(L, nb, bs, H, D, dtype, "amx", g)
    assert not geom.plain() and not geom.plain(0) and not geom.plain(1)
    perm = torch.randperm(nb * bs, generator=g)
    src, dst = perm[:n].to(DEVICE), perm[n : 2 * n].to(DEVICE)
    want = [c.clone() for c in caches]
    _naive_move(want, geom, src[:2], dst[:2], swap)  # the formula is slow: two slots of it
    ref = [c.clone() for c in caches]
    move_slots_ref(ref, geom, src[:2], dst[:2], swap)
    assert all(torch.equal(r, w) for r, w in zip(ref, want))
    ref = [c.clone() for c in caches]
    move_slots_ref(ref, geom, src, dst, swap)
    move_slots(caches, geom, src, dst, swap)
    assert all(torch.equal(c, r) for c, r in zip(caches, ref))
    if n:
        with pytest.raises(ValueError):
            move_slots(caches, geom, src, dst, swap, impl="triton")


def test_slot_geometry_views_and_gather_follow_the_digits():
    """Views have one dimension per digit; gather reads ``[n, H, D]`` through them, equal to
    reading every element at its formula offset; offsets() is the same formula."""
    g = torch.Generator().manual_seed(5)
    nb, bs, H, D = 3, 32, 2, 32
    (cache,), geom = _caches(1, nb, bs, H, D, torch.float32, "amx", g)
    kview, vview = geom.views(cache)
    assert kview.shape == (nb, bs // 16, 16, H, D // 2, 2) and vview.shape == (nb, bs // 2, 2, H, D // 16, 16)
    slots = torch.tensor([0, 15, 16, 33, 95]).to(DEVICE)
    flat = cache.view(-1)
    for p in range(2):
        want = torch.stack([torch.stack([torch.stack([flat[_elem(geom, p, int(s), h, d)] for d in range(D)])
                                         for h in range(H)]) for s in slots.tolist()])
        assert torch.equal(geom.gather(cache, slots, p), want)
        offs = torch.tensor([[[_elem(geom, p, o, h, d) for d in range(D)] for h in range(H)] for o in range(bs)])
        assert torch.equal(geom.offsets(p), offs)


def test_slot_geometry_is_canonical():
    """A single digit is its stride, radix-1 digits vanish: equal layouts compare (and group)
    equal, and digits must cover their axis."""
    plain = SlotGeometry(2, 16, 1, 8, 256, ((0, 1, 0, 16), (128, 8, 0, 1)))
    spelled = SlotGeometry(2, 16, 1, 8, 256, ((0, ((16, 1),), ((1, 99),), 16), (128, ((1, 5), (16, 8)), 0, 1)))
    assert spelled == plain and hash(spelled) == hash(plain) and plain.plain()
    with pytest.raises(ValueError):
        SlotGeometry(2, 16, 1, 8, 256, ((0, ((4, 1), (2, 4)), 0, 16), (128, 8, 0, 1)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scoring_over_gathered_tiled_keys_equals_in_place_scoring(dtype):
    """What the runtime does when the key plane is tiled (no [nb, bs, H, D] view): gather the
    request's keys through the digit view, then the dense statistics.  Same numbers as scoring
    the same keys in place from a plain plane."""
    from hae_vllm.kernels.scoring import dense_attention_stats

    g = torch.Generator().manual_seed(11)
    nb, bs, Hkv, D, H, T = 6, 32, 2, 32, 4, 77
    (cache,), geom = _caches(1, nb, bs, Hkv, D, dtype, "amx", g)
    plain = torch.empty(nb, bs, Hkv, D, dtype=dtype, device=DEVICE)
    every = torch.arange(nb * bs, device=DEVICE)
    plain.view(-1, Hkv, D)[:] = geom.gather(cache, every, 0)
    table = torch.randperm(nb, generator=g)[: -(-T // bs)].to(DEVICE)
    pos = torch.arange(T, device=DEVICE)
    keys = geom.gather(cache, table[pos // bs] * bs + pos % bs, 0)
    q = torch.randn(5, H, D, generator=g).to(dtype).to(DEVICE)
    qpos = torch.tensor([3, 30, 31, 60, 76], device=DEVICE)
    rows, hs = dense_attention_stats(q, keys, qpos, D**-0.5, True)
    ref_rows, ref_hs = attention_stats_ref(q, plain, table, qpos, T, D**-0.5, per_head=True)
    assert torch.equal(rows, ref_rows) and torch.equal(hs, ref_hs)
