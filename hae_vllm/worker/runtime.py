"""Worker-side eviction: per-request scoring state, layer-0 scoring, compaction, table nulling.

One :class:`EvictionRuntime` lives in each worker process (one per model runner).  Its three
entry points are called by the runner hooks (``hae_vllm.patches.model_runner``) and by the
attention backend (``hae_vllm.attention``):

1. :meth:`on_states_updated` after ``_update_states``: start/reset request states, and build the
   step's scoring tasks (requests still prefilling, with visual tokens and eviction on);
2. :meth:`score` from the attention implementation of the scoring layer (the first decoder
   layer), after the layer's KV was written: accumulate dual-attention scores;
3. :meth:`after_forward` once every layer has written its KV: for requests whose last prefill
   chunk just ran, select victims, compact them into whole blocks in every layer, null those
   blocks in the worker's block table, and queue a report for the scheduler, which frees them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from hae_vllm.config import EvictionConfig, EvictionConfigError, engine_config_from_additional, request_config
from hae_vllm.kernels.scoring import attention_stats, dense_attention_stats, use_triton
from hae_vllm.layout import SlotLayout
from hae_vllm.plan import EvictionPlan, plan_compaction
from hae_vllm.policies.attention import LayerAccumulator, attention_probs, decode_mass
from hae_vllm.policies.base import AttentionStats, Policy, ScoringRequest
from hae_vllm.policies.registry import get_policy
from hae_vllm.worker.decode import (
    BinEntry, DecodeActions, DecodeBank, DecodeState, choose_parking, decode_limit, weakest_live_value,
)

if TYPE_CHECKING:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

logger = logging.getLogger("vllm.hae_vllm")  # under vLLM's logger: its handlers and level apply

REPORT_ATTR = "hae_eviction_reports"
"""Attribute of ModelRunnerOutput carrying {req_id: EvictionReport} to the scheduler."""

PRESSURE_ATTR = "hae_memory_pressure"
"""Attribute of SchedulerOutput: True when the pool is short of blocks (free evicted blocks now)."""

BIN_UPDATES_ATTR = "hae_bin_updates"
"""Attribute of SchedulerOutput carrying {req_id: BinUpdates} (restores confirmed, blocks lost)."""

_QUERY_CHUNK = 256  # queries scored at once (bounds the [heads, q, T] logits buffer)
# Layer queries a request may keep for scoring at selection time (off the first token's path);
# a request whose scoring queries would take more is scored in the forward, chunk by chunk.
_DEFER_BYTES = 64 << 20


@dataclass(frozen=True)
class EvictionReport:
    """Worker -> scheduler, per request and step.

    hole_blocks: logical blocks that are now null holes (prefill eviction: free them);
    parked: (logical index, block id) moved to the recycle bin (decode eviction);
    released: parked block ids released for good; restore: (index, block id) to take back.
    """

    hole_blocks: tuple[int, ...] = ()
    num_visual: int = 0
    num_text: int = 0
    num_prompt_tokens: int = 0
    parked: tuple[tuple[int, int], ...] = ()
    released: tuple[int, ...] = ()
    restore: tuple[tuple[int, int], ...] = ()


@dataclass
class RequestState:
    req_id: str
    cfg: EvictionConfig
    policy: Policy
    scoring: ScoringRequest | None  # attention the policy needs (None: position-only policy)
    visual_mask: np.ndarray  # [num_tokens_at_start] bool
    protected_prefix: int  # tokens served from the prefix cache at (re)start: never rewritten
    accs: dict[int, LayerAccumulator] = field(default_factory=dict)  # layer ordinal -> stats
    # Scoring deferred to selection: (layer ordinal, queries, positions) copied in the forward.
    defer_scoring: bool | None = None
    saved_queries: list = field(default_factory=list)
    decided: bool = False
    plan: EvictionPlan | None = None
    decode: DecodeState | None = None

    def scores_layer(self, ordinal: int) -> bool:
        sc = self.scoring
        return sc is not None and (sc.layers is None or ordinal in sc.layers)


@dataclass
class DecodeTask:
    state: RequestState
    row: int
    start: int
    end: int
    block_ids: list[int]
    num_live: int | None = None  # live tokens this step (counted by scoring, before any parking)


@dataclass
class ScoringTask:
    state: RequestState
    row: int  # index in the persistent batch == row of query_start_loc
    start: int  # first position of this chunk
    end: int  # one past the last position of this chunk
    is_last_chunk: bool
    block_ids: list[int] = field(default_factory=list)


def visual_mask_from_features(mm_features, num_tokens: int) -> np.ndarray:
    """Positions of embedded multimodal tokens (is_embed honoured)."""
    mask = np.zeros(num_tokens, dtype=bool)
    for feat in mm_features or ():
        pos = feat.mm_position
        lo, hi = pos.offset, min(pos.offset + pos.length, num_tokens)
        if hi <= lo:
            continue
        if pos.is_embed is None:
            mask[lo:hi] = True
        else:
            emb = pos.is_embed.cpu().numpy().astype(bool)[: hi - lo]
            mask[lo:hi] |= emb
    return mask


class EvictionRuntime:
    def __init__(self, runner: "GPUModelRunner", cfg: EvictionConfig):
        self.runner = runner
        self.cfg = cfg
        self.states: dict[str, RequestState] = {}
        self.tasks: list[ScoringTask] = []
        self.decode_tasks: list[DecodeTask] = []
        # Requests whose prefill finished last step: selected and compacted at the start of
        # their first decode step, so the first token does not wait for it - unless the
        # scheduler reported memory pressure, when blocks are freed at the end of the step.
        self._pending: list[ScoringTask] = []
        self._pressure = True
        # Requests with no per-step work: no eviction, or prefill eviction decided and no
        # decode eviction (skipped first thing in the per-step loop).
        self._skip: set[str] = set()
        self.reports: dict[str, EvictionReport] = {}
        self.num_requests_with_holes = 0
        self._holes: dict[str, int] = {}
        # Bumped whenever a block-table entry of ours turns into a hole or back: the gather
        # index that drops holes from the batch's tables is reused while it and the batch rows
        # are unchanged (see :meth:`drop_holes`).
        self._holes_version = 0
        self._hole_cache: tuple | None = None
        self._check_holes = os.environ.get("HAE_VLLM_CHECK_HOLES", "") == "1"
        # Decode state of all requests, a row each (see DecodeBank).  With
        # HAE_VLLM_CHECK_DECODE=1 (the tests) every decode step checks the bank's incremental
        # bookkeeping (scored positions, live counts) against a recomputation per request.
        self.decode_bank = DecodeBank(getattr(runner, "max_model_len", None))
        self._check_decode = os.environ.get("HAE_VLLM_CHECK_DECODE", "") == "1"
        # 0 scores every request in the forward (tests compare the two paths).
        self._defer_bytes = int(os.environ.get("HAE_VLLM_DEFER_SCORING_BYTES", _DEFER_BYTES))
        self._layout: SlotLayout | None = None
        self._scoring_layer: str | None = None
        self._layer_names: list[str] | None = None
        self._ordinal: dict[str, int] = {}
        self._scoring_ordinals: set[int] = set()
        self._tp_group = None
        self._tp_size = 1
        self._trace_lock = threading.Lock()
        self._is_reporting_rank = True
        self._tp_rank = 0
        try:
            from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size, get_tp_group

            self._tp_size = get_tensor_model_parallel_world_size()
            if self._tp_size > 1:
                self._tp_group = get_tp_group()
            self._tp_rank = get_tensor_model_parallel_rank()
            self._is_reporting_rank = self._tp_rank == 0
        except Exception:  # not initialised (unit tests)
            pass

    # ------------------------------------------------------------------ helpers
    @property
    def block_size(self) -> int:
        return self.runner.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size

    def _attention_layers(self) -> list[str]:
        if self._layer_names is None:
            from vllm.model_executor.models.utils import extract_layer_index

            groups = self.runner.kv_cache_config.kv_cache_groups
            names = sorted((n for g in groups for n in g.layer_names), key=extract_layer_index)
            self._layer_names = names
            self._ordinal = {n: i for i, n in enumerate(names)}
            self._scoring_layer = names[0]
        return self._layer_names

    @property
    def scoring_layer(self) -> str:
        self._attention_layers()
        assert self._scoring_layer is not None
        return self._scoring_layer

    def _layer(self, name: str):
        return self.runner.compilation_config.static_forward_context[name]

    def layout(self) -> SlotLayout:
        if self._layout is None:
            layer = self._layer(self.scoring_layer)
            kv = layer.kv_cache
            spec = self.runner.kv_cache_config.kv_cache_groups[0].kv_cache_spec
            impl = layer.impl

            def write(k, v, cache, slots):
                impl.do_kv_cache_update(layer, k, v, cache, slots)

            self._layout = SlotLayout.probe(
                write,
                tuple(kv.shape),
                kv.dtype,
                self.runner.kv_cache_config.num_blocks,
                spec.block_size,
                spec.num_kv_heads,
                spec.head_size,
                device=kv.device,
            )
        return self._layout

    def has_holes(self) -> bool:
        return self.num_requests_with_holes > 0

    def wants_scoring(self, layer_name: str) -> bool:
        if not self._scoring_ordinals:
            return False
        return self._ordinal.get(layer_name, -1) in self._scoring_ordinals

    def _drop(self, req_id: str) -> None:
        st = self.states.pop(req_id, None)
        if st is not None and st.decode is not None:
            self.decode_bank.release(st.decode.row)
            st.decode = None
        self._skip.discard(req_id)
        if self._holes.pop(req_id, None):
            self.num_requests_with_holes -= 1
            self._holes_version += 1

    def drop_holes(self, block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int):
        """:func:`drop_hole_blocks` for this step's batch (rows in ``input_batch`` order).

        On the host, the row permutation and the seq_len reduction are computed once and
        reused while the batch rows and the holes are unchanged (most decode steps), which
        leaves one gather and one subtraction per step.  Every place that turns a table entry
        into a hole, or back, bumps the version.  With ``HAE_VLLM_CHECK_HOLES=1`` (the test
        suite) every step is checked against the direct computation."""
        if block_table.device.type != "cpu":
            return drop_hole_blocks(block_table, seq_lens, block_size)
        n = block_table.shape[0]
        rows = self.runner.input_batch.req_ids[:n]  # a copy: the batch's list is mutated
        key = (self._holes_version, block_table.shape, block_size)
        cache = self._hole_cache
        if cache is None or cache[0] != key or cache[1] != rows:
            cache = self._hole_cache = (key, rows, *_hole_permutation(block_table.numpy(), seq_lens.numpy(), block_size))
        order, cut = cache[2], cache[3]
        if order is None:
            out = None
        else:
            sl = seq_lens.numpy()
            out = (torch.from_numpy(np.take_along_axis(block_table.numpy(), order, axis=1)),
                   torch.from_numpy((sl - cut).astype(sl.dtype)))
        if self._check_holes:
            ref = drop_hole_blocks(block_table, seq_lens, block_size)
            if (ref is None) != (out is None) or (ref is not None and not (
                    torch.equal(ref[0], out[0]) and torch.equal(ref[1], out[1]))):
                raise AssertionError(f"cached hole removal disagrees with the direct computation (rows {rows})")
        return out

    # ------------------------------------------------------------------ 1. step start
    def on_states_updated(self, scheduler_output) -> None:
        self.tasks = []
        self.decode_tasks = []
        self._scoring_ordinals = set()
        for req_id in scheduler_output.finished_req_ids:
            self._drop(req_id)
        cached = scheduler_output.scheduled_cached_reqs
        for req_id in getattr(cached, "resumed_req_ids", ()) or ():
            # Preempted: every block was freed and the request recomputes from scratch.
            self._drop(req_id)
        for new in scheduler_output.scheduled_new_reqs:
            self._drop(new.req_id)
        self._apply_bin_updates(getattr(scheduler_output, BIN_UPDATES_ATTR, None))
        self._pressure = getattr(scheduler_output, PRESSURE_ATTR, True)
        self._run_pending(scheduler_output.num_scheduled_tokens)
        if not scheduler_output.num_scheduled_tokens:
            return
        self._attention_layers()
        runner = self.runner
        index = runner.input_batch.req_id_to_index
        skip = self._skip
        bs = self.block_size
        rows, firsts, counts = [], [], []
        for req_id, n in scheduler_output.num_scheduled_tokens.items():
            if req_id in skip:
                continue
            st = self.states.get(req_id)
            req = runner.requests.get(req_id)
            if req is None:
                continue
            if st is None:
                if req_id in self._holes or req.num_computed_tokens >= req.num_tokens:
                    continue
                st = self._start(req)
                if st is None:
                    self._skip.add(req_id)
                    continue
            if st.decided:
                if st.decode is not None:
                    start = req.num_computed_tokens
                    self.decode_bank.ensure(len(req.block_ids[0]) * bs)
                    rows.append(st.decode.row)
                    firsts.append(start)
                    counts.append(n)
                    self.decode_tasks.append(DecodeTask(st, index[req_id], start, start + n, req.block_ids[0]))
                continue
            start = req.num_computed_tokens
            end = start + n
            self.tasks.append(
                ScoringTask(
                    state=st,
                    row=index[req_id],
                    start=start,
                    end=end,
                    is_last_chunk=end >= req.num_tokens,
                    block_ids=req.block_ids[0],
                )
            )
        if rows:
            # This step's tokens land in slot == position (vLLM's slot mapping is logical) and
            # are scored from now on.
            r, c = np.repeat(rows, counts), _ranges(firsts, counts)
            self.decode_bank.slot_pos[r, c] = c
            self.decode_bank.scored[r, c] = True
        num_layers = len(self._attention_layers())
        if self.decode_tasks:
            self._scoring_ordinals.add(0)
        for task in self.tasks:
            sc = task.state.scoring
            if sc is not None:
                self._scoring_ordinals.update(range(num_layers) if sc.layers is None else sc.layers)

    def _start(self, req) -> RequestState | None:
        sp = req.sampling_params
        if sp is None:
            return None
        try:
            cfg = request_config(self.cfg, sp.extra_args)
        except EvictionConfigError as e:  # validated in the API process; never corrupt
            logger.warning("request %s: eviction disabled: %s", req.req_id, e)
            return None
        if not cfg.enabled:
            return None
        mask = visual_mask_from_features(req.mm_features, req.num_tokens)
        if not mask.any() and not cfg.decode_enabled:
            return None
        policy = get_policy(cfg.method)
        scoring = policy.scoring(req.num_tokens, mask, cfg) if policy.uses_attention else None
        num_layers = len(self._attention_layers())
        if scoring is not None and scoring.layers is not None and max(scoring.layers) >= num_layers:
            logger.warning("request %s: %s scores layer %s but the model has %d; using the last layer",
                           req.req_id, cfg.method, max(scoring.layers), num_layers)
            scoring = ScoringRequest(tuple(min(l, num_layers - 1) for l in scoring.layers), scoring.query_mask, scoring.per_head)
        st = RequestState(
            req_id=req.req_id,
            cfg=cfg,
            policy=policy,
            scoring=scoring,
            visual_mask=mask,
            protected_prefix=(req.num_computed_tokens // self.block_size) * self.block_size,
        )
        self.states[req.req_id] = st
        return st

    # ------------------------------------------------------------------ 2. scoring layer
    def _slots(self, block_ids: list[int], positions) -> torch.Tensor:
        """Physical slots of logical ``positions`` (any int sequence) of a request; int64, CPU."""
        bs = self.block_size
        pos = np.asarray(positions, dtype=np.int64)
        table = np.asarray(block_ids, dtype=np.int64)
        return torch.from_numpy(table[pos // bs] * bs + pos % bs)

    def _keys(self, task, key: torch.Tensor, q0: int, kv_cache, layout) -> torch.Tensor:
        """Keys of positions 0..end-1: this chunk's straight from the layer input, earlier
        chunks' gathered from the paged cache.  [T, num_kv_heads, head_dim]."""
        n = task.end - task.start
        current = key[q0 : q0 + n].view(n, -1, key.shape[-1]) if key.dim() == 3 else key[q0 : q0 + n]
        if task.start == 0:
            return current
        past = layout.gather_keys(kv_cache, self._slots(task.block_ids, np.arange(task.start)))
        return torch.cat([past.to(current.dtype), current], dim=0)

    def score(self, impl, layer_name: str, query: torch.Tensor, key: torch.Tensor, kv_cache: torch.Tensor,
              query_start_loc: torch.Tensor) -> None:
        """Accumulate the attention statistics this step's tasks asked for at this layer, or keep
        a copy of the scoring queries to do it at selection (most requests: see _DEFER_BYTES).

        query: [num_tokens, num_heads, head_dim], key: [num_tokens, num_kv_heads, head_dim] of
        the layer (post-RoPE); kv_cache: the layer's cache, already holding this step's keys.
        """
        ordinal = self._ordinal[layer_name]
        layout = self.layout()
        qsl = query_start_loc.tolist()
        num_heads_total = impl.num_heads * self._tp_size
        if ordinal == 0 and self.decode_tasks:
            self._score_decode(self.decode_tasks, impl, query, key, kv_cache, qsl, layout)
        # Scoring reads the keys from the paged cache.  It runs at selection, off the first
        # token's path, for requests whose queries are cheap to keep (see _DEFER_BYTES).
        plane = layout.key_plane(kv_cache)
        num_layers = len(self._attention_layers())
        for task in self.tasks:
            st = task.state
            if not st.scores_layer(ordinal):
                continue
            assert st.scoring is not None
            q0 = qsl[task.row]
            qmask = st.scoring.query_mask
            per_head = st.scoring.per_head
            pos = np.arange(task.start, min(task.end, len(qmask)))
            sel = pos[qmask[pos]] if len(pos) else pos
            acc = st.accs.get(ordinal)
            if acc is None:
                acc = st.accs[ordinal] = LayerAccumulator(len(qmask), num_heads_total, per_head)
            if not len(sel):
                # No scoring query in this chunk (e.g. an image-only chunk).  Every TP rank
                # sees the same tasks, so all of them skip the collective together.
                continue
            if st.defer_scoring is None:
                n_layers = num_layers if st.scoring.layers is None else len(st.scoring.layers)
                st.defer_scoring = (int(qmask.sum()) * n_layers * query.shape[1] * query.shape[2]
                                    * query.element_size() <= self._defer_bytes)
            keys = None
            if plane is None and not st.defer_scoring:  # not affine: keys through the offset table
                keys = self._keys(task, key, q0, kv_cache, layout)
            for c in range(0, len(sel), _QUERY_CHUNK):
                chunk = sel[c : c + _QUERY_CHUNK]
                qpos = torch.as_tensor(chunk, dtype=torch.int64)
                lo = q0 + int(chunk[0]) - task.start
                if int(chunk[-1]) - int(chunk[0]) + 1 == len(chunk):  # a run (text after an image)
                    q = query[lo : lo + len(chunk)]
                else:
                    q = query[q0 + (qpos - task.start).to(query.device)]
                if st.defer_scoring:
                    # The keys stay in the cache until selection; the queries are this layer's
                    # buffer, reused by the next layer: keep a copy.
                    st.saved_queries.append((ordinal, q.clone(), qpos))
                else:
                    self._accumulate(acc, q, qpos, task.end, task.block_ids, kv_cache, impl.scale, per_head, keys)

    def _accumulate(self, acc: LayerAccumulator, q: torch.Tensor, qpos: torch.Tensor, T: int, block_ids,
                    kv_cache: torch.Tensor, scale: float, per_head: bool, keys: torch.Tensor | None = None) -> None:
        """Attention statistics of queries ``q`` (positions ``qpos``) over the request's keys
        ``0..T-1``, read in place from the paged cache (the scoring kernel on CUDA, its torch
        reference on the CPU), or from ``keys`` / the offset table for a layout that is not
        affine; gathered across TP ranks, added to ``acc``."""
        layout = self.layout()
        plane = layout.key_plane(kv_cache)
        if plane is not None:
            table = torch.as_tensor(block_ids[: -(-T // self.block_size)], dtype=torch.int64)
            rows, head_sum = attention_stats(q, plane, table, qpos, T, scale, per_head)
        else:
            if keys is None:
                keys = layout.gather_keys(kv_cache, self._slots(block_ids, np.arange(T)))
            rows, head_sum = dense_attention_stats(q, keys, qpos, scale, per_head)
        if self._tp_group is not None:
            # Gathered, then summed in rank order on every rank: all ranks get the same bits
            # (an all-reduce need not), so they select the same victims.
            rows = self._tp_group.all_gather(rows.to(q.device)[None].contiguous(), dim=0).sum(0)
            if head_sum is not None:
                head_sum = self._tp_group.all_gather(head_sum.to(q.device).contiguous(), dim=0)
        acc.add_rows(rows.cpu(), None if head_sum is None else head_sum.cpu(), qpos)

    def _score_saved(self, st: RequestState, T: int, block_ids) -> None:
        """Deferred scoring, at selection: every saved query chunk against the keys still in
        the cache, in the order the forward saw them (on every TP rank alike)."""
        saved, st.saved_queries = st.saved_queries, []
        names = self._attention_layers()
        for ordinal, q, qpos in saved:
            layer = self._layer(names[ordinal])
            self._accumulate(st.accs[ordinal], q, qpos, T, block_ids, layer.kv_cache, layer.impl.scale,
                             st.scoring.per_head)

    def _gather_probs(self, q: torch.Tensor, keys: torch.Tensor, qpos: torch.Tensor, key_pos, impl) -> torch.Tensor:
        probs = attention_probs(q, keys, qpos, impl.scale, key_pos)
        if self._tp_group is not None:
            probs = self._tp_group.all_gather(probs.to(q.device).contiguous(), dim=0)
        return probs.cpu()

    def _score_decode(self, tasks: list[DecodeTask], impl, query, key, kv_cache, qsl, layout) -> None:
        """Decayed layer-0 attention of each request's new query over its live and binned
        tokens, and each request's live count against its budget.  One decode token per
        request (the usual case): all requests at once from the bank's key rows, masked to each
        row's scored positions; otherwise request by request."""
        bank = self.decode_bank
        for dt in tasks:
            if not dt.state.decode.has_keys:
                self._fill_keys(dt, kv_cache, layout)
        rows = np.fromiter((dt.state.decode.row for dt in tasks), dtype=np.int64, count=len(tasks))
        starts = np.fromiter((dt.start for dt in tasks), dtype=np.int64, count=len(tasks))
        ends = np.fromiter((dt.end for dt in tasks), dtype=np.int64, count=len(tasks))
        L = int(ends.max())
        keys = bank.keys
        if bool((ends - starts == 1).all()):
            dev = keys.device
            rows_t = torch.from_numpy(rows).to(dev)
            qrows = torch.as_tensor([qsl[dt.row] for dt in tasks], device=query.device)
            new = key[qrows].reshape(len(tasks), keys.shape[1], keys.shape[3]).to(keys.dtype)
            keys[rows_t, :, torch.from_numpy(starts).to(dev)] = new  # [B, kv_heads, head_dim]
            visible = bank.scored[rows, :L] & (np.arange(L)[None, :] <= starts[:, None])
            mass = self._decode_mass_rows(query[qrows], rows, keys, L, impl.scale, visible)
            num_heads = query.shape[1]
            if self._tp_group is not None:
                # Summed in rank order on every rank: the same bits everywhere.
                mass = self._tp_group.all_gather(mass[None].contiguous(), dim=0).sum(0)
                num_heads *= self._tp_group.world_size
            decay = np.fromiter((dt.state.cfg.decode_decay for dt in tasks), dtype=np.float32, count=len(tasks))
            # Unscored columns get zero mass: their scores only decay, as before.
            bank.score[rows, :L] = bank.score[rows, :L] * decay[:, None] + (mass / num_heads).cpu().numpy()
        else:
            for dt in tasks:
                ds, n, q0 = dt.state.decode, dt.end - dt.start, qsl[dt.row]
                ds.keys[dt.start : dt.end] = key[q0 : q0 + n].reshape(n, keys.shape[1], keys.shape[3]).to(keys.dtype)
                pos = ds.scored_positions()
                probs = self._gather_probs(query[q0 : q0 + n], _rows(ds.keys, pos),
                                           torch.arange(dt.start, dt.end), torch.as_tensor(pos), impl)
                score = ds.score  # the bank's row (a view)
                score *= dt.state.cfg.decode_decay
                score[pos] += probs.mean(0).sum(0).numpy()  # positions are distinct
        slots = max(len(dt.block_ids) for dt in tasks) * self.block_size
        live = (bank.slot_pos[rows, :slots] >= 0).sum(1)
        for dt, n_live in zip(tasks, live.tolist()):
            dt.num_live = n_live
        if self._check_decode:
            self._check_decode_state(tasks)

    @staticmethod
    def _decode_mass_rows(q: torch.Tensor, rows: np.ndarray, keys: torch.Tensor, L: int, scale: float,
                          visible: np.ndarray) -> torch.Tensor:
        """:func:`decode_mass` of queries ``q`` over the bank's key ``rows`` (one per query).

        When the rows lie in a span at most twice their number (the bank hands out its lowest
        free row, so rows in use stay packed), the span is read as one strided view instead of
        copying every row's keys: rows of the span without a query this step get a zero query
        that sees only position 0, and their output is dropped.  Otherwise the rows are
        gathered."""
        B = len(rows)
        r0, r1 = int(rows.min()), int(rows.max()) + 1
        if r1 - r0 > 2 * B:
            rows_t = torch.from_numpy(rows).to(keys.device)
            return decode_mass(q, keys[:, :, :L].index_select(0, rows_t), scale, visible)
        local = rows - r0
        local_t = torch.from_numpy(local).to(q.device)
        q_all = q.new_zeros((r1 - r0,) + tuple(q.shape[1:]))
        q_all[local_t] = q
        vis_all = np.zeros((r1 - r0, L), dtype=bool)
        vis_all[:, 0] = True
        vis_all[local] = visible
        return decode_mass(q_all, keys[r0:r1, :, :L], scale, vis_all)[local_t]

    def _check_decode_state(self, tasks: list[DecodeTask]) -> None:
        """The bank's incremental bookkeeping against a recomputation from the block tables and
        the bin (HAE_VLLM_CHECK_DECODE=1)."""
        bs = self.block_size
        for dt in tasks:
            ds = dt.state.decode
            live = ds.live_slots(dt.block_ids, bs)
            expect = np.sort(np.concatenate([ds.slot_pos[live]] + [e.positions for e in ds.bin.values()]))
            got = ds.scored_positions()
            if dt.num_live != len(live) or not np.array_equal(expect, got):
                raise AssertionError(
                    f"decode state of {dt.state.req_id} out of step: live {dt.num_live} vs {len(live)}, "
                    f"scored {len(got)} positions vs {len(expect)} live and binned")

    def _fill_keys(self, dt: DecodeTask, kv_cache, layout) -> None:
        """First decode step of a request: its bank row gets the layer-0 keys of every token
        already cached (live and binned), indexed by position.  Later tokens come from each
        step's own key rows, so decode scoring never gathers from the paged cache again: the
        bank holds exactly what the cache holds for every token scored (binned tokens stay
        readable in the pool until the bin drops them)."""
        ds, bs = dt.state.decode, self.block_size
        live = ds.live_slots(dt.block_ids, bs)
        pos = ds.slot_pos[live]
        old = pos < dt.start  # this step's tokens come from the layer input
        table = np.asarray(dt.block_ids)
        phys = [table[live[old] // bs] * bs + live[old] % bs]
        pos = [pos[old]]
        for entry in ds.bin.values():
            phys.append(entry.block_id * bs + np.arange(bs))
            pos.append(entry.positions)
        cached = layout.gather_keys(kv_cache, torch.as_tensor(np.concatenate(phys), dtype=torch.int64))
        self.decode_bank.ensure_keys(cached)
        ds.keys[torch.as_tensor(np.concatenate(pos), device=cached.device)] = cached.to(ds.keys.dtype)
        ds.has_keys = True

    def _apply_bin_updates(self, updates) -> None:
        """Scheduler confirmations from the previous step: restored blocks re-enter the table."""
        if not updates:
            return
        bs = self.block_size
        batch = self.runner.input_batch
        for req_id, upd in updates.items():
            st = self.states.get(req_id)
            if st is None or st.decode is None:
                continue
            ds = st.decode
            for bid in upd.lost:
                entry = ds.bin.pop(bid, None)
                ds.pending_restore.discard(bid)
                if entry is not None:
                    ds.unscore(entry.positions)
            req = self.runner.requests.get(req_id)
            for idx, bid in upd.restored:
                entry = ds.bin.pop(bid, None)
                ds.pending_restore.discard(bid)
                if entry is None or req is None:
                    continue
                req.block_ids[0][idx] = bid
                self._holes_version += 1
                row = batch.req_id_to_index.get(req_id)
                if row is not None:
                    batch.block_table[0].block_table.np[row, idx] = bid
                ds.slot_pos[idx * bs : (idx + 1) * bs] = entry.positions
                self._trace_event(st, "restore", req.num_computed_tokens, entry.positions.tolist(), 1)

    # ------------------------------------------------------------------ 3. after forward
    def after_forward(self) -> None:
        dtasks, self.decode_tasks = self.decode_tasks, []
        swaps = [m for m in (self._decode_step(dt) for dt in dtasks) if m is not None]
        if swaps:
            # One swap per layer for every request that parks this step (disjoint slots:
            # each request swaps within its own blocks).
            self.layout().swap_many(self._caches(), torch.cat([m[0] for m in swaps]), torch.cat([m[1] for m in swaps]))
        tasks, self.tasks = self.tasks, []
        done = [t for t in tasks if t.is_last_chunk]
        for task in done:
            task.state.decided = True
            if not task.state.cfg.decode_enabled:
                self._skip.add(task.state.req_id)
        if self._pressure:
            self._compact_all(done, deferred=False)  # blocks free before the next schedule()
        else:
            self._pending.extend(done)

    def _run_pending(self, scheduled: dict[str, int]) -> None:
        """Select and compact the requests whose prefill ended last step, before this step's
        forward reads their cache.  This keeps selection and the copies off the first token's
        path (its logits come from the prefill, before any eviction).

        Only requests scheduled in this step are compacted: one that finished, or was preempted
        (its blocks freed, maybe handed to another request already), is not, and one that was
        not scheduled for any other reason keeps its full cache."""
        if not scheduled or not self._pending:
            return
        pending, self._pending = self._pending, []
        self._compact_all([t for t in pending
                           if t.state.req_id in scheduled and self.states.get(t.state.req_id) is t.state],
                          deferred=True)

    def _compact_all(self, tasks: list[ScoringTask], deferred: bool) -> None:
        moves = [m for m in (self._compact(t, deferred) for t in tasks) if m is not None]
        if moves:
            # One copy per layer for all these requests (their slots are disjoint: each
            # request owns its blocks).
            src = torch.cat([m[0] for m in moves])
            dst = torch.cat([m[1] for m in moves])
            self.layout().move_many(self._caches(), src, dst)

    def _compact(self, task: ScoringTask, deferred: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Select and plan one request's eviction, null its hole blocks in the worker's tables
        and queue its report.  Returns the (source, destination) slots still to be copied, in
        every layer, before this step's forward (the caller batches the copies)."""
        st, cfg, T = task.state, task.state.cfg, task.end
        bs = self.block_size
        visual = np.zeros(T, dtype=bool)
        n = min(T, len(st.visual_mask))
        visual[:n] = st.visual_mask[:n]
        protected = np.zeros(T, dtype=bool)
        protected[: min(cfg.sink_tokens, T)] = True
        if cfg.recent_tokens:
            protected[max(0, T - cfg.recent_tokens) :] = True
        protected[: st.protected_prefix] = True
        if st.saved_queries:
            self._score_saved(st, T, task.block_ids)
        stats = AttentionStats({k: a.stats(T) for k, a in st.accs.items()})
        sel = st.policy.select(stats, torch.from_numpy(visual), torch.from_numpy(protected), cfg)
        plan = plan_compaction(sel.victims.numpy(), T, bs)
        st.plan = plan
        if cfg.decode_enabled:
            st.decode = DecodeState.after_prefill(plan, T, bs, self.decode_bank)
            st.decode.by_position = st.policy.decode_by_position
        if plan.is_empty:
            return None
        src = self._slots(task.block_ids, plan.move_src)
        dst = self._slots(task.block_ids, plan.move_dst)
        # Null the holes in the worker's tables: the cached request state (used when the
        # request re-enters the persistent batch) and the persistent batch row itself.
        req = self.runner.requests[st.req_id]
        table = self.runner.input_batch.block_table[0]
        row = self.runner.input_batch.req_id_to_index[st.req_id]
        for h in plan.hole_blocks:
            req.block_ids[0][h] = 0
            table.block_table.np[row, h] = 0
        self._holes[st.req_id] = len(plan.hole_blocks)
        self.num_requests_with_holes += 1
        self._holes_version += 1
        num_visual = int(visual[np.asarray(plan.victims, dtype=np.int64)].sum())
        self.reports[st.req_id] = EvictionReport(
            hole_blocks=plan.hole_blocks,
            num_visual=num_visual,
            num_text=plan.num_evicted - num_visual,
            num_prompt_tokens=T,
        )
        if self.cfg.trace_path:
            self._trace(st, plan, T, num_visual, sel.diagnostics, deferred)
        return src, dst

    def _trace(self, st: RequestState, plan: EvictionPlan, T: int, num_visual: int, diagnostics: dict,
               deferred: bool) -> None:
        rec = {
            "request_id": st.req_id,
            "kind": "prefill",
            "method": st.cfg.method,
            "tp_rank": self._tp_rank,
            "diagnostics": diagnostics,
            "num_tokens": T,
            "evicted_positions": list(plan.victims),
            "hole_blocks": list(plan.hole_blocks),
            "num_visual_evicted": num_visual,
            "num_text_evicted": plan.num_evicted - num_visual,
            "num_visual_tokens": int(st.visual_mask.sum()),
            "config": st.cfg.to_dict(),
            # True: compacted at the start of the first decode step; False: in the prefill step
            # (the scheduler reported memory pressure).
            "at_first_decode_step": deferred,
            # Which implementation of the scoring and compaction kernels ran.
            "kernels": "triton" if use_triton(self._layer(self.scoring_layer).kv_cache) else "torch",
        }
        with self._trace_lock, open(self.cfg.trace_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def _caches(self) -> list[torch.Tensor]:
        """Every attention layer's KV cache tensor, once each (one plan, all layers)."""
        seen: set[int] = set()
        caches = []
        for name in self._attention_layers():
            kv = self._layer(name).kv_cache
            if kv.data_ptr() not in seen:
                seen.add(kv.data_ptr())
                caches.append(kv)
        return caches

    def _decode_step(self, dt: DecodeTask) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Budget enforcement, bin overflow and restore proposals after a decode step.
        Returns the slot swaps that park victims (the caller makes them for all requests at
        once, before the next forward); the bookkeeping here already assumes them."""
        st, cfg, bs = dt.state, dt.state.cfg, self.block_size
        ds = st.decode
        ds.steps += 1
        num_live = dt.num_live if dt.num_live is not None else len(ds.live_slots(dt.block_ids, bs))
        # Only a request a whole block over its budget has anything to park.
        over = num_live - decode_limit(cfg, dt.end) >= bs
        rescore = not ds.by_position and ds.steps % cfg.rescore_interval == 0
        if not over and not (rescore and ds.bin) and len(ds.bin) <= cfg.bin_capacity:
            return None  # most requests, most steps: nothing to park, release or restore
        acts = DecodeActions()
        swap = None
        plan = choose_parking(ds, cfg, dt.block_ids, dt.end, bs, st.protected_prefix) if over else None
        if plan is not None:
            swap = self._slots(dt.block_ids, plan.move_src), self._slots(dt.block_ids, plan.move_dst)
            a, b = list(plan.move_src), list(plan.move_dst)
            ds.slot_pos[a], ds.slot_pos[b] = ds.slot_pos[b].copy(), ds.slot_pos[a].copy()
            req = self.runner.requests[st.req_id]
            row = self.runner.input_batch.req_id_to_index[st.req_id]
            table_np = self.runner.input_batch.block_table[0].block_table.np
            for h in plan.hole_blocks:
                bid = int(dt.block_ids[h])
                positions = ds.slot_pos[h * bs : (h + 1) * bs].copy()
                ds.bin[bid] = BinEntry(bid, h, positions)
                ds.slot_pos[h * bs : (h + 1) * bs] = -1
                req.block_ids[0][h] = 0
                table_np[row, h] = 0
                acts.parked.append((h, bid))
                acts.parked_positions.extend(int(p) for p in positions)
            if st.req_id not in self._holes:
                self._holes[st.req_id] = 0
                self.num_requests_with_holes += 1
            self._holes[st.req_id] += len(plan.hole_blocks)
            self._holes_version += 1
            self._trace_event(st, "park", dt.end, acts.parked_positions, len(acts.parked))
        # Final release when the bin is over capacity: lowest value first.
        while len(ds.bin) > cfg.bin_capacity:
            victim = min((e for e in ds.bin.values() if e.block_id not in ds.pending_restore),
                         key=ds.value, default=None)
            if victim is None:
                break
            del ds.bin[victim.block_id]
            ds.unscore(victim.positions)
            acts.released.append(victim.block_id)
        # Restore: every rescore_interval steps, the best binned block against the weakest live.
        if rescore and ds.bin:  # the bin as this step's parks and releases left it
            best = max((e for e in ds.bin.values() if e.block_id not in ds.pending_restore),
                       key=ds.value, default=None)
            weakest = weakest_live_value(ds, cfg, dt.block_ids, dt.end, bs, st.protected_prefix)
            if best is not None and weakest is not None and ds.value(best) > cfg.restore_margin * weakest:
                ds.pending_restore.add(best.block_id)
                acts.restore.append((best.index, best.block_id))
        if acts.parked or acts.released or acts.restore:
            self.reports[st.req_id] = EvictionReport(
                parked=tuple(acts.parked), released=tuple(acts.released), restore=tuple(acts.restore)
            )
        return swap

    def _trace_event(self, st: RequestState, kind: str, num_tokens: int, positions: list[int], blocks: int) -> None:
        if not self.cfg.trace_path:
            return
        rec = {"request_id": st.req_id, "kind": kind, "num_tokens": int(num_tokens),
               "positions": [int(p) for p in positions], "blocks": int(blocks), "tp_rank": self._tp_rank}
        with self._trace_lock, open(self.cfg.trace_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    def take_reports(self) -> dict[str, EvictionReport]:
        reports, self.reports = self.reports, {}
        return reports


def _ranges(firsts: list[int], counts: list[int]) -> np.ndarray:
    """Concatenated ``arange(first, first + count)`` for every pair."""
    counts_a = np.asarray(counts, dtype=np.int64)
    if bool((counts_a == 1).all()):
        return np.asarray(firsts, dtype=np.int64)
    return np.concatenate([np.arange(f, f + c) for f, c in zip(firsts, counts)])


def _rows(t: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    """``t[index]`` (numpy indexing on the host: cheaper per call than torch's)."""
    if t.device.type == "cpu" and t.dtype != torch.bfloat16:
        return torch.from_numpy(t.numpy()[index])
    return t[torch.as_tensor(index, device=t.device)]


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


_CURRENT: EvictionRuntime | None = None


def runtime_for(runner) -> EvictionRuntime | None:
    """The runtime of a model runner, created on first use; None when eviction is off."""
    global _CURRENT
    rt = getattr(runner, "_hae_runtime", False)
    if rt is False:
        cfg = engine_config_from_additional(runner.vllm_config.additional_config)
        rt = EvictionRuntime(runner, cfg) if cfg.enabled else None
        runner._hae_runtime = rt
        if rt is not None:
            _CURRENT = rt
    return rt


def current_runtime() -> EvictionRuntime | None:
    """The runtime of this process's model runner (attention backends have no runner handle)."""
    return _CURRENT
