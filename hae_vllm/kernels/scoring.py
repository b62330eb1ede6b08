"""Layer-0 attention mass of selected queries over a request's *paged* keys.

``out[i, j] = sum_h softmax_j(q[i, h] . k[j, h // group] * scale)`` with causal masking
(``j <= qpos[i]``): the head-summed attention probabilities the policies reduce to global and
individual scores.  Keys are read in place through the block table (FlashAttention's
``[num_blocks, block_size, kv_heads, head_dim]`` key plane), never gathered, and no
``[heads, queries, keys]`` matrix is materialised: each program keeps one query-head row's
running max and sum (two passes over the keys) and accumulates probabilities into ``out``.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - triton is a dependency of torch on Linux
    HAS_TRITON = False


def attention_mass_ref(
    q: torch.Tensor, key_cache: torch.Tensor, block_table: torch.Tensor, qpos: torch.Tensor, num_keys: int, scale: float
) -> torch.Tensor:
    """Torch reference and CPU path.

    q: [nq, H, D]; key_cache: [num_blocks, block_size, Hkv, D]; block_table: [>= cdiv(T, bs)]
    int; qpos: [nq] int (< T); returns [nq, T] float32."""
    from hae_vllm.policies.attention import attention_probs

    bs = key_cache.shape[1]
    pos = torch.arange(num_keys, device=key_cache.device)
    keys = key_cache[block_table.long()[pos // bs], pos % bs]  # [T, Hkv, D]
    return attention_probs(q, keys, qpos, scale).sum(0)


if HAS_TRITON:

    @triton.jit
    def _tile_logits(q, k_ptr, bt_ptr, n, nmask, d, dmask, kvh, scale,
                     stride_kb, stride_ks, stride_kh, BLOCK_SIZE: tl.constexpr):
        """Scaled logits of one query-head row against the keys at positions ``n``, read in
        place through the block table."""
        blk = tl.load(bt_ptr + n // BLOCK_SIZE, mask=nmask, other=0)
        koff = blk.to(tl.int64) * stride_kb + (n % BLOCK_SIZE) * stride_ks + kvh * stride_kh
        k = tl.load(k_ptr + koff[:, None] + d[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
        return tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale

    @triton.jit
    def _attention_mass_kernel(
        q_ptr, k_ptr, bt_ptr, qpos_ptr, out_ptr,
        T, scale,
        stride_qi, stride_qh,
        stride_kb, stride_ks, stride_kh,
        stride_oi,
        GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        i = tl.program_id(0)
        h = tl.program_id(1)
        kvh = h // GROUP
        d = tl.arange(0, D_PAD)
        dmask = d < D
        q = tl.load(q_ptr + i * stride_qi + h * stride_qh + d, mask=dmask, other=0.0).to(tl.float32)
        p = tl.load(qpos_ptr + i)
        n_keys = tl.minimum(T, p + 1)
        m_run = tl.full((), float("-inf"), tl.float32)
        l_run = tl.zeros((), tl.float32)
        # Pass 1: running max and normaliser of this query-head row.
        for start in range(0, n_keys, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            nmask = n < n_keys
            s = _tile_logits(q, k_ptr, bt_ptr, n, nmask, d, dmask, kvh, scale,
                             stride_kb, stride_ks, stride_kh, BLOCK_SIZE)
            s = tl.where(nmask, s, float("-inf"))
            m_new = tl.maximum(m_run, tl.max(s, axis=0))
            l_run = l_run * tl.exp(m_run - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
            m_run = m_new
        # Pass 2: probabilities, summed over heads into out[i, :].
        for start in range(0, n_keys, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            nmask = n < n_keys
            s = _tile_logits(q, k_ptr, bt_ptr, n, nmask, d, dmask, kvh, scale,
                             stride_kb, stride_ks, stride_kh, BLOCK_SIZE)
            prob = tl.exp(s - m_run) / l_run
            tl.atomic_add(out_ptr + i * stride_oi + n, prob, mask=nmask)


def _use_triton(t: torch.Tensor) -> bool:
    return HAS_TRITON and (t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def attention_mass(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    block_table: torch.Tensor,
    qpos: torch.Tensor,
    num_keys: int,
    scale: float,
    impl: str = "auto",
) -> torch.Tensor:
    """[nq, T] head-summed causal attention probabilities (see module docstring).

    impl: "triton", "torch", or "auto" (Triton on CUDA or under TRITON_INTERPRET=1)."""
    nq, H, D = q.shape
    nb, bs, Hkv, Dk = key_cache.shape
    if Dk != D or H % Hkv:
        raise ValueError(f"q {tuple(q.shape)} does not match key cache {tuple(key_cache.shape)}")
    if qpos.numel() != nq:
        raise ValueError("qpos must hold one position per query")
    if block_table.numel() * bs < num_keys:
        raise ValueError(f"block table covers {block_table.numel() * bs} keys, need {num_keys}")
    use = impl == "triton" or (impl == "auto" and _use_triton(q))
    if not use or nq == 0 or num_keys == 0:
        return attention_mass_ref(q, key_cache, block_table, qpos, num_keys, scale)
    if key_cache.stride(3) != 1 or q.stride(2) != 1:
        raise ValueError("head_dim must be contiguous in q and key_cache")
    out = torch.zeros(nq, num_keys, dtype=torch.float32, device=q.device)
    _attention_mass_kernel[(nq, H)](
        q, key_cache, block_table.to(torch.int32).contiguous(), qpos.to(torch.int32).contiguous(), out,
        num_keys, float(scale),
        q.stride(0), q.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        out.stride(0),
        GROUP=H // Hkv, BLOCK_SIZE=bs, D=D, D_PAD=triton.next_power_of_2(D), BLOCK_N=64,
    )
    return out
