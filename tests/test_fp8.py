"""Eviction with an fp8 KV cache (``--kv-cache-dtype fp8`` / ``fp8_e5m2``).

Without an engine: the layout probe, run through vLLM's own CPU cache-update op on the vec and
AMX layouts (the op needs no AMX hardware), finds where every fp8 byte lands and how the op
rounds; the torch reference of that rounding (:func:`~hae_vllm.kv_format.fp8_round`, which the
HF oracle uses) reproduces every stored byte, scales included; moves and swaps carry the
bytes; scoring reads keys decoded with the layer's scale.

With an engine (tiny LLaVA in fp8_e5m2, tiny Qwen2-VL in fp8 e4m3, float32 models, hae at
budget 0.5, chunked prefill, one request with a decode budget that parks and restores): every
request replays on the HF oracle whose cache holds the same fp8-rounded keys and values
(:class:`~hae_vllm.testing.fp8.RoundedKVOracle`), tokens identical, log-probs within the fp8
rounding noise; the same replay fails with the eviction set shifted by one, and on an oracle
that does not round.
"""

import pytest
import torch

from hae_vllm.kv_format import FP8_FORMATS, KVFormat, dequantized_query, fp8_round
from hae_vllm.layout import LayoutProbeError, SlotLayout

ops = pytest.importorskip("vllm._custom_ops")

SCALES = [(1.0, 1.0), (0.37, 2.5)]


def cpu_writer(isa, bs, cache_dtype, scales):
    def write(k, v, cache, slots):
        n, h, _, _ = cache.shape
        kc, vc = cache.view(n, h, 2 * bs, -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa, k_scale=scales[0], v_scale=scales[1],
                                       kv_cache_dtype=cache_dtype)

    return write


def probe(cache_dtype, isa, dtype, bs, H, D, scales, nb=7):
    fmt = KVFormat.named(cache_dtype, dtype)
    layout = SlotLayout.probe(cpu_writer(isa, bs, cache_dtype, scales), (nb, H, bs, 2 * D), torch.uint8, nb, bs,
                              H, D, kv_format=fmt, write_scales=scales)
    return layout


# (cache dtype, isa, model dtype, block size, H, D): vLLM picks "amx" for bf16 models on AMX
# machines and "vec" otherwise; fp8 needs head sizes that are multiples of 32.
CASES = [
    ("fp8", "vec", torch.float32, 32, 2, 32),
    ("fp8_e5m2", "vec", torch.float32, 32, 2, 32),
    ("fp8", "vec", torch.bfloat16, 64, 3, 64),
    ("fp8_e5m2", "vec", torch.float16, 32, 1, 128),
    ("fp8", "amx", torch.bfloat16, 32, 2, 64),
    ("fp8_e5m2", "amx", torch.bfloat16, 64, 3, 32),
]


@pytest.mark.parametrize("scales", SCALES)
@pytest.mark.parametrize("cache_dtype,isa,dtype,bs,H,D", CASES)
def test_probe_layout_rounding_and_scales(cache_dtype, isa, dtype, bs, H, D, scales):
    layout = probe(cache_dtype, isa, dtype, bs, H, D, scales)
    fmt = layout.kv_format
    assert fmt.rounding == "toward_zero"  # vLLM 0.32's CPU op truncates
    nb = 7
    cache = torch.zeros(nb, H, bs, 2 * D, dtype=torch.uint8)
    fmt.scales[cache.data_ptr()] = scales
    g = torch.Generator().manual_seed(bs + D)
    n = 2 * bs + 3
    slots = torch.randperm(nb * bs, generator=g)[:n]
    k = (torch.randn(n, H, D, generator=g) * 4).to(dtype)
    v = (torch.randn(n, H, D, generator=g) * 4).to(dtype)
    cpu_writer(isa, bs, cache_dtype, scales)(k, v, cache, slots)
    stored = layout.gather(cache, slots)  # the op's bytes, found through the probed layout
    assert torch.equal(stored[:, 0], fmt.encode(k, scales[0]))
    assert torch.equal(stored[:, 1], fmt.encode(v, scales[1]))
    keys = layout.gather_keys(cache, slots)
    assert keys.dtype == dtype
    assert torch.equal(keys, fmt.decode(stored[:, 0], scales[0]))
    assert torch.equal(keys, layout.as_stored_keys(k, cache))
    assert layout.key_plane(cache) is None  # bytes are never read as keys in place
    # Within the format's precision of what was written (e5m2: 2 mantissa bits, truncated).
    mant = 2 if cache_dtype == "fp8_e5m2" else 3
    assert bool(((keys.float() - k.float()).abs() <= k.float().abs() * 2.0**-mant + 1e-2 * scales[0]).all())


@pytest.mark.parametrize("cache_dtype,isa,dtype,bs,H,D", CASES[:2] + CASES[4:5])
def test_fp8_move_and_swap_carry_bytes(cache_dtype, isa, dtype, bs, H, D):
    layout = probe(cache_dtype, isa, dtype, bs, H, D, (1.0, 1.0))
    nb = 7
    cache = torch.zeros(nb, H, bs, 2 * D, dtype=torch.uint8)
    layout.kv_format.scales[cache.data_ptr()] = (1.0, 1.0)
    g = torch.Generator().manual_seed(3)
    slots = torch.randperm(nb * bs, generator=g)[: bs + 9]
    k, v = torch.randn(2, len(slots), H, D, generator=g).to(dtype)
    cpu_writer(isa, bs, cache_dtype, (1.0, 1.0))(k, v, cache, slots)
    before = layout.gather(cache, slots)
    used = set(slots.tolist())
    free = torch.tensor([s for s in range(nb * bs) if s not in used][:11])
    layout.move_many([cache], slots[:11], free)
    assert torch.equal(layout.gather(cache, free), before[:11])
    layout.swap(cache, slots[11:15], slots[15:19])
    assert torch.equal(layout.gather(cache, slots[15:19]), before[11:15])
    assert torch.equal(layout.gather_keys(cache, slots[11:15]), layout.as_stored_keys(k[15:19], cache))


@pytest.mark.parametrize("element", sorted(set(FP8_FORMATS.values()), key=str))
def test_fp8_round_references(element):
    """``nearest`` is torch's cast; ``toward_zero`` never rounds up in magnitude, lands on the
    cast or the next value down, and saturates where the cast would give inf/NaN."""
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0)) * torch.logspace(-6, 5, 4096)
    top = float(torch.finfo(element).max)
    inside = x.abs() <= top
    near = fp8_round(x, element, "nearest").float()
    assert torch.equal(near[inside], x[inside].to(element).float())
    trunc = fp8_round(x, element, "toward_zero").float()
    assert bool((trunc.abs() <= x.abs()).all()) and bool((trunc * x >= 0).all())
    assert bool((trunc[~inside].abs() == top).all())
    assert (trunc != near).any()  # the two really differ: the oracle must use the op's one


def test_probe_refuses_a_rounding_it_does_not_know():
    """A backend that rounds values above 8 away from zero (its small values, the probe's
    digits, as vLLM's) is neither known rounding: refused, not guessed."""
    fmt = KVFormat.named("fp8_e5m2", torch.float32)
    bs, H, D = 32, 1, 32
    layout = probe("fp8_e5m2", "vec", torch.float32, bs, H, D, (1.0, 1.0))
    geom_write = cpu_writer("vec", bs, "fp8_e5m2", (1.0, 1.0))

    def away_from_zero(k, v, cache, slots):
        geom_write(k, v, cache, slots)
        stored = layout.gather(cache, slots)
        exact = torch.stack([k, v], dim=1).float()
        low = stored.view(torch.float8_e5m2).float()
        bump = (low != exact) & (low.abs() < 57344) & (exact.abs() > 8)
        bumped = torch.where(bump, (stored.int() + 1).to(torch.uint8), stored)  # one step up in magnitude
        for p in range(2):
            geom = layout.geometry(cache)
            geom.views(cache)[p][slots // bs, slots % bs] = bumped[:, p]

    with pytest.raises(LayoutProbeError, match="rounding"):
        SlotLayout.probe(away_from_zero, (4, H, bs, 2 * D), torch.uint8, 4, bs, H, D, kv_format=fmt)


def test_unquantised_layout_reads_keys_unchanged():
    fmt = KVFormat.named("auto", torch.float32)
    assert not fmt.quantized
    x = torch.randn(3, 2, 32)
    assert fmt.round_trip(x, 1.0) is x
    with pytest.raises(ValueError, match="not supported"):
        KVFormat.named("fp8_per_token_head")


def test_selfcheck_runs_the_fp8_cache_it_is_given():
    from hae_vllm import selfcheck

    args = selfcheck.parser().parse_args(["--model", "m", "--kv-cache-dtype", "fp8_e5m2"])
    assert selfcheck.scenario(args, []).engine_kwargs == {"kv_cache_dtype": "fp8_e5m2"}
    plain = selfcheck.parser().parse_args(["--model", "m"])
    assert selfcheck.scenario(plain, []).engine_kwargs == {}


@pytest.mark.parametrize("per_head", [False, True])
def test_fp8_query_is_scored_at_its_values(per_head):
    """With an fp8 KV cache on CUDA, vLLM quantizes the query (q / _q_scale, per tensor or per
    KV head's group of query heads) before the backend, and so before scoring, sees it: the
    scale is undone.  A query in the model's dtype is left alone."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    q = torch.randn(5, 4, 16, dtype=torch.bfloat16) * 3  # 4 query heads over 2 KV heads
    scale = torch.tensor([0.05, 0.2]) if per_head else torch.tensor(0.1)
    groups = scale.repeat_interleave(2).view(1, 4, 1) if per_head else scale
    quantized = (q.float() / groups).to(torch.float8_e4m3fn)
    got = dequantized_query(quantized, SimpleNamespace(_q_scale=scale), torch.bfloat16)
    assert got.dtype == torch.bfloat16
    err = (got.float() - q.float()).abs() / q.float().abs().clamp_min(0.1)
    assert err.max() < 0.07  # e4m3's 3 mantissa bits
    wrong = dequantized_query(quantized, SimpleNamespace(_q_scale=scale.flip(0) if per_head else scale * 2), torch.bfloat16)
    assert ((wrong.float() - q.float()).abs() / q.float().abs().clamp_min(0.1)).max() > 0.5
    assert dequantized_query(q, SimpleNamespace(_q_scale=scale), torch.bfloat16) is q
