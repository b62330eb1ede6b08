"""The decode stage's data: per-request decode state in one shared bank, recycle-bin entries,
and the parking and restore choices (HAE's Dynamic Decoding Eviction; the stage that drives them
is :mod:`hae_vllm.worker.decode_stage`).

Per request, after its prefill was planned:

* ``slot_pos`` maps each logical slot of the request (block index * block_size + offset) to the
  token position stored there (-1: hole or not yet written).  New decode tokens land in slot ==
  position (vLLM's slot mapping is logical); compaction swaps move tokens between slots;
* ``score`` holds, per position, the decayed attention the token received from each new query
  at the first decoder layer (live and binned tokens alike, so they can be compared);
* ``bin``: parked blocks (id, logical index, the positions they hold), readable until vLLM's
  pool reuses them.

The per-position arrays of all requests live in one :class:`DecodeBank` (a row each), so that
the work every decode step does for every request (append the new token, score it, decay the
scores, count live tokens against the budget) is a few operations for the whole batch; what is
left per request (choosing victims, the bin, restore proposals) runs only when it has work.

Parking: when live tokens exceed the budget by a whole block, the lowest-scored evictable tokens
(no sinks, no recent window, not in the tail block) are swapped into whole blocks, which leave
the attention set and go to the bin.  Restoring: every ``rescore_interval`` steps the best binned
block is proposed back when it beats the weakest live block's worth of tokens; the scheduler
confirms it (the block may have been reused) and the worker re-inserts it at the next step.
"""

from __future__ import annotations

import heapq
from itertools import chain
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from hae_vllm.config import EvictionConfig
from hae_vllm.kernels.compaction import host_view
from hae_vllm.plan import apply_plan_to_positions, plan_compaction


@dataclass
class BinEntry:
    block_id: int
    index: int  # logical block index it came from (a null hole while parked)
    positions: np.ndarray  # [block_size] token positions it holds, in slot order


class DecodeBank:
    """The decode state of every request in one set of dense arrays, a row per request, so a
    decode step appends, scores and counts for all requests with a few array operations
    instead of a handful per request.

    * ``slot_pos`` [rows, capacity] int64: slot -> position (-1: hole, parked or unwritten);
    * ``score`` [rows, capacity] float32: decayed layer-0 attention, by position;
    * ``scored`` [rows, capacity] bool: the positions a decode query attends to when scored:
      live and binned tokens (released and evicted ones are not);
    * ``keys`` [rows, kv_heads, capacity, head_dim] (torch, the cache's device and dtype):
      layer-0 keys by position, what decode scoring reads instead of the paged cache (head
      major: a KV head's keys of a request are one strided matrix, so all requests and heads
      are scored by one batched product);
    * with ``score_interval`` k > 1 (a row's last k queries scored in one pass), the layer-0
      queries of the steps not scored yet, in per-row queues ``queued_q`` [rows, queue,
      num_heads, head_dim] with their positions ``queued_pos`` [rows, queue] (step order) and
      counts ``num_queued`` [rows]: one indexed copy per step, whatever the batch.  Keys go to
      ``keys`` at once (every step), so nothing but the queries waits.  Append-only steps
      (nothing due) are cheaper still: their queries go to a step log in one copy, their keys
      stay in the paged cache, and the log joins the queues at the next use of the queues
      (:meth:`log_query`, :meth:`flush`).  ``interval`` [rows]: each row's ``score_interval``.

    Rows are recycled when a request's state is dropped; both dimensions grow by doubling
    (capacity up to ``max_len``), and a :class:`DecodeState` reads its row through the bank,
    so growth never leaves a state with a stale view."""

    def __init__(self, max_len: int | None = None) -> None:
        self.max_len = max_len
        self.capacity = 0
        self.slot_pos = np.full((0, 0), -1, dtype=np.int64)
        self.score = np.zeros((0, 0), dtype=np.float32)
        self.scored = np.zeros((0, 0), dtype=bool)
        self.keys: torch.Tensor | None = None
        self.interval = np.ones(0, dtype=np.int64)
        self.num_queued = np.zeros(0, dtype=np.int64)
        self.num_staging_rows = 0  # rows in use with interval > 1
        self.queued_pos = np.zeros((0, 1), dtype=np.int64)
        # Queued steps whose key is still only in the paged cache (append-only steps, see
        # log_query): read from the cache when the row is scored (:meth:`pending_keys`).
        self.key_pending = np.zeros((0, 1), dtype=bool)
        self.queued_q: torch.Tensor | None = None
        # Append-only steps not yet in the queues (see log_query): each step's (rows,
        # positions, batch rows), and its batch's queries in a host buffer [steps, batch, ...].
        self._log: list[tuple] = []
        self._log_q: np.ndarray | None = None
        self._host_views: dict[int, tuple] = {}  # id -> (tensor, numpy view or None)
        self._free: list[int] = []
        self.in_use = 0

    @property
    def num_rows(self) -> int:
        return self.slot_pos.shape[0]

    def acquire(self) -> int:
        """The lowest free row (rows in use stay packed at the front: decode scoring reads
        the span of rows in use as one view)."""
        if not self._free:
            self._resize(max(8, 2 * self.num_rows), self.capacity)
        self.in_use += 1
        return heapq.heappop(self._free)

    def release(self, row: int) -> None:
        self.flush()
        self.slot_pos[row] = -1
        self.score[row] = 0.0
        self.scored[row] = False
        self.set_interval(row, 1)
        self.num_queued[row] = 0
        self.key_pending[row] = False
        heapq.heappush(self._free, row)
        self.in_use -= 1

    def ensure(self, num_slots: int) -> None:
        if num_slots > self.capacity:
            cap = max(num_slots, 2 * self.capacity)
            if self.max_len is not None:
                cap = max(num_slots, min(cap, self.max_len))
            self._resize(self.num_rows, cap)

    def ensure_keys(self, like: torch.Tensor) -> torch.Tensor:
        """The key bank, allocated on the first decode step (shape, dtype and device of the
        cache's key rows ``like`` [n, kv_heads, head_dim])."""
        if self.keys is None:
            self.keys = like.new_zeros((self.num_rows, like.shape[1], self.capacity, like.shape[2]))
        return self.keys

    def set_interval(self, row: int, k: int) -> None:
        self.num_staging_rows += int(k > 1) - int(self.interval[row] > 1)
        self.interval[row] = k

    def append(self, rows: list[int], positions: list[int], at: list[int], query: torch.Tensor,
               key: torch.Tensor) -> None:
        """One decode step of ``rows`` (distinct, ``interval`` > 1 somewhere), one token each:
        the keys ``key[at]`` [B, kv_heads, head_dim] go to ``keys`` at ``positions`` and the
        queries ``query[at]`` [B, num_heads, head_dim] join the rows' queues.  On the host
        these are a handful of numpy copies (what every decode step pays); elsewhere
        :meth:`put_keys` and :meth:`queue`."""
        self.flush()
        keys, qq = self.keys, self.queued_q
        B = len(rows)
        kd = self._host(keys)
        qd = None if qq is None or qq.dtype != query.dtype or qq.shape[2:] != query.shape[1:] else self._host(qq)
        ks = host_view(key) if key.dtype == keys.dtype else None
        qs = host_view(query)
        nq = self.num_queued
        if kd is None or qd is None or ks is None or qs is None:
            sel = torch.as_tensor(at, device=query.device) if B > 1 else slice(at[0], at[0] + 1)
            self.put_keys(rows, positions, key[sel].reshape(B, keys.shape[1], keys.shape[3]))
            self.queue(rows, positions, query[sel])
            return
        qpos = self.queued_pos
        width = qd.shape[1]
        if B <= 2:
            for r, p, i in zip(rows, positions, at):
                s = int(nq[r])
                if s >= width:  # more steps than the queue holds: grow it (the generic path)
                    self.put_keys([r], [p], key[i : i + 1].reshape(1, keys.shape[1], keys.shape[3]))
                    self.queue([r], [p], query[i : i + 1])
                    continue
                kd[r, :, p] = ks[i].reshape(kd.shape[1], kd.shape[3])
                qd[r, s] = qs[i]
                qpos[r, s] = p
                self.key_pending[r, s] = False
                nq[r] = s + 1
            return
        slots = nq[rows]
        if int(slots.max()) >= width:
            sel = torch.as_tensor(at, device=query.device)
            self.put_keys(rows, positions, key[sel].reshape(B, keys.shape[1], keys.shape[3]))
            self.queue(rows, positions, query[sel])
            return
        kd[rows, :, positions] = ks[at].reshape(B, kd.shape[1], kd.shape[3])
        qd[rows, slots] = qs[at]
        qpos[rows, slots] = positions
        self.key_pending[rows, slots] = False
        nq[rows] = slots + 1

    def log_query(self, rows: list[int], positions: list[int], at: list[int], query: torch.Tensor) -> bool:
        """An append-only step (no row due, every row one token): the batch's queries are copied
        as they are, in one copy, and the step's rows, positions and batch rows ``at`` are
        logged; they join the rows' queues at the next :meth:`flush` (any other use of the
        queues flushes first), where all logged steps take a handful of array operations
        together.  The keys stay in the paged cache until the row is scored (``key_pending``).
        On this CPU path the number of array operations per step, not their size, is what a
        step pays.  False (nothing done) when the queries have no host view."""
        qq = self.queued_q
        if qq is None or qq.dtype != query.dtype or qq.shape[2:] != query.shape[1:]:
            return False
        qs = host_view(query)
        if qs is None:
            return False
        n = max(at) + 1
        buf, k = self._log_q, len(self._log)
        if buf is None or k >= buf.shape[0] or n > buf.shape[1] or buf.dtype != qs.dtype or buf.shape[2:] != qs.shape[1:]:
            self.flush()
            k = 0
            if buf is None or n > buf.shape[1] or buf.dtype != qs.dtype or buf.shape[2:] != qs.shape[1:]:
                width = max(n, 8 if buf is None else 2 * buf.shape[1])
                step_bytes = width * qs[0].nbytes
                steps = max(2, min(64, (8 << 20) // step_bytes))  # at most ~8 MiB of queries
                buf = self._log_q = np.empty((steps, width) + qs.shape[1:], dtype=qs.dtype)
        buf[k, :n] = qs[:n]
        self._log.append((rows, positions, at))
        return True

    def flush(self) -> None:
        """The logged append-only steps' queries into their rows' queues, in step order."""
        log = self._log
        if not log:
            return
        self._log = []
        lens = [len(e[0]) for e in log]
        total = sum(lens)
        rows = np.fromiter(chain.from_iterable(e[0] for e in log), dtype=np.int64, count=total)
        pos = np.fromiter(chain.from_iterable(e[1] for e in log), dtype=np.int64, count=total)
        at = np.fromiter(chain.from_iterable(e[2] for e in log), dtype=np.int64, count=total)
        step = np.repeat(np.arange(len(log)), lens)
        # Each entry's rank among its row's entries (step order): a stable sort by row.
        order = np.argsort(rows, kind="stable")
        by_row = rows[order]
        rank = np.empty(total, dtype=np.int64)
        rank[order] = np.arange(total) - np.searchsorted(by_row, by_row, side="left")
        slots = self.num_queued[rows] + rank
        need = int(slots.max()) + 1
        if need > self.queued_q.shape[1]:
            self._resize_queue(need, self.queued_q[0])
        self._host(self.queued_q)[rows, slots] = self._log_q[step, at]
        self.queued_pos[rows, slots] = pos
        self.key_pending[rows, slots] = True
        self.num_queued += np.bincount(rows, minlength=len(self.num_queued))

    def pending_keys(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(bank row, position) of every queued step of ``rows`` whose key is still only in the
        paged cache; marks them filled (the caller writes them to ``keys``)."""
        self.flush()
        width = self.key_pending.shape[1]
        pend = self.key_pending[rows] & (np.arange(width)[None, :] < self.num_queued[rows][:, None])
        if not pend.any():
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        i, j = np.nonzero(pend)
        self.key_pending[rows] = False
        return rows[i], self.queued_pos[rows[i], j]

    def put_keys(self, rows: list[int], positions: list[int], k: torch.Tensor) -> None:
        """This step's layer-0 keys ``k`` [B, kv_heads, head_dim] of ``rows`` at ``positions``
        (one each)."""
        dst, src = self._host(self.keys), host_view(k) if k.dtype == self.keys.dtype else None
        if dst is not None and src is not None:
            # numpy on the host: a few microseconds where torch's indexing takes several times that.
            if len(rows) == 1:
                dst[rows[0], :, positions[0]] = src[0]
            else:
                dst[rows, :, positions] = src
            return
        dev = self.keys.device
        self.keys[torch.as_tensor(rows, device=dev), :, torch.as_tensor(positions, device=dev)] = k.to(self.keys.dtype)

    def queue(self, rows: list[int], positions: list[int], q: torch.Tensor) -> None:
        """One decode step of ``rows`` (distinct): queries ``q`` [B, num_heads, head_dim] at
        ``positions`` join their rows' queues.  The caller scores a row when it has
        ``interval`` steps queued (more are kept, not lost: the queue grows)."""
        self.flush()
        nq, qpos = self.num_queued, self.queued_pos
        slots = [int(nq[r]) for r in rows]
        qq = self.queued_q
        if qq is None or max(slots) >= qq.shape[1] or qq.shape[2:] != q.shape[1:] or qq.dtype != q.dtype:
            self._resize_queue(max(max(slots) + 1, int(self.interval.max(initial=1))), q)
            qq, qpos = self.queued_q, self.queued_pos
        dst, src = self._host(qq), host_view(q)
        if dst is not None and src is not None:
            if len(rows) == 1:
                dst[rows[0], slots[0]] = src[0]
            else:
                dst[rows, slots] = src
        else:
            qq[torch.as_tensor(rows, device=qq.device), torch.as_tensor(slots, device=qq.device)] = q
        for r, s, p in zip(rows, slots, positions):
            qpos[r, s] = p
            self.key_pending[r, s] = False
            nq[r] = s + 1

    def _host(self, t: torch.Tensor) -> np.ndarray | None:
        return _cached_host_view(self._host_views, t, (self.keys, self.queued_q))

    def take_queued(self, rows: np.ndarray):
        """Empty the rows' queues: returns (queries [len(rows), N, num_heads, head_dim],
        positions [len(rows), N], counts [len(rows)]), N the longest queue (shorter rows
        padded with whatever the queue holds)."""
        self.flush()
        n = self.num_queued[rows]
        N = int(n.max())
        qq = self.queued_q
        r0 = int(rows[0])
        if len(rows) == 1:
            q = qq[r0 : r0 + 1, :N]
        elif int(rows[-1]) - r0 == len(rows) - 1 and bool((np.diff(rows) == 1).all()):
            q = qq[r0 : r0 + len(rows), :N]  # consecutive rows: a view
        else:
            q = qq[torch.from_numpy(rows).to(qq.device), :N]
        pos = self.queued_pos[rows, :N]
        self.num_queued[rows] = 0
        return q, pos, n

    def _resize_queue(self, length: int, like_q: torch.Tensor) -> None:
        length = max(length, self.queued_pos.shape[1])
        old = self.queued_q
        keep = old is not None and old.shape[2:] == like_q.shape[1:]
        self.queued_q = like_q.new_zeros((self.num_rows, length) + tuple(like_q.shape[1:]))
        if keep:
            self.queued_q[:, : old.shape[1]] = old
        self.queued_pos = _padded(self.queued_pos, (self.num_rows, length), 0)
        self.key_pending = _padded(self.key_pending, (self.num_rows, length), False)

    def _resize(self, rows: int, cap: int) -> None:
        self.flush()
        old_rows, old_cap = self.slot_pos.shape
        self.slot_pos = _padded(self.slot_pos, (rows, cap), -1)
        self.score = _padded(self.score, (rows, cap), 0)
        self.scored = _padded(self.scored, (rows, cap), False)
        if self.keys is not None:
            H, D = self.keys.shape[1], self.keys.shape[3]
            keys = self.keys.new_zeros((rows, H, cap, D))
            keys[:old_rows, :, :old_cap] = self.keys
            self.keys = keys
        if rows != old_rows:
            self.interval = np.concatenate([self.interval, np.ones(rows - old_rows, dtype=np.int64)])
            self.num_queued = np.concatenate([self.num_queued, np.zeros(rows - old_rows, dtype=np.int64)])
            self.queued_pos = _padded(self.queued_pos, (rows, self.queued_pos.shape[1]), 0)
            self.key_pending = _padded(self.key_pending, (rows, self.key_pending.shape[1]), False)
            if self.queued_q is not None:
                g = self.queued_q.new_zeros((rows,) + tuple(self.queued_q.shape[1:]))
                g[:old_rows] = self.queued_q
                self.queued_q = g
        for row in range(old_rows, rows):
            heapq.heappush(self._free, row)
        self.capacity = cap


def _cached_host_view(cache: dict[int, tuple], t: torch.Tensor, live: tuple) -> np.ndarray | None:
    """:func:`host_view` of a bank tensor, cached in ``cache`` while the tensor is the same
    object; views of tensors no longer in ``live`` (replaced by a resize) are dropped."""
    hit = cache.get(id(t))
    if hit is None or hit[0] is not t:
        hit = cache[id(t)] = (t, host_view(t))
        for key in [k for k, v in cache.items() if not any(v[0] is x for x in live)]:
            del cache[key]  # views of replaced tensors
    return hit[1]


def _padded(a: np.ndarray, shape: tuple[int, int], fill) -> np.ndarray:
    """``a`` in the leading corner of a new ``shape`` array filled with ``fill``."""
    out = np.full(shape, fill, dtype=a.dtype)
    out[: a.shape[0], : a.shape[1]] = a
    return out


@dataclass
class DecodeState:
    bank: DecodeBank
    row: int
    bin: dict[int, BinEntry] = field(default_factory=dict)
    pending_restore: set[int] = field(default_factory=set)
    steps: int = 0
    by_position: bool = False  # StreamingLLM: park the oldest tokens, never restore
    # The key bank row holds this request's layer-0 keys (filled from the paged cache once).
    has_keys: bool = False
    start_tokens: int = 0  # tokens when the decode stage began (the prompt)
    start_live: int = 0  # of them, live after the prefill's eviction

    @classmethod
    def after_prefill(cls, plan, num_tokens: int, block_size: int, bank: DecodeBank) -> "DecodeState":
        slots = apply_plan_to_positions(plan, num_tokens, block_size)
        ds = cls(bank=bank, row=bank.acquire(), start_tokens=num_tokens, start_live=int((slots >= 0).sum()))
        bank.ensure(num_tokens)
        ds.slot_pos[:num_tokens] = slots
        ds.bank.scored[ds.row, slots[slots >= 0]] = True
        return ds

    @property
    def slot_pos(self) -> np.ndarray:
        return self.bank.slot_pos[self.row]

    @property
    def score(self) -> np.ndarray:
        return self.bank.score[self.row]

    @property
    def keys(self) -> torch.Tensor | None:
        """[capacity, kv_heads, head_dim] view of the bank row (None before the first fill)."""
        return None if self.bank.keys is None else self.bank.keys[self.row].transpose(0, 1)

    def ensure(self, num_slots: int) -> None:
        self.bank.ensure(num_slots)

    def unscore(self, positions: np.ndarray) -> None:
        """Positions that left for good (released or lost from the bin)."""
        self.bank.scored[self.row, positions] = False

    def scored_positions(self) -> np.ndarray:
        return np.flatnonzero(self.bank.scored[self.row])

    def live_slots(self, block_ids: list[int], block_size: int) -> np.ndarray:
        slot_pos = self.slot_pos
        blocks = np.asarray(block_ids[: math.ceil(len(slot_pos) / block_size)])
        n = min(len(slot_pos), len(blocks) * block_size)
        s = np.arange(n)
        return s[(slot_pos[:n] >= 0) & (blocks[s // block_size] != 0)]

    def value(self, entry: BinEntry) -> float:
        return float(self.score[entry.positions].mean())


@dataclass
class DecodeActions:
    """What one request's decode step decided (reported to the scheduler)."""

    parked: list[tuple[int, int]] = field(default_factory=list)  # (logical index, block id)
    parked_positions: list[int] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    restore: list[tuple[int, int]] = field(default_factory=list)


def decode_limit(cfg: EvictionConfig, num_tokens: int) -> int:
    if cfg.decode_budget_tokens is not None:
        return cfg.decode_budget_tokens
    return math.ceil(cfg.decode_budget * num_tokens - 1e-9)


def decode_started(ds: "DecodeState", cfg: EvictionConfig, num_tokens: int) -> bool:
    """Whether the decode budget applies at ``num_tokens``: always for an absolute budget; for a
    keep ratio once the request generated ``decode_start`` x the tokens its prefill left live."""
    if cfg.decode_budget_tokens is not None:
        return True
    return num_tokens - ds.start_tokens >= cfg.decode_start * ds.start_live


def choose_parking(
    ds: DecodeState, cfg: EvictionConfig, block_ids: list[int], end: int, block_size: int,
    protected_prefix: int = 0,
):
    """Victim slots to park now (ranked) and the swap plan, or None.

    Slots below ``protected_prefix`` are prefix-cache hits shared with other requests: their
    blocks are never rewritten, so no token in them moves."""
    bs = block_size
    live = ds.live_slots(block_ids, bs)
    excess = len(live) - decode_limit(cfg, end)
    k = excess // bs if excess > 0 else 0
    if k == 0:
        return None
    pos = ds.slot_pos[live]
    evictable = (
        (pos >= cfg.sink_tokens)
        & (pos < end - cfg.decode_recent_tokens)
        & (live // bs < end // bs)
        & (live >= protected_prefix)
    )
    cand = live[evictable]
    if len(cand) < bs:
        return None
    scores = ds.slot_pos[cand] if ds.by_position else ds.score[ds.slot_pos[cand]]
    order = np.argsort(scores, kind="stable")
    ranked = cand[order]
    plan = plan_compaction(ranked[: k * bs], end, bs)
    if plan.is_empty:
        return None
    assert all(h * bs >= protected_prefix for h in plan.hole_blocks)
    return plan


def weakest_live_value(
    ds: DecodeState, cfg: EvictionConfig, block_ids, end: int, bs: int, protected_prefix: int = 0
) -> float | None:
    live = ds.live_slots(block_ids, bs)
    live = live[live >= protected_prefix]
    pos = ds.slot_pos[live]
    pos = pos[(pos >= cfg.sink_tokens) & (pos < end - cfg.decode_recent_tokens)]
    if len(pos) < bs:
        return None
    return float(np.sort(ds.score[pos])[:bs].mean())
