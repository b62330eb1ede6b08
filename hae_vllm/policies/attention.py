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
        lo = int(qp.min()) + 1 if nq else T
        if lo < T:
            mask = torch.arange(lo, T, device=keys.device)[None, :] > qp[:, None]
            logits[:, :, lo:].masked_fill_(mask, float("-inf"))
    else:
        mask = key_positions.to(keys.device)[None, :] > qp[:, None]  # [nq, T]
        logits.masked_fill_(mask, float("-inf"))
    return torch.softmax(logits, dim=-1)


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
        H, nq, T = probs.shape
        if nq == 0:
            return
        self._grow(T)
        rows = probs.mean(0)  # head-averaged [nq, T]
        self.g[:T] += rows.sum(0)
        torch.maximum(self.m[:T], rows.amax(0), out=self.m[:T])
        if self.head_sum is not None:
            self.head_sum[:, :T] += probs.sum(1)
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
