"""Attention statistics computed at prefill for the policies (torch reference; CPU path).

Rows are computed for the queries a policy selected, softmax-normalised over every key they can
see (causal), so the numbers are the model's own attention probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    q = queries.float().view(nq, num_kv_heads, group, head_dim)
    logits = torch.einsum("ihgd,jhd->hgij", q, keys.float()) * scale
    key_pos = torch.arange(T, device=keys.device) if key_positions is None else key_positions.to(keys.device)
    mask = key_pos[None, :] > query_positions[:, None].to(keys.device)  # [nq, T]
    logits.masked_fill_(mask, float("-inf"))
    return torch.softmax(logits, dim=-1).reshape(num_heads, nq, T)


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
        self.count = torch.zeros(self.capacity)
        self.head_sum = torch.zeros(self.num_heads, self.capacity) if self.per_head else None
        self.num_queries = 0

    def _grow(self, T: int) -> None:
        if T <= self.g.numel():
            return
        extra = T - self.g.numel()
        self.g = torch.cat([self.g, torch.zeros(extra)])
        self.m = torch.cat([self.m, torch.zeros(extra)])
        self.count = torch.cat([self.count, torch.zeros(extra)])
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
        self.m[:T] = torch.maximum(self.m[:T], rows.max(0).values)
        key_pos = torch.arange(T)
        self.count[:T] += (key_pos[None, :] <= query_positions[:, None]).sum(0).float()
        if self.head_sum is not None:
            self.head_sum[:, :T] += probs.sum(1)
        self.num_queries += nq

    def stats(self, T: int) -> LayerStats:
        self._grow(T)
        hs = self.head_sum[:, :T] if self.head_sum is not None else None
        return LayerStats(self.g[:T], self.m[:T], self.count[:T], hs)
