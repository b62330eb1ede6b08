"""Prefill eviction, worker side: scoring at the scoring layers, selection, compaction.

A request that may evict gets a :class:`~hae_vllm.worker.state.RequestState` when its prefill
starts (:meth:`PrefillStage.start`).  While it prefills, the attention implementation of each
layer its policy scores at calls :meth:`PrefillStage.score`, which keeps a copy of the scoring
queries (most requests: statistics are computed at selection, off the first token's path) or
accumulates the statistics chunk by chunk.  Once its last prefill chunk has run, the request is
selected and compacted (:meth:`PrefillStage.compact`): victims are gathered into whole blocks in
every layer, those blocks become null holes in the worker's tables, and a report tells the
scheduler to free them.  When depends on memory pressure (see :meth:`PrefillStage.end_of_step`).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from hae_vllm.config import EvictionConfigError, request_config
from hae_vllm.kernels.scoring import (attention_stats, column_mass, column_mass_available, dense_attention_stats,
                                      gather_plane_keys, use_triton)
from hae_vllm.plan import plan_compaction
from hae_vllm.policies.attention import LayerAccumulator
from hae_vllm.policies.base import AttentionStats, ScoringRequest
from hae_vllm.policies.registry import get_policy
from hae_vllm.prefix import has_candidates_after, untouched_prefix_tokens, visual_mask_from_features
from hae_vllm.worker.decode_bank import DecodeBank, DecodeState
from hae_vllm.worker.runner_view import RunnerView
from hae_vllm.worker.state import RequestState, ScoringTask
from hae_vllm.protocol import EvictionReport
from hae_vllm.worker.trace import TraceWriter

logger = logging.getLogger("vllm.hae_vllm")  # under vLLM's logger: its handlers and level apply

# Queries scored at once: bounds the [queries, T] rows a call returns (and the Triton kernel's
# [heads, queries, T] partial rows) to a fixed number of queries, so scoring memory grows
# linearly with the prompt however many queries a method scores.  The host's calls take
# fewer (its keys are gathered once per call, a copy linear in the prompt, cheap on the host).
_QUERY_CHUNK = 64
_HOST_QUERY_CHUNK = 16
# Queries per call of the host's column sums (:func:`column_mass`, a run of consecutive
# positions): its memory is linear in the keys whatever the run's length.
_RUN_CHUNK = 4096


def _query_chunks(sel: np.ndarray, runs: bool, limit: int) -> list[np.ndarray]:
    """The scoring positions ``sel`` in the pieces one call scores: at most ``limit`` queries,
    or (``runs``) runs of consecutive positions of at most :data:`_RUN_CHUNK`."""
    if not runs:
        return [sel[c : c + limit] for c in range(0, len(sel), limit)]
    pieces = []
    for run in np.split(sel, np.flatnonzero(np.diff(sel) != 1) + 1):
        pieces.extend(run[c : c + _RUN_CHUNK] for c in range(0, len(run), _RUN_CHUNK))
    return pieces


class PrefillStage:
    """Takes the step's scoring tasks and returns its decisions (reports for the scheduler,
    requests with no more per-step work); edits the runner's tables only through ``view``.

    ``defer_bytes``: layer queries a request may keep to be scored at selection, off the first
    token's path; a request whose scoring queries would take more is scored in the forward,
    chunk by chunk (0: every request in the forward; the tests compare the two paths)."""

    def __init__(self, view: RunnerView, bank: DecodeBank, trace: TraceWriter, defer_bytes: int) -> None:
        self.view = view
        self.bank = bank
        self.trace = trace
        self.defer_bytes = defer_bytes
        # Requests whose prefill finished last step: selected and compacted at the start of
        # their first decode step, so the first token does not wait for it - unless the
        # scheduler reported memory pressure, when blocks are freed at the end of the step.
        self.pending: list[ScoringTask] = []

    # ------------------------------------------------------------------ request start
    def start(self, req, engine_cfg) -> RequestState | None:
        """The request's eviction state, or None when it does not evict (no knobs for it, no
        visual tokens and no decode stage, or a config refused here)."""
        view = self.view
        sp = req.sampling_params
        if sp is None:
            return None
        try:
            cfg = request_config(engine_cfg, sp.extra_args)
        except EvictionConfigError as e:  # validated in the API process; never corrupt
            logger.warning("request %s: eviction disabled: %s", req.req_id, e)
            return None
        if not cfg.enabled:
            return None
        mask = visual_mask_from_features(req.mm_features, req.num_tokens)
        if not mask.any() and not cfg.decode_enabled:
            return None
        # Prefix-cache hits are shared blocks; blocks before the first eviction candidate
        # are registered in the prefix cache by the scheduler: neither is ever rewritten.  A
        # conversation hit (hae_vllm.engine.sessions) counts as a prefix-cache hit.
        bs = view.block_size
        protected = max((req.num_computed_tokens // bs) * bs, untouched_prefix_tokens(cfg, mask, bs))
        if not has_candidates_after(cfg, mask, protected):
            return None  # every candidate is in the hit: nothing to decide (the scheduler agrees)
        policy = get_policy(cfg.method)
        scoring = policy.scoring(req.num_tokens, mask, cfg) if policy.uses_attention else None
        num_layers = len(view.attention_layers())
        if scoring is not None and scoring.layers is not None and max(scoring.layers) >= num_layers:
            logger.warning("request %s: %s scores layer %s but the model has %d; using the last layer",
                           req.req_id, cfg.method, max(scoring.layers), num_layers)
            scoring = dataclasses.replace(scoring, layers=tuple(min(l, num_layers - 1) for l in scoring.layers))
        return RequestState(
            req_id=req.req_id,
            cfg=cfg,
            policy=policy,
            scoring=scoring,
            visual_mask=mask,
            protected_prefix=protected,
        )

    # ------------------------------------------------------------------ scoring layers
    def score(self, tasks: list[ScoringTask], impl, ordinal: int, query: torch.Tensor, key: torch.Tensor,
              kv_cache: torch.Tensor, qsl: list[int], layout) -> None:
        """Accumulate the attention statistics ``tasks`` asked for at this layer, or keep a copy
        of the scoring queries to do it at selection (most requests: see ``defer_bytes``).

        query: [num_tokens, num_heads, head_dim], key: [num_tokens, num_kv_heads, head_dim] of
        the layer (post-RoPE); kv_cache: the layer's cache, already holding this step's keys.
        """
        view = self.view
        num_heads_total = impl.num_heads * view.tp_size
        # Scoring reads the keys from the paged cache.  It runs at selection, off the first
        # token's path, for requests whose queries are cheap to keep.
        plane = layout.key_plane(kv_cache)
        num_layers = len(view.attention_layers())
        for task in tasks:
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
                # Sums alone (no max over queries): on the host, from whole runs of queries.
                columns = (not st.scoring.needs_max and column_mass_available(query)
                           and not use_triton(query))
                acc = st.accs[ordinal] = LayerAccumulator(len(qmask), num_heads_total, per_head,
                                                          keep_max=not columns)
            if not len(sel):
                # No scoring query in this chunk (e.g. an image-only chunk).  Every TP rank
                # sees the same tasks, so all of them skip the collective together.
                continue
            if st.defer_scoring is None:
                n_layers = num_layers if st.scoring.layers is None else len(st.scoring.layers)
                st.defer_scoring = (int(qmask.sum()) * n_layers * query.shape[1] * query.shape[2]
                                    * query.element_size() <= self.defer_bytes)
            keys = None
            if plane is None and not st.defer_scoring:  # not affine: keys through the offset table
                keys = self._keys(task, key, q0, kv_cache, layout)
            limit = _QUERY_CHUNK if use_triton(query) else _HOST_QUERY_CHUNK
            for chunk in _query_chunks(sel, acc.m is None, limit):
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
                    self.accumulate(acc, q, qpos, task.end, task.block_ids, kv_cache, impl.scale, per_head, keys)

    def _keys(self, task, key: torch.Tensor, q0: int, kv_cache, layout) -> torch.Tensor:
        """Keys of positions 0..end-1 (after :func:`live_key_view`'s shift when the table has
        holes): this chunk's straight from the layer input, earlier chunks' gathered from the
        paged cache.  [T, num_kv_heads, head_dim]."""
        n = task.end - task.start
        current = key[q0 : q0 + n].view(n, -1, key.shape[-1]) if key.dim() == 3 else key[q0 : q0 + n]
        if task.start == 0:
            return current
        live = live_key_view(task.block_ids, task.end, self.view.block_size)
        table = task.block_ids if live is None else live.table
        past = layout.gather_keys(kv_cache, self.view.slots(table, np.arange(task.start - (live.shift if live else 0))))
        return torch.cat([past.to(current.dtype), current], dim=0)

    def accumulate(self, acc: LayerAccumulator, q: torch.Tensor, qpos: torch.Tensor, T: int, block_ids,
                   kv_cache: torch.Tensor, scale: float, per_head: bool, keys: torch.Tensor | None = None) -> None:
        """Attention statistics of queries ``q`` (positions ``qpos``) over the request's keys
        ``0..T-1``, read in place from the paged cache (the scoring kernel on CUDA, its torch
        reference on the CPU), or from ``keys`` / gathered keys for a layout with no
        ``[blocks, slots, H, D]`` key view; gathered across TP ranks, added to ``acc``."""
        view = self.view
        layout = view.layout()
        plane = layout.key_plane(kv_cache)
        live = live_key_view(block_ids, T, view.block_size)
        if live is not None:  # a conversation hit with holes: score over the live keys
            block_ids, T, qpos = live.table, T - live.shift, qpos - live.shift
        if acc.m is None:  # sums only, over a run of consecutive positions
            q0, seen = int(qpos[0]), int(qpos[-1]) + 1
            assert seen - q0 == len(qpos), "column sums need a run of consecutive query positions"
            if keys is None:
                if plane is not None:
                    table = torch.as_tensor(block_ids[: -(-seen // view.block_size)], dtype=torch.int64)
                    keys = gather_plane_keys(plane, table, seen)
                else:
                    keys = layout.gather_keys(kv_cache, view.slots(block_ids, np.arange(seen)))
            rows, head_sum = None, torch.nn.functional.pad(column_mass(q, keys, q0, scale), (0, T - seen))
        elif plane is not None:
            table = torch.as_tensor(block_ids[: -(-T // view.block_size)], dtype=torch.int64)
            rows, head_sum = attention_stats(q, plane, table, qpos, T, scale, per_head)
        else:
            if keys is None:
                keys = layout.gather_keys(kv_cache, view.slots(block_ids, np.arange(T)))
            rows, head_sum = dense_attention_stats(q, keys, qpos, scale, per_head)
        if live is not None:
            rows = None if rows is None else live.expand(rows)
            head_sum = None if head_sum is None else live.expand(head_sum)
            qpos = qpos + live.shift
        if rows is None:
            if view.tp_group is not None:  # every rank gets every head, in rank order
                head_sum = view.tp_group.all_gather(head_sum.to(q.device).contiguous(), dim=0)
            acc.add_columns(head_sum.cpu(), qpos)
            return
        if view.tp_group is not None:
            # Gathered, then summed in rank order on every rank: all ranks get the same bits
            # (an all-reduce need not), so they select the same victims.
            rows = view.tp_group.all_gather(rows.to(q.device)[None].contiguous(), dim=0).sum(0)
            if head_sum is not None:
                head_sum = view.tp_group.all_gather(head_sum.to(q.device).contiguous(), dim=0)
        acc.add_rows(rows.cpu(), None if head_sum is None else head_sum.cpu(), qpos)

    def score_saved(self, st: RequestState, T: int, block_ids) -> None:
        """Deferred scoring, at selection: every saved query chunk against the keys still in
        the cache, in the order the forward saw them (on every TP rank alike)."""
        saved, st.saved_queries = st.saved_queries, []
        names = self.view.attention_layers()
        for ordinal, q, qpos in saved:
            layer = self.view.layer(names[ordinal])
            self.accumulate(st.accs[ordinal], q, qpos, T, block_ids, layer.kv_cache, layer.impl.scale,
                            st.scoring.per_head)

    def keeps_session(self, cfg) -> bool:
        """Whether a request may leave its cache to a follow-up request (the scheduler keeps
        sessions under the same conditions)."""
        return self.view.prefix_caching and cfg.session_reuse and not cfg.decode_enabled

    # ------------------------------------------------------------------ selection, compaction
    def end_of_step(self, tasks: list[ScoringTask], pressure: bool) -> tuple[dict[str, EvictionReport], list[str]]:
        """After the forward: requests whose last prefill chunk ran are decided; under memory
        pressure they are compacted now (blocks free before the next ``schedule()``), else at
        the start of their first decode step (:meth:`run_pending`).  Returns the reports of
        the requests compacted now and the requests left with no per-step work (decided, no
        decode stage)."""
        done = [t for t in tasks if t.is_last_chunk]
        settled = []
        for task in done:
            task.state.decided = True
            if not task.state.cfg.decode_enabled:
                settled.append(task.state.req_id)
        if pressure:
            return self.compact_all(done, deferred=False), settled
        self.pending.extend(done)
        return {}, settled

    def run_pending(self, scheduled: dict[str, int], states: dict[str, RequestState]) -> dict[str, EvictionReport]:
        """Select and compact the requests whose prefill ended last step, before this step's
        forward reads their cache.  This keeps selection and the copies off the first token's
        path (its logits come from the prefill, before any eviction).

        Only requests scheduled in this step are compacted: one that finished, or was preempted
        (its blocks freed, maybe handed to another request already), is not, and one that was
        not scheduled for any other reason keeps its full cache.  Returns their reports."""
        if not scheduled or not self.pending:
            return {}
        pending, self.pending = self.pending, []
        return self.compact_all([t for t in pending
                                 if t.state.req_id in scheduled and states.get(t.state.req_id) is t.state],
                                deferred=True)

    def compact_all(self, tasks: list[ScoringTask], deferred: bool) -> dict[str, EvictionReport]:
        reports, moves = {}, []
        for task in tasks:
            move, reports[task.state.req_id] = self.compact(task, deferred)
            if move is not None:
                moves.append(move)
        if moves:
            # One copy per layer for all these requests (their slots are disjoint: each
            # request owns its blocks).
            src = torch.cat([m[0] for m in moves])
            dst = torch.cat([m[1] for m in moves])
            self.view.layout().move_many(self.view.caches(), src, dst)
        return reports

    def compact(self, task: ScoringTask, deferred: bool) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, EvictionReport]:
        """Select and plan one request's eviction and null its hole blocks in the worker's
        tables.  Returns the (source, destination) slots still to be copied, in every layer,
        before this step's forward (the caller batches the copies; None: nothing moves), and
        the request's report to the scheduler."""
        view = self.view
        st, cfg, T = task.state, task.state.cfg, task.end
        bs = view.block_size
        visual = np.zeros(T, dtype=bool)
        n = min(T, len(st.visual_mask))
        visual[:n] = st.visual_mask[:n]
        protected = np.zeros(T, dtype=bool)
        protected[: min(cfg.sink_tokens, T)] = True
        if cfg.recent_tokens:
            protected[max(0, T - cfg.recent_tokens) :] = True
        protected[: st.protected_prefix] = True
        if self.keeps_session(cfg):
            # The prompt's last, partly filled block stays as it is (never swapped with earlier
            # blocks), so the blocks before it hold exactly the tokens of their positions that
            # survive: a follow-up turn can continue from them even when the answer it re-sends
            # does not re-tokenize into the generated tokens (hae_vllm.engine.sessions).
            protected[(T // bs) * bs :] = True
        if st.saved_queries:
            self.score_saved(st, T, task.block_ids)
        stats = AttentionStats({k: a.stats(T) for k, a in st.accs.items()})
        sel = st.policy.select(stats, torch.from_numpy(visual), torch.from_numpy(protected), cfg)
        plan = plan_compaction(sel.victims.numpy(), T, bs)
        st.plan = plan
        if cfg.decode_enabled:
            st.decode = DecodeState.after_prefill(plan, T, bs, self.bank)
            st.decode.by_position = st.policy.decode_by_position
        if plan.is_empty:
            # Reported all the same: the scheduler learns the request's eviction is final.
            return None, EvictionReport(num_prompt_tokens=T)
        src = view.slots(task.block_ids, plan.move_src)
        dst = view.slots(task.block_ids, plan.move_dst)
        view.null_blocks(st.req_id, plan.hole_blocks)
        num_visual = int(visual[np.asarray(plan.victims, dtype=np.int64)].sum())
        report = EvictionReport(
            hole_blocks=plan.hole_blocks,
            num_visual=num_visual,
            num_text=plan.num_evicted - num_visual,
            num_prompt_tokens=T,
        )
        if self.trace:
            kernels = "triton" if use_triton(view.layer(view.scoring_layer).kv_cache) else "torch"
            self.trace.prefill(st, plan, T, num_visual, sel.diagnostics, deferred, kernels)
        return (src, dst), report


class LiveKeyView:
    """How a request whose table holds null holes from a conversation hit is scored.

    The holes (and the hit's compacted blocks) all lie before the request's own tokens, which
    are the only candidates (the hit is protected).  Keys are read through the table without
    its holes, so key index ``i`` is position ``i + shift`` from ``boundary`` on (the end of
    the last hole); the attention the queries pay to the hit's keys before ``boundary`` counts
    in the softmax but is not attributed to a position (those tokens are never candidates)."""

    def __init__(self, table: list[int], shift: int, boundary: int, num_tokens: int):
        self.table, self.shift, self.boundary, self.num_tokens = table, shift, boundary, num_tokens

    def expand(self, cols: torch.Tensor) -> torch.Tensor:
        """[..., T - shift] statistics -> [..., T] by position (zero before ``boundary``)."""
        out = cols.new_zeros(*cols.shape[:-1], self.num_tokens)
        out[..., self.boundary:] = cols[..., self.boundary - self.shift:]
        return out


def live_key_view(block_ids, T: int, block_size: int) -> LiveKeyView | None:
    """A :class:`LiveKeyView` of the first ``T`` positions, or None when they hold no hole."""
    n = -(-T // block_size)
    table = list(block_ids[:n])
    holes = [i for i, b in enumerate(table) if b == 0]
    if not holes:
        return None
    return LiveKeyView([b for b in table if b != 0] + list(block_ids[n:]), len(holes) * block_size,
                       (holes[-1] + 1) * block_size, T)
