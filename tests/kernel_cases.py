"""Triton kernels against their torch references (TRITON_INTERPRET=1 on CPU, CUDA when present):
random inputs, odd shapes (non-powers of two, a single key, empty), every dtype in use.

Run through tests/test_kernels.py in a fresh process: importing vLLM on CPU changes Triton's
global state, which breaks the interpreter for later kernels in the same process."""

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first kernel launch

from hae_vllm.kernels.compaction import move_slots, move_slots_ref  # noqa: E402
from hae_vllm.kernels.scoring import HAS_TRITON, attention_mass, attention_mass_ref  # noqa: E402

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("H,Hkv,D,bs,T,nq", [(4, 2, 32, 16, 77, 5), (3, 1, 24, 16, 1, 1), (2, 2, 80, 32, 130, 3), (8, 4, 64, 16, 40, 0)])
def test_attention_mass_matches_reference(dtype, H, Hkv, D, bs, T, nq):
    g = torch.Generator().manual_seed(T + D)
    nb = (T + bs - 1) // bs + 3
    key_cache = torch.randn(nb, bs, Hkv, D, generator=g).to(dtype).to(DEVICE)
    table = torch.randperm(nb, generator=g)[: (T + bs - 1) // bs].to(DEVICE)
    q = torch.randn(nq, H, D, generator=g).to(dtype).to(DEVICE)
    qpos = torch.sort(torch.randint(0, T, (nq,), generator=g)).values.to(DEVICE)
    got = attention_mass(q, key_cache, table, qpos, T, D**-0.5, impl="triton")
    ref = attention_mass_ref(q, key_cache, table, qpos, T, D**-0.5)
    assert got.shape == (nq, T)
    torch.testing.assert_close(got, ref, rtol=TOL[dtype], atol=TOL[dtype])


def test_attention_mass_checks_shapes():
    with pytest.raises(ValueError):
        attention_mass(torch.zeros(1, 4, 16), torch.zeros(2, 16, 3, 16), torch.zeros(2), torch.zeros(1), 8, 1.0)
    with pytest.raises(ValueError):
        attention_mass(torch.zeros(1, 4, 16), torch.zeros(2, 16, 2, 16), torch.zeros(1), torch.zeros(1), 40, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("L,nb,bs,H,D,n", [(3, 6, 16, 2, 32, 7), (1, 4, 16, 1, 24, 1), (4, 5, 32, 3, 40, 0)])
def test_move_slots_matches_reference(dtype, swap, L, nb, bs, H, D, n):
    g = torch.Generator().manual_seed(n + D)
    caches = torch.randn(L, 2, nb, bs, H, D, generator=g).to(dtype).to(DEVICE)
    perm = torch.randperm(nb * bs, generator=g)
    src, dst = perm[:n].to(DEVICE), perm[n : 2 * n].to(DEVICE)
    ref = caches.clone()
    move_slots_ref(ref, src, dst, swap)
    move_slots(caches, src, dst, swap, impl="triton")
    assert torch.equal(caches, ref)


def test_move_slots_checks_shapes():
    with pytest.raises(ValueError):
        move_slots(torch.zeros(2, 3, 4, 16, 1, 8), torch.zeros(1), torch.zeros(1))
