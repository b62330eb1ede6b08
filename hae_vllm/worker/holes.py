"""Null-block holes: which requests have them, and their removal from the attention metadata.

Eviction replaces a freed block's entry in a request's block table by vLLM's null block (id 0)
and keeps positions logical.  Before attention runs, every row of the batch's block table loses
its holes (live blocks keep their order) and its ``seq_len`` shrinks by a block per hole, so the
kernels never read a freed block (:func:`metadata_without_holes`, which the metadata builders
reach through ``EvictionRuntime.strip_holes``).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch


class HoleTable:
    """The requests of one worker whose block tables hold holes, and the per-step hole removal.

    On the host, the row permutation and the ``seq_len`` reduction are computed once and reused
    while the batch rows and the holes are unchanged (most decode steps), which leaves one
    gather and one subtraction per step.  Every place that turns a table entry into a hole, or
    back, bumps :attr:`version`.  With ``check`` (``HAE_VLLM_CHECK_HOLES=1``, the test suite)
    every step is checked against the direct computation."""

    def __init__(self, check: bool = False) -> None:
        self.per_request: dict[str, int] = {}  # req_id -> holes made (0 allowed)
        self.num_requests = 0
        self.version = 0
        self.check = check
        self._cache: tuple | None = None
        self._bufs: tuple | None = None  # host output buffers (see drop)

    def any(self) -> bool:
        return self.num_requests > 0

    def __contains__(self, req_id: str) -> bool:
        return req_id in self.per_request

    def changed(self) -> None:
        """A table entry of ours turned into a hole or back (a restore): recompute next step."""
        self.version += 1

    def add(self, req_id: str, num_holes: int) -> None:
        """``num_holes`` more holes in a request's table: prefill compaction, decode parking,
        or a conversation hit served with null placeholders."""
        if req_id not in self.per_request:
            self.per_request[req_id] = 0
            self.num_requests += 1
        self.per_request[req_id] += num_holes
        self.version += 1

    def forget(self, req_id: str) -> None:
        """The request finished or was preempted: its table is gone."""
        if self.per_request.pop(req_id, None):
            self.num_requests -= 1
            self.version += 1

    def drop(self, block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int, req_ids: list[str],
             num_reqs: int | None = None):
        """:func:`drop_hole_blocks` for this step's batch, on rows ``< num_reqs`` (default all;
        later rows, the batch's padding, are copied as they are): full-size ``(block_table,
        seq_lens)``, or None when no row has a hole.  ``req_ids`` are the batch's rows.

        On the host the answer is written into buffers this table owns and reuses (valid until
        the next call: attention metadata lives for one step), with one gather and one
        subtraction through a flat column index cached while rows and holes are unchanged."""
        n = block_table.shape[0] if num_reqs is None else num_reqs
        try:  # one touch of each tensor: attribute reads cost microseconds on a cold step
            bt, sl = block_table.numpy(), seq_lens.numpy()
        except TypeError:  # a device tensor
            bt = None
        if bt is None:
            res = drop_hole_blocks(block_table[:n], seq_lens[:n], block_size)
            if res is None or n == block_table.shape[0]:
                return res
            table, sl = block_table.clone(), seq_lens.clone()
            table[:n], sl[:n] = res
            return table, sl
        out = self.drop_host(bt, sl, block_size, req_ids, n)
        if self.check:
            ref = drop_hole_blocks(block_table[:n], seq_lens[:n], block_size)
            if (ref is None) != (out is None) or (ref is not None and not (
                    torch.equal(ref[0], out[0][:n]) and torch.equal(ref[1], out[1][:n])
                    and torch.equal(out[0][n:], block_table[n:]) and torch.equal(out[1][n:], seq_lens[n:]))):
                raise AssertionError(f"cached hole removal disagrees with the direct computation (rows {req_ids[:n]})")
        return out

    def drop_host(self, bt: np.ndarray, sl: np.ndarray, block_size: int, req_ids: list[str], n: int):
        """:meth:`drop` on numpy views of host tensors (no check)."""
        c = self._cache
        # The plan holds while rows, holes and shapes are unchanged (most decode steps).
        if c is None or c[0] != self.version or c[2] != bt.shape or c[1] != req_ids[:n] or c[3] != block_size \
                or c[4] != sl.shape or c[5] != bt.dtype or c[6] != sl.dtype:
            c = self._cache = self._plan(bt, sl, block_size, n, req_ids[:n])
        flat = c[7]
        if flat is None:
            return None
        # (row-offset indices into the whole table: no slicing per step)
        np.take(bt, flat, out=c[9])
        if c[8]:
            np.subtract(sl, c[10], out=c[11], casting="unsafe")
        else:
            np.subtract(sl[:n], c[10], out=c[11], casting="unsafe")
            table_np, _, sl_np, _ = c[12]
            table_np[n:] = bt[n:]
            sl_np[n:] = sl[n:]
        return c[13]

    def _plan(self, bt: np.ndarray, sl: np.ndarray, block_size: int, n: int, rows: list[str]) -> tuple:
        """The cached per-batch answer of :meth:`drop`: its key, then (flat gather index or None,
        whole batch, gather output view, seq_len cut, seq_len output view, buffers, outputs)."""
        key = (self.version, rows, bt.shape, block_size, sl.shape, bt.dtype, sl.dtype)
        order, cut = _hole_permutation(bt[:n], sl[:n], block_size)
        if order is None:
            return key + (None,)
        flat = (order + np.arange(n)[:, None] * bt.shape[1]).reshape(-1)
        bufs = self._buffers(bt, sl)
        table_np, table_t, sl_np, sl_t = bufs
        return key + (flat, n == bt.shape[0], table_np[:n].reshape(-1), cut, sl_np[:n], bufs, (table_t, sl_t))

    def host_seq_lens(self) -> np.ndarray:
        """The ``seq_lens`` the last host :meth:`drop` returned, as numpy."""
        return self._bufs[2]

    def _buffers(self, bt: np.ndarray, sl: np.ndarray):
        """(table array, its tensor, seq_lens array, its tensor) shaped like ``bt`` and ``sl``."""
        b = self._bufs
        if b is None or b[0].shape != bt.shape or b[0].dtype != bt.dtype or b[2].shape != sl.shape or b[2].dtype != sl.dtype:
            t, s = np.empty_like(bt), np.empty_like(sl)
            b = self._bufs = (t, torch.from_numpy(t), s, torch.from_numpy(s))
        return b


def metadata_without_holes(common_attn_metadata, holes: HoleTable, req_ids: list[str], block_size: int):
    """``CommonAttentionMetadata`` with null holes removed from every block-table row.

    Runs every step before attention, when some request of this process has holes: on the
    host it is a gather and a subtraction into buffers the hole table reuses
    (:meth:`HoleTable.drop`) and a shallow copy.  ``req_ids``: the persistent batch's request
    ids in row order."""
    cam = common_attn_metadata
    n = cam.num_reqs
    try:  # host tensors: numpy views (one touch of each tensor; cheaper than torch per step)
        bt, sl = cam.block_table_tensor.numpy(), cam.seq_lens.numpy()
    except TypeError:
        bt = None
    if bt is not None and not holes.check:
        res = holes.drop_host(bt, sl, block_size, req_ids, n)
    else:
        res = holes.drop(cam.block_table_tensor, cam.seq_lens, block_size, req_ids, n)
    if res is None:
        return cam
    table, seq_lens = res
    if not n:
        max_seq_len = cam.max_seq_len
    elif bt is not None:
        out_lens = holes.host_seq_lens()
        max_seq_len = int(out_lens[0]) if n == 1 else int(out_lens[:n].max())
    else:
        max_seq_len = int(seq_lens[:n].max().item())
    changes = {"block_table_tensor": table, "seq_lens": seq_lens, "max_seq_len": max_seq_len}
    ub = getattr(cam, "seq_lens_cpu_upper_bound", None)
    if ub is not None:
        if bt is not None and ub.is_cpu and ub.shape == seq_lens.shape and ub.dtype == seq_lens.dtype:
            changes["seq_lens_cpu_upper_bound"] = seq_lens  # exact lengths bound themselves (read only)
        else:
            ub = ub.clone()
            ub[:n] = seq_lens[:n].to(ub.device, ub.dtype)
            changes["seq_lens_cpu_upper_bound"] = ub
    d = getattr(cam, "__dict__", None)
    if d is not None and dataclasses.is_dataclass(cam):
        # A shallow copy without dataclasses.replace's re-validation (all fields are set).
        out = object.__new__(type(cam))
        out.__dict__.update(d)
        out.__dict__.update(changes)
        return out
    return dataclasses.replace(cam, **changes)


def drop_hole_blocks(
    block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Remove null-block holes from each row's live prefix and shorten seq_lens.

    block_table: [num_reqs, max_blocks] int32; seq_lens: [num_reqs].
    A hole is a block id 0 (vLLM's null block, never handed out) within the first
    ``cdiv(seq_len, block_size)`` entries.  Live blocks keep their order; the tail block (where
    decode writes) is never a hole, so the shortened row ends exactly where the kernel expects.
    Returns None when no row has a hole.
    """
    if block_table.device.type == "cpu":
        # numpy: this runs every step, on a few small rows, where torch's dispatch dominates.
        bt, sl = block_table.numpy(), seq_lens.numpy()
        order, cut = _hole_permutation(bt, sl, block_size)
        if order is None:
            return None
        table = np.take_along_axis(bt, order, axis=1)
        return torch.from_numpy(table), torch.from_numpy((sl - cut).astype(sl.dtype))
    return _drop_hole_blocks_torch(block_table, seq_lens, block_size)


def _hole_permutation(bt: np.ndarray, sl: np.ndarray, block_size: int):
    """(column order per row, seq_len reduction per row), or (None, None) without holes.

    Holes go last; every other column keeps its order (live blocks precede the unused tail)."""
    nb = (sl.astype(np.int64) + block_size - 1) // block_size
    hole = (bt == 0) & (_columns(bt.shape[1]) < nb[:, None])
    num_holes = np.count_nonzero(hole, axis=1)
    if not num_holes.any():
        return None, None
    return np.argsort(hole, axis=1, kind="stable"), num_holes * block_size


@functools.lru_cache(maxsize=8)
def _columns(n: int) -> np.ndarray:
    return np.arange(n)[None, :]


def _drop_hole_blocks_torch(block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int):
    """:func:`drop_hole_blocks` for device tensors (no host copy)."""
    nb = (seq_lens.to(torch.int64) + block_size - 1) // block_size
    cols = torch.arange(block_table.shape[1], device=block_table.device)
    valid = cols[None, :] < nb[:, None]
    hole = valid & (block_table == 0)
    num_holes = hole.sum(dim=1)
    if not bool(num_holes.any()):
        return None
    key = (~valid).to(torch.int8) + 2 * hole.to(torch.int8)
    order = torch.argsort(key, dim=1, stable=True)
    table = torch.gather(block_table, 1, order)
    return table, (seq_lens - (num_holes * block_size).to(seq_lens.dtype))


