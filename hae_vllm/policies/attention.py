"""Attention statistics computed at prefill for the policies (torch reference; CPU path).

Rows are computed for the queries a policy selected, softmax-normalised over every key they can
see (causal), so the numbers are the model's own attention probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hae_vllm.policies.base import LayerStats


def attention_probs(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_positions: torch.Tensor,
    scale: float,
    key_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal softmax attention of selected queries over keys ``0..T-1``.

    Args:
        queries: [nq, num_heads, head_dim] (post-RoPE, as the model computed them).
        keys: [T, num_kv_heads, head_dim] (post-RoPE, positions 0..T-1).
        query_positions: [nq] logical positions of the queries (< T).
        scale: softmax scale.
        key_positions: [T] positions of the keys (default ``0..T-1``); keys after a query's
            position are masked.

    Returns:
        [num_heads, nq, T] float32 probabilities (GQA folded without copying keys).
    """
    if queries.device.type == "cpu" and keys.device.type == "cpu":
        # Host: the same computation in numpy (per-call cost dominates at these sizes).
        qp = query_positions.cpu().numpy()
        kp = np.arange(keys.shape[0]) if key_positions is None else np.asarray(key_positions)
        return torch.from_numpy(_probs_np((queries.float() * scale).numpy(), keys.float().numpy(),
                                          kp[None, :] > qp[:, None]))
    return _attention_probs_torch(queries, keys, query_positions, scale, key_positions)


def _probs_np(q: np.ndarray, k: np.ndarray, future: np.ndarray) -> np.ndarray:
    """Softmax attention in numpy: q [nq, H, D] (already scaled), k [T, Hkv, D], future [nq, T]
    (True: masked).  Returns [H, nq, T] float32."""
    nq, num_heads, head_dim = q.shape
    T, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    # Head h = kv_head * group + g, as in the torch path.
    qq = q.transpose(1, 0, 2).reshape(num_kv_heads, group * nq, head_dim)
    # The product goes through torch: numpy's BLAS would start threads of its own, which then
    # contend with torch's on the engine's cores (measured: prefill forward time doubled).
    logits = torch.matmul(torch.from_numpy(qq), torch.from_numpy(k).permute(1, 2, 0)).numpy()
    logits = logits.reshape(num_heads, nq, T)
    if future.any():
        logits[:, future] = -np.inf
    logits -= logits.max(axis=-1, keepdims=True)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=-1, keepdims=True)
    return logits


def _attention_probs_torch(queries, keys, query_positions, scale, key_positions=None) -> torch.Tensor:
    """:func:`attention_probs` for device tensors."""
    nq, num_heads, head_dim = queries.shape
    T, num_kv_heads, _ = keys.shape
    group = num_heads // num_kv_heads
    # Head h = kv_head * group + g: [H, nq, D] viewed as [kv heads, group * nq, D] makes one
    # batched matmul per KV head, and its output is already [H, nq, T] in memory.
    q = (queries.float() * scale).permute(1, 0, 2).reshape(num_kv_heads, group * nq, head_dim)
    logits = torch.bmm(q, keys.float().permute(1, 2, 0)).view(num_heads, nq, T)
    qp = query_positions.to(keys.device)
    if key_positions is None:
        # Keys are 0..T-1: only the columns after the earliest query can be in its future.
        # (Read from the caller's tensor, on the host in the runtime: no device sync.)
        lo = int(query_positions.min()) + 1 if nq else T
        if lo < T:
            mask = torch.arange(lo, T, device=keys.device)[None, :] > qp[:, None]
            logits[:, :, lo:].masked_fill_(mask, float("-inf"))
    else:
        mask = key_positions.to(keys.device)[None, :] > qp[:, None]  # [nq, T]
        logits.masked_fill_(mask, float("-inf"))
    return torch.softmax(logits, dim=-1)


def decode_probs(
    queries: torch.Tensor,
    keys: list[torch.Tensor],
    scale: float,
    query_positions: list[int],
    key_positions: list[np.ndarray],
) -> torch.Tensor:
    """:func:`attention_probs` for one decode query per request, many requests at once.

    Args:
        queries: [B, num_heads, head_dim], one query per request.
        keys: B tensors [T_b, num_kv_heads, head_dim].
        query_positions: B ints; key_positions: B arrays [T_b] (keys after the query masked).

    Returns:
        [num_heads, sum(T_b)] float32: each request's probabilities over its own keys, in
        request order (``attention_probs(q_b, k_b, ...)[:, 0]`` side by side).  On the host
        one small matmul per request in numpy (per-call cost dominates at these sizes); on a
        device one batched product over padded keys.
    """
    B = queries.shape[0]
    if queries.device.type == "cpu" and keys[0].device.type == "cpu":
        qn = (queries.float() * scale).numpy()
        parts = [_probs_np(qn[b : b + 1], keys[b].float().numpy(), (np.asarray(key_positions[b]) > query_positions[b])[None, :])[:, 0]
                 for b in range(B)]
        return torch.from_numpy(np.concatenate(parts, axis=1))
    return _decode_probs_torch(queries, keys, scale, query_positions, key_positions)


def _decode_probs_torch(queries, keys, scale, query_positions, key_positions) -> torch.Tensor:
    """:func:`decode_probs` for device tensors: one batched product over padded keys."""
    B, num_heads, head_dim = queries.shape
    num_kv_heads = keys[0].shape[1]
    group = num_heads // num_kv_heads
    dev = keys[0].device
    counts = [k.shape[0] for k in keys]
    n = torch.as_tensor(counts, device=dev)
    seg = torch.repeat_interleave(torch.arange(B, device=dev), n)
    offs = torch.arange(int(sum(counts)), device=dev) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
    # Pad to [B, width]: one batched product for all requests, padding masked out.
    kpad = torch.zeros((B, max(counts), num_kv_heads, head_dim), dtype=torch.float32, device=dev)
    kpad[seg, offs] = torch.cat(keys).float()
    q = (queries.float() * scale).view(B, num_kv_heads, group, head_dim)
    logits = torch.einsum("bkgd,btkd->bkgt", q, kpad)
    kpos = torch.as_tensor(np.concatenate(key_positions), device=dev)
    visible = torch.zeros((B, max(counts)), dtype=torch.bool, device=dev)
    visible[seg, offs] = kpos <= torch.as_tensor(query_positions, device=dev)[seg]
    logits.masked_fill_(~visible[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).view(B, num_heads, -1)
    return probs[seg, :, offs].T


def attention_rows(queries, keys, query_positions, scale) -> torch.Tensor:
    """[nq, T]: probabilities summed over the (local) heads."""
    return attention_probs(queries, keys, query_positions, scale).sum(0)


@dataclass
class LayerAccumulator:
    """Builds :class:`LayerStats` chunk by chunk (chunked prefill sees the same numbers)."""

    capacity: int
    num_heads: int
    per_head: bool

    def __post_init__(self) -> None:
        self.g = torch.zeros(self.capacity)
        self.m = torch.zeros(self.capacity)
        self.head_sum = torch.zeros(self.num_heads, self.capacity) if self.per_head else None
        self.num_queries = 0
        self._query_positions: list[np.ndarray] = []  # count[j] = #queries at positions >= j

    def _grow(self, T: int) -> None:
        if T <= self.g.numel():
            return
        extra = T - self.g.numel()
        self.g = torch.cat([self.g, torch.zeros(extra)])
        self.m = torch.cat([self.m, torch.zeros(extra)])
        if self.head_sum is not None:
            self.head_sum = torch.cat([self.head_sum, torch.zeros(self.num_heads, extra)], dim=1)

    def add(self, probs: torch.Tensor, query_positions: torch.Tensor) -> None:
        """probs: [num_heads (global), nq, T] attention probabilities."""
        p = probs.float()
        self.add_rows(p.sum(0), p.sum(1) if self.head_sum is not None else None, query_positions)

    def add_rows(self, rows: torch.Tensor, head_sum: torch.Tensor | None, query_positions: torch.Tensor) -> None:
        """rows: [nq, T] probabilities summed over all (global) heads; head_sum: [num_heads, T]
        summed over the queries (per-head policies), as :func:`hae_vllm.kernels.scoring.attention_stats`
        returns them."""
        nq, T = rows.shape
        if nq == 0:
            return
        self._grow(T)
        # numpy views of the (CPU) accumulators: a few small reductions per chunk.
        r = rows.float().numpy() / self.num_heads  # head-averaged [nq, T]
        self.g.numpy()[:T] += r.sum(axis=0)
        m = self.m.numpy()[:T]
        np.maximum(m, r.max(axis=0), out=m)
        if self.head_sum is not None:
            assert head_sum is not None, "a per-head accumulator needs per-head sums"
            self.head_sum.numpy()[:, :T] += head_sum.float().numpy()
        self._query_positions.append(np.asarray(query_positions.cpu(), dtype=np.int64))
        self.num_queries += nq

    @property
    def count(self) -> torch.Tensor:
        """[capacity]: how many of the added queries can see each key position (causal)."""
        n = self.g.numel()
        if not self._query_positions:
            return torch.zeros(n)
        hist = np.bincount(np.concatenate(self._query_positions), minlength=n)[:n]
        return torch.from_numpy(np.ascontiguousarray(hist[::-1].cumsum()[::-1], dtype=np.float32))

    def stats(self, T: int) -> LayerStats:
        self._grow(T)
        hs = self.head_sum[:, :T] if self.head_sum is not None else None
        return LayerStats(self.g[:T], self.m[:T], self.count[:T], hs)
