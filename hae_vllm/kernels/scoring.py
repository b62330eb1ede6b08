"""Layer-0 scoring: attention statistics of selected queries over a request's *paged* keys.

For queries ``i`` at positions ``qpos[i]`` and heads ``h`` (GQA: key head ``h // group``)::

    p[h, i, j] = softmax_j(q[i, h] . k[j, h // group] * scale),  j <= qpos[i]  (causal)

:func:`attention_stats` returns ``rows[i, j] = sum_h p[h, i, j]`` (``[nq, T]``, what the
policies average into global and individual scores) and, for per-head policies (MadaKV),
``head_sum[h, j] = sum_i p[h, i, j]`` (``[H, T]``).  The ``[H, nq, T]`` probabilities are never
materialised by the kernel.

Keys are read in place through the block table from any strided
``[num_blocks, block_size, Hkv, D]`` view of the key plane: FlashAttention's cache, or the CPU
backend's transposed key plane (``SlotLayout.key_plane``).  Nothing is gathered.

Triton kernel: two launches over a grid of (key tile, KV head).  A program loads its key tile
once and multiplies it with the queries of every head of its group, 16 queries at a time
(``tl.dot`` in IEEE fp32, as the reference).  Pass 1 writes each (query, head) row's tile max
and exp-sum; torch merges the tiles (log-sum-exp); pass 2 writes probabilities summed over the
group's heads (one partial row per KV head, summed in torch) and, with ``per_head``, the
per-head sums over queries.  Every output element has one writer and no atomics are used, so
results are deterministic run to run (tensor-parallel ranks must agree on what they evict).

The torch reference, :func:`attention_stats_ref`, is the CPU path: keys gathered through the
block table, probabilities from :func:`hae_vllm.policies.attention.attention_probs`.
"""

from __future__ import annotations

import torch

from hae_vllm import envs

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - triton is a dependency of torch on Linux
    HAS_TRITON = False

BLOCK_N = 64  # keys per tile (one program)
BLOCK_I = 16  # queries per tl.dot (its minimum)


# The CPU path holds [heads, queries, keys] float32 probabilities for a slice of the queries at
# a time: SLICE_QUERY_HEADS // heads queries (at least MIN_SLICE_QUERIES, so the products stay
# matrix products), a fixed number, so its peak grows linearly with the prompt whatever the
# number of queries (HAE scores every text token after the first image, one or more per image
# in a many-image prompt): 64 bytes per key up to 4 heads, 16 bytes per head beyond.  Methods
# that score every prompt token and need only sums (H2O, FastV) take :func:`column_mass`.
SLICE_QUERY_HEADS = 16
MIN_SLICE_QUERIES = 4


def dense_attention_stats(q: torch.Tensor, keys: torch.Tensor, qpos: torch.Tensor, scale: float,
                          per_head: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`attention_stats` over keys already gathered: ``keys [T, Hkv, D]`` at positions
    ``0..T-1``.  Keys after the last query's position are never read (causal): their columns
    are zero.  Queries go through in slices of a fixed size (:data:`SLICE_QUERY_HEADS`)."""
    from hae_vllm.policies.attention import attention_probs

    nq, num_heads, _ = q.shape
    T = keys.shape[0]
    rows = torch.zeros(nq, T, dtype=torch.float32, device=q.device)
    head_sum = torch.zeros(num_heads, T, dtype=torch.float32, device=q.device) if per_head else None
    order = torch.argsort(qpos.cpu(), stable=True)  # by position: a slice reads keys up to its last
    pos_sorted = qpos.cpu()[order].tolist()
    step = max(MIN_SLICE_QUERIES, SLICE_QUERY_HEADS // num_heads)
    i = 0
    while i < nq:
        j = min(nq, i + step)
        seen = min(T, pos_sorted[j - 1] + 1)
        idx = order[i:j].to(q.device)
        probs = attention_probs(q[idx], keys[:seen], qpos[idx.to(qpos.device)], scale)  # [H, n, seen]
        rows[idx, :seen] = probs.sum(0)
        if head_sum is not None:
            head_sum[:, :seen] += probs.sum(1)
        i = j
    return rows, head_sum


# torch's CPU flash attention, which also returns each query's log-sum-exp (torch >= 2.3).
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _flash_lse(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    """log-sum-exp over keys of ``scale * q . k`` for q [H, n, D], k [H, m, D] (causal: query i
    sees keys 0..i): [H, n].  The attention output is computed too, over zero values."""
    _, lse = _FLASH_CPU(q[None], k[None], torch.zeros_like(k)[None], 0.0, causal, scale=scale)
    return lse[0]


def column_mass_available(t: torch.Tensor) -> bool:
    """Whether :func:`column_mass` runs for tensors like ``t`` (host tensors, torch's CPU
    flash attention present)."""
    return _FLASH_CPU is not None and t.device.type == "cpu"


def column_mass(q: torch.Tensor, keys: torch.Tensor, q0: int, scale: float) -> torch.Tensor:
    """``head_sum`` of :func:`attention_stats` for a *run* of queries without materialising
    their probabilities: ``q [n, H, D]`` at positions ``q0..q0+n-1`` over ``keys [>= q0+n, Hkv, D]``
    at positions ``0..``; returns ``[H, q0+n]`` float32, ``sum_i p[h, i, j]``.

    Two flash-attention passes per KV-head group, each the cost of one causal attention over
    the run, and memory linear in the keys (nothing ``n x T``):

    1. ``lse[h, i] = log sum_j exp(scale q_i . k_j)`` over the keys query i sees;
    2. the same attention transposed: key j as the query ``[scale k_j, 1]``, query i as the key
       ``[q_i, -lse[h, i]]``, so ``log sum_i exp(scale q_i . k_j - lse[h, i])`` is the log of
       the mass key j receives.  Key j is seen by the queries at positions >= j: the run's
       queries all see the keys before it (no mask), and within the run the mask is causal
       once both sequences are reversed.

    For methods that score every prompt token (H2O, FastV) this replaces ``T`` rows of
    ``T`` probabilities by two attention passes; their scoring is still quadratic in time (as
    the methods are defined), linear in memory."""
    n, H, D = q.shape
    Hkv = keys.shape[1]
    group = H // Hkv
    T = q0 + n
    out = torch.empty(H, T, dtype=torch.float32)
    for g in range(Hkv):  # one KV head's group at a time: a group's keys are copied once
        heads = slice(g * group, (g + 1) * group)
        qh = q[:, heads].float().permute(1, 0, 2).contiguous()  # [group, n, D]
        kh = keys[:T, g].float()[None].expand(group, T, D).contiguous()
        lse = _flash_lse(qh, kh[:, q0:], True, scale)
        if q0:
            lse = torch.logaddexp(lse, _flash_lse(qh, kh[:, :q0], False, scale))
        # Transposed pass: keys as queries, queries (with -lse as one more coordinate) as keys.
        kq = torch.cat([kh * scale, kh.new_ones(group, T, 1)], dim=2)
        del kh
        qk = torch.cat([qh, -lse[..., None]], dim=2)
        run = _flash_lse(kq[:, q0:].flip(1).contiguous(), qk.flip(1).contiguous(), True, 1.0)
        out[heads, q0:] = run.flip(1).exp()
        if q0:
            out[heads, :q0] = _flash_lse(kq[:, :q0], qk, False, 1.0).exp()
    return out


def gather_plane_keys(key_plane: torch.Tensor, block_table: torch.Tensor, num_keys: int) -> torch.Tensor:
    """Keys of positions ``0..num_keys-1`` through the block table: ``[num_keys, Hkv, D]``."""
    bs = key_plane.shape[1]
    pos = torch.arange(num_keys, device=block_table.device)
    return key_plane[block_table.long()[pos // bs].to(key_plane.device), (pos % bs).to(key_plane.device)]


def attention_stats_ref(q: torch.Tensor, key_plane: torch.Tensor, block_table: torch.Tensor, qpos: torch.Tensor,
                        num_keys: int, scale: float, per_head: bool = False):
    """Torch reference and CPU path of :func:`attention_stats`: keys gathered through the block
    table, only as far as the last query can see."""
    seen = min(num_keys, int(qpos.max()) + 1) if qpos.numel() else num_keys
    keys = gather_plane_keys(key_plane, block_table, seen)
    rows, head_sum = dense_attention_stats(q, keys, qpos, scale, per_head)
    if seen < num_keys:
        rows = torch.nn.functional.pad(rows, (0, num_keys - seen))
        head_sum = None if head_sum is None else torch.nn.functional.pad(head_sum, (0, num_keys - seen))
    return rows, head_sum


if HAS_TRITON:

    @triton.jit
    def _key_tile(k_ptr, bt_ptr, n, nmask, kvh, d, dmask, stride_kb, stride_ks, stride_kh, stride_kd,
                  BLOCK_SIZE: tl.constexpr):
        """[BLOCK_N, D_PAD] keys at logical positions ``n`` of one KV head, through the block table."""
        blk = tl.load(bt_ptr + n // BLOCK_SIZE, mask=nmask, other=0).to(tl.int64)
        off = blk * stride_kb + (n % BLOCK_SIZE).to(tl.int64) * stride_ks + kvh * stride_kh
        k = tl.load(k_ptr + off[:, None] + d[None, :].to(tl.int64) * stride_kd,
                    mask=nmask[:, None] & dmask[None, :], other=0.0)
        return k.to(tl.float32)

    @triton.jit
    def _program_tile(k_ptr, bt_ptr, T, stride_kb, stride_ks, stride_kh, stride_kd,
                      BLOCK_SIZE: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
        """This program's key tile (grid: key tile x KV head), its positions and masks."""
        tile = tl.program_id(0)
        kvh = tl.program_id(1)
        n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < T
        d = tl.arange(0, D_PAD)
        dmask = d < D
        k = _key_tile(k_ptr, bt_ptr, n, nmask, kvh, d, dmask, stride_kb, stride_ks, stride_kh, stride_kd, BLOCK_SIZE)
        return tile, kvh, n, nmask, d, dmask, k

    @triton.jit
    def _logits(q_ptr, qpos_ptr, k, n, nmask, i, imask, h, d, dmask, scale, stride_qi, stride_qh, stride_qd):
        """Scaled, causally masked logits ``[BLOCK_I, BLOCK_N]`` of queries ``i`` (head ``h``)."""
        q = tl.load(q_ptr + i[:, None] * stride_qi + h * stride_qh + d[None, :] * stride_qd,
                    mask=imask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        p = tl.load(qpos_ptr + i, mask=imask, other=-1)
        valid = imask[:, None] & nmask[None, :] & (n[None, :] <= p[:, None])
        return tl.where(valid, s, float("-inf")), valid

    @triton.jit
    def _stats_pass1(q_ptr, k_ptr, bt_ptr, qpos_ptr, m_ptr, l_ptr,
                     NQ, T, H, scale,
                     stride_qi, stride_qh, stride_qd, stride_kb, stride_ks, stride_kh, stride_kd,
                     GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr):
        tile, kvh, n, nmask, d, dmask, k = _program_tile(k_ptr, bt_ptr, T, stride_kb, stride_ks, stride_kh, stride_kd,
                                                         BLOCK_SIZE, D, D_PAD, BLOCK_N)
        for i0 in range(0, NQ, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            imask = i < NQ
            for g in range(GROUP):
                h = kvh * GROUP + g
                s, valid = _logits(q_ptr, qpos_ptr, k, n, nmask, i, imask, h, d, dmask, scale,
                                   stride_qi, stride_qh, stride_qd)
                m = tl.max(s, axis=1)
                m_safe = tl.where(m == float("-inf"), 0.0, m)
                l = tl.sum(tl.where(valid, tl.exp(s - m_safe[:, None]), 0.0), axis=1)
                out = (tile * H + h) * NQ + i
                tl.store(m_ptr + out, m, mask=imask)
                tl.store(l_ptr + out, l, mask=imask)

    @triton.jit
    def _stats_pass2(q_ptr, k_ptr, bt_ptr, qpos_ptr, m_ptr, l_ptr, rows_ptr, hs_ptr,
                     NQ, T, H, scale,
                     stride_qi, stride_qh, stride_qd, stride_kb, stride_ks, stride_kh, stride_kd,
                     GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, PER_HEAD: tl.constexpr):
        tile, kvh, n, nmask, d, dmask, k = _program_tile(k_ptr, bt_ptr, T, stride_kb, stride_ks, stride_kh, stride_kd,
                                                         BLOCK_SIZE, D, D_PAD, BLOCK_N)
        for i0 in range(0, NQ, BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            imask = i < NQ
            acc = tl.zeros((BLOCK_I, BLOCK_N), dtype=tl.float32)
            for g in range(GROUP):
                h = kvh * GROUP + g
                s, valid = _logits(q_ptr, qpos_ptr, k, n, nmask, i, imask, h, d, dmask, scale,
                                   stride_qi, stride_qh, stride_qd)
                m = tl.load(m_ptr + h * NQ + i, mask=imask, other=0.0)
                l = tl.load(l_ptr + h * NQ + i, mask=imask, other=1.0)
                p = tl.where(valid, tl.exp(s - m[:, None]) / l[:, None], 0.0)
                acc += p
                if PER_HEAD:
                    # (head, tile) belongs to this program alone: a plain read-modify-write.
                    hs = hs_ptr + h * T + n
                    tl.store(hs, tl.load(hs, mask=nmask, other=0.0) + tl.sum(p, axis=0), mask=nmask)
            rows = rows_ptr + (kvh * NQ + i[:, None]) * T + n[None, :]
            tl.store(rows, acc, mask=imask[:, None] & nmask[None, :])


def use_triton(t: torch.Tensor, impl: str = "auto") -> bool:
    """Whether ``impl`` ("triton", "torch" or "auto") runs the Triton kernel for tensors like
    ``t``.  "auto": on CUDA, or anywhere when ``HAE_VLLM_KERNELS=triton`` (with
    ``TRITON_INTERPRET=1`` on CPU: how the engine tests exercise the kernels without a GPU)."""
    if impl == "auto":
        forced = envs.kernels()
        if forced in ("torch", "triton"):
            impl = forced
    if impl == "triton":
        if not HAS_TRITON:
            raise RuntimeError("impl='triton' but triton is not importable")
        return True
    if impl == "torch":
        return False
    return HAS_TRITON and t.is_cuda


def attention_stats(
    q: torch.Tensor,
    key_plane: torch.Tensor,
    block_table: torch.Tensor,
    qpos: torch.Tensor,
    num_keys: int,
    scale: float,
    per_head: bool = False,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(``rows [nq, T]``, ``head_sum [H, T]`` or None) float32 (see the module docstring).

    q: [nq, H, D]; key_plane: [num_blocks, block_size, Hkv, D], any strides; block_table:
    [>= cdiv(T, block_size)] int; qpos: [nq] int, each < T."""
    nq, H, D = q.shape
    nb, bs, Hkv, Dk = key_plane.shape
    if Dk != D or H % Hkv:
        raise ValueError(f"q {tuple(q.shape)} does not match key plane {tuple(key_plane.shape)}")
    if qpos.numel() != nq:
        raise ValueError("qpos must hold one position per query")
    if block_table.numel() * bs < num_keys:
        raise ValueError(f"block table covers {block_table.numel() * bs} keys, need {num_keys}")
    if not use_triton(q, impl) or nq == 0 or num_keys == 0:
        return attention_stats_ref(q, key_plane, block_table, qpos, num_keys, scale, per_head)
    dev = q.device
    tiles = triton.cdiv(num_keys, BLOCK_N)
    table = block_table.to(dev, torch.int32).contiguous()
    qp = qpos.to(dev, torch.int32).contiguous()
    m_part = torch.empty(tiles, H, nq, dtype=torch.float32, device=dev)
    l_part = torch.empty_like(m_part)
    common = (num_keys, H, float(scale), q.stride(0), q.stride(1), q.stride(2), *key_plane.stride())
    meta = dict(GROUP=H // Hkv, BLOCK_SIZE=bs, D=D, D_PAD=max(16, triton.next_power_of_2(D)),
                BLOCK_N=BLOCK_N, BLOCK_I=BLOCK_I)
    _stats_pass1[(tiles, Hkv)](q, key_plane, table, qp, m_part, l_part, nq, *common, **meta)
    # Merge the tiles: every row sees key 0, so its max is finite and its sum positive.
    m = m_part.amax(0)
    l_sum = (l_part * torch.exp(m_part - m)).sum(0)
    rows = torch.empty(Hkv, nq, num_keys, dtype=torch.float32, device=dev)
    head_sum = torch.zeros(H, num_keys, dtype=torch.float32, device=dev) if per_head else rows
    _stats_pass2[(tiles, Hkv)](q, key_plane, table, qp, m.contiguous(), l_sum.contiguous(), rows, head_sum,
                               nq, *common, PER_HEAD=per_head, **meta)
    return rows.sum(0), (head_sum if per_head else None)


def attention_mass(q, key_plane, block_table, qpos, num_keys, scale, impl: str = "auto") -> torch.Tensor:
    """``rows`` of :func:`attention_stats`: ``[nq, T]`` head-summed attention probabilities."""
    return attention_stats(q, key_plane, block_table, qpos, num_keys, scale, False, impl)[0]


def attention_mass_ref(q, key_plane, block_table, qpos, num_keys, scale) -> torch.Tensor:
    return attention_stats_ref(q, key_plane, block_table, qpos, num_keys, scale)[0]
