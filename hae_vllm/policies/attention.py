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


def decode_mass(queries: torch.Tensor, keys: torch.Tensor, scale: float, visible) -> torch.Tensor:
    """Decode scoring of many requests at once: one query per request against its keys,
    attention probabilities summed over heads.

    Args:
        queries: [B, num_heads, head_dim], one query per request.
        keys: [B, num_kv_heads, L, head_dim], request b's keys by token position (rows not
            visible are ignored, whatever they hold); any strides.
        visible: [B, L] bool (numpy or torch): the positions each query attends to (at least
            one per row).

    Returns:
        [B, L] float32 on the queries' device: ``attention_probs(q_b, keys_b[pos_b], ...)[:, 0]
        .sum(0)`` at the visible columns ``pos_b`` of row b, exactly zero elsewhere.  One
        batched product for all requests and KV heads, the softmax masked to each row's
        visible positions.
    """
    B, num_heads, head_dim = queries.shape
    num_kv_heads, L = keys.shape[1], keys.shape[2]
    group = num_heads // num_kv_heads
    keys = keys.float().reshape(B * num_kv_heads, L, head_dim)
    if isinstance(visible, np.ndarray):
        visible = torch.from_numpy(visible)
    hidden = (~visible.to(keys.device, torch.bool))[:, None, :]
    q = (queries.float() * scale).reshape(B * num_kv_heads, group, head_dim)
    logits = torch.bmm(q, keys.transpose(1, 2)).view(B, num_heads, L)  # heads in query order
    logits.masked_fill_(hidden, float("-inf"))
    return torch.softmax(logits, dim=2).sum(1)


def decode_mass_queued(queries: torch.Tensor, keys: torch.Tensor, scale: float, visible,
                       weights: torch.Tensor) -> torch.Tensor:
    """:func:`decode_mass` of several queries per request, weighted and summed: the queries of
    the last decode steps scored in one pass over the keys.

    Args:
        queries: [B, N, num_heads, head_dim], request b's queries in step order.
        keys: [B, num_kv_heads, L, head_dim] (as in :func:`decode_mass`).
        visible: [B, N, L] bool (numpy or torch): the positions each query attends to (at
            least one per query, padding queries included).
        weights: [B, N] float32: each query's weight (0 for padding).

    Returns:
        [B, L] float32: ``sum_n weights[b, n] * decode_mass(queries[:, n], ...)[b]``.
    """
    B, N, num_heads, head_dim = queries.shape
    num_kv_heads, L = keys.shape[1], keys.shape[2]
    group = num_heads // num_kv_heads
    keys = keys.float().reshape(B * num_kv_heads, L, head_dim)
    if isinstance(visible, np.ndarray):
        visible = torch.from_numpy(visible)
    hidden = (~visible.to(keys.device, torch.bool))[:, None, :, None, :]  # [B, 1, N, 1, L]
    # Head h = kv_head * group + g: one batched product per (request, KV head) for all N queries.
    q = (queries.float() * scale).view(B, N, num_kv_heads, group, head_dim).transpose(1, 2)
    logits = torch.bmm(q.reshape(B * num_kv_heads, N * group, head_dim), keys.transpose(1, 2))
    logits = logits.view(B, num_kv_heads, N, group, L).masked_fill_(hidden, float("-inf"))
    probs = torch.softmax(logits, dim=-1).sum(3)  # [B, Hkv, N, L]
    w = weights.to(keys.device, torch.float32)
    return torch.bmm(w.view(B, 1, N), probs.sum(1)).view(B, L)


def queued_mass(queries: torch.Tensor, keys: torch.Tensor, scale: float, hidden: np.ndarray,
                query_positions: np.ndarray, weights: np.ndarray) -> torch.Tensor:
    """:func:`decode_mass_queued` with the mask given as what it is: keys ``hidden`` from every
    query of a request (not scored: released, evicted or not yet written) and causal
    positions, so only the few columns after a request's earliest query need a per-query mask.

    Args:
        queries: [B, N, num_heads, head_dim], request b's queries in step order.
        keys: [B, num_kv_heads, L, head_dim] (any strides; rows hidden are ignored).
        hidden: [B, L] bool numpy: keys no query of the request sees.
        query_positions: [B, N] int numpy: a query sees the visible keys at positions <= its own
            (each query must see at least one).
        weights: [B, N] float32 numpy: each query's weight.

    Returns:
        [B, L] float32: ``sum_n weights[b, n] * decode_mass(queries[:, n], ...)[b]``, exactly
        zero at hidden and never-seen columns.
    """
    B, N, num_heads, head_dim = queries.shape
    num_kv_heads, L = keys.shape[1], keys.shape[2]
    group = num_heads // num_kv_heads
    dev = keys.device
    q = (queries.float() * scale).view(B, N, num_kv_heads, group, head_dim).transpose(1, 2)
    logits = torch.bmm(q.reshape(B * num_kv_heads, N * group, head_dim),
                       keys.float().reshape(B * num_kv_heads, L, head_dim).transpose(1, 2))
    logits = logits.view(B, num_kv_heads, N, group, L)
    # Hidden keys as an additive -inf bias: the same values as masked_fill (x + 0 == x), and
    # a broadcast add is several times cheaper than a broadcast masked_fill on the host.
    bias = np.where(hidden, np.float32(-np.inf), np.float32(0.0))
    logits.add_(torch.from_numpy(bias).to(dev).view(B, 1, 1, 1, L))
    lo = int(query_positions.min()) + 1
    if lo < L:
        future = np.arange(lo, L)[None, None, :] > query_positions[:, :, None]  # [B, N, L - lo]
        logits[..., lo:].masked_fill_(torch.from_numpy(future).to(dev).view(B, 1, N, 1, L - lo), float("-inf"))
    probs = torch.softmax(logits, dim=-1).view(B, 1, num_kv_heads * N * group, L)
    # Summed over heads and weighted over queries in one product (a query's weight on each of
    # its heads): cheaper than reducing the strided head dimensions.
    w = np.ascontiguousarray(np.broadcast_to(weights[:, None, :, None], (B, num_kv_heads, N, group)), dtype=np.float32)
    return torch.matmul(torch.from_numpy(w).to(dev).view(B, 1, 1, -1), probs).view(B, L)


def attention_rows(queries, keys, query_positions, scale) -> torch.Tensor:
    """[nq, T]: probabilities summed over the (local) heads."""
    return attention_probs(queries, keys, query_positions, scale).sum(0)


@dataclass
class LayerAccumulator:
    """Builds :class:`LayerStats` chunk by chunk (chunked prefill sees the same numbers)."""

    capacity: int
    num_heads: int
    per_head: bool
    keep_max: bool = True  # False: sums only (add_columns); stats().m is None

    def __post_init__(self) -> None:
        self.g = torch.zeros(self.capacity)
        self.m = torch.zeros(self.capacity) if self.keep_max else None
        self.head_sum = torch.zeros(self.num_heads, self.capacity) if self.per_head else None
        self.num_queries = 0
        self._query_positions: list[np.ndarray] = []  # count[j] = #queries at positions >= j

    def _grow(self, T: int) -> None:
        if T <= self.g.numel():
            return
        extra = T - self.g.numel()
        self.g = torch.cat([self.g, torch.zeros(extra)])
        if self.m is not None:
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
        if self.m is not None:
            m = self.m.numpy()[:T]
            np.maximum(m, r.max(axis=0), out=m)
        self._add_head_sum(head_sum, T)
        self._add_queries(query_positions)

    def add_columns(self, head_sum: torch.Tensor, query_positions: torch.Tensor) -> None:
        """head_sum: [num_heads (global), T] probabilities summed over the queries at
        ``query_positions`` (:func:`hae_vllm.kernels.scoring.column_mass`): sums only, for an
        accumulator that keeps no max."""
        assert self.m is None, "column sums carry no max over queries"
        if not len(query_positions):
            return
        T = head_sum.shape[1]
        self._grow(T)
        self.g.numpy()[:T] += head_sum.float().sum(0).numpy() / self.num_heads
        self._add_head_sum(head_sum, T)
        self._add_queries(query_positions)

    def _add_head_sum(self, head_sum: torch.Tensor | None, T: int) -> None:
        if self.head_sum is not None:
            assert head_sum is not None, "a per-head accumulator needs per-head sums"
            self.head_sum.numpy()[:, :T] += head_sum.float().numpy()

    def _add_queries(self, query_positions: torch.Tensor) -> None:
        self._query_positions.append(np.asarray(query_positions.cpu(), dtype=np.int64))
        self.num_queries += len(query_positions)

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
        return LayerStats(self.g[:T], None if self.m is None else self.m[:T], self.count[:T], hs)


def decode_mass_rows(q: torch.Tensor, rows: np.ndarray, keys: torch.Tensor, L: int, scale: float,
                     visible: np.ndarray, weights: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`decode_mass` of queries ``q`` [B, H, D] over the bank's key ``rows`` (one per
    query); with ``weights`` [B, N], :func:`decode_mass_queued` of ``q`` [B, N, H, D]
    (``visible`` [B, N, L]).

    When the rows lie in a span at most twice their number (the bank hands out its lowest
    free row, so rows in use stay packed), the span is read as one strided view instead of
    copying every row's keys: rows of the span without a query this step get a zero query
    that sees only position 0 (zero weight), and their output is dropped.  Otherwise the rows
    are gathered."""
    B = len(rows)
    r0, r1 = int(rows.min()), int(rows.max()) + 1
    if r1 - r0 > 2 * B:
        rows_t = torch.from_numpy(rows).to(keys.device)
        sub = keys[:, :, :L].index_select(0, rows_t)
        if weights is None:
            return decode_mass(q, sub, scale, visible)
        return decode_mass_queued(q, sub, scale, visible, weights)
    local = rows - r0
    local_t = torch.from_numpy(local).to(q.device)
    q_all = q.new_zeros((r1 - r0,) + tuple(q.shape[1:]))
    q_all[local_t] = q
    vis_all = np.zeros((r1 - r0,) + visible.shape[1:], dtype=bool)
    vis_all[..., 0] = True
    vis_all[local] = visible
    if weights is None:
        return decode_mass(q_all, keys[r0:r1, :, :L], scale, vis_all)[local_t]
    w_all = weights.new_zeros((r1 - r0, weights.shape[1]))
    w_all[local_t] = weights
    return decode_mass_queued(q_all, keys[r0:r1, :, :L], scale, vis_all, w_all)[local_t]


def queued_mass_rows(keys: torch.Tensor, scored: np.ndarray, rows: np.ndarray, q: torch.Tensor, qpos: np.ndarray,
                     n: np.ndarray, decay: np.ndarray, L: int, scale: float) -> torch.Tensor:
    """``sum_j decay^(n-1-j) * mass_j`` [B, L] of each row's first ``n[b]`` queued queries
    (:func:`queued_mass`), over the decode bank's ``keys`` [rows, H, positions, D] of the rows
    (``scored`` [rows, positions]: the positions each row scores), read as one view when the
    rows lie in a span at most twice their number (rows of the span without queries get
    weight 0), gathered otherwise."""
    B, N = qpos.shape
    steps = np.arange(N)
    valid = steps[None, :] < n[:, None]  # [B, N]: padding after a row's queries
    weights = np.where(valid, decay[:, None] ** np.maximum(n[:, None] - 1 - steps[None, :], 0), 0)
    # Padding sees every scored key (a finite softmax), with weight 0.
    qpos = np.where(valid, qpos, L - 1)
    r0, r1 = int(rows.min()), int(rows.max()) + 1
    dev = q.device
    if r1 - r0 == B and (B == 1 or bool((np.diff(rows) == 1).all())):
        return queued_mass(q, keys[r0:r1, :, :L], scale, ~scored[r0:r1, :L], qpos,
                           weights.astype(np.float32))
    if r1 - r0 > 2 * B:
        rows_t = torch.from_numpy(rows).to(keys.device)
        return queued_mass(q, keys[:, :, :L].index_select(0, rows_t), scale, ~scored[rows, :L], qpos,
                           weights.astype(np.float32))
    local = rows - r0
    local_t = torch.from_numpy(local).to(dev)
    span = r1 - r0
    q_all = q.new_zeros((span,) + tuple(q.shape[1:]))
    q_all[local_t] = q
    hidden = np.zeros((span, L), dtype=bool)  # rows without queries: everything visible
    hidden[local] = ~scored[rows, :L]
    qpos_all = np.full((span, N), L - 1, dtype=np.int64)
    qpos_all[local] = qpos
    w_all = np.zeros((span, N), dtype=np.float32)
    w_all[local] = weights
    return queued_mass(q_all, keys[r0:r1, :, :L], scale, hidden, qpos_all, w_all)[local_t]
