"""Worker-side eviction: the runtime the runner hooks and the attention backends call.

One :class:`EvictionRuntime` lives in each worker process (one per model runner).  It holds
what the stages share (request states, the step's tasks, the decode bank, the hole table, the
report and trace channel) and routes the three calls it receives to them:

1. :meth:`EvictionRuntime.on_states_updated` after ``_update_states``: drop finished and
   preempted requests, apply the bin updates the scheduler confirmed, compact requests whose
   prefill ended last step (:class:`~hae_vllm.worker.prefill.PrefillStage`), and build the
   step's tasks: prefill scoring for requests still prefilling, decode scoring for requests
   with a decode budget;
2. :meth:`EvictionRuntime.score` from the attention implementation of a scoring layer, after
   the layer's KV was written: decode scoring at layer 0
   (:class:`~hae_vllm.worker.decode_stage.DecodeStage`), prefill scoring at the layers the
   policies asked for;
3. :meth:`EvictionRuntime.after_forward` once every layer has written its KV: decode budgets
   and parking, then prefill selection and compaction for requests whose last chunk ran.

The stages take explicit inputs and return what they decided (reports to the scheduler,
requests with no more per-step work); the runtime owns the per-request state and the step's
tasks and merges the decisions.  The runner's block tables are edited only by
:class:`~hae_vllm.worker.runner_view.RunnerView`, which also keeps the hole table the
attention backends read.  The backends call three methods and nothing else:
:meth:`EvictionRuntime.strip_holes` (metadata builders), :meth:`EvictionRuntime.after_kv_write`
(attention implementations) and :func:`current_runtime`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import numpy as np
import torch

from hae_vllm import envs
from hae_vllm.config import EvictionConfig, engine_config_from_additional
from hae_vllm.kv_format import dequantized_query
from hae_vllm.worker.decode_bank import DecodeBank
from hae_vllm.worker.decode_stage import DecodeStage
from hae_vllm.worker.holes import metadata_without_holes
from hae_vllm.worker.prefill import PrefillStage
from hae_vllm.worker.runner_view import RunnerView
from hae_vllm.worker.state import DecodeTask, RequestState, ScoringTask
from hae_vllm.protocol import BIN_UPDATES_ATTR, PRESSURE_ATTR, QUERY_STARTS_ATTR, SESSION_ATTR, EvictionReport
from hae_vllm.worker.trace import TraceWriter

if TYPE_CHECKING:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

logger = logging.getLogger("vllm.hae_vllm")  # under vLLM's logger: its handlers and level apply


class EvictionRuntime:
    def __init__(self, runner: "GPUModelRunner", cfg: EvictionConfig):
        self.cfg = cfg
        self.view = RunnerView(runner, check_holes=envs.check_holes())
        self.states: dict[str, RequestState] = {}
        self.tasks: list[ScoringTask] = []
        self.decode_tasks: list[DecodeTask] = []
        self._pressure = True
        # Requests with no per-step work: no eviction, or prefill eviction decided and no
        # decode eviction (skipped first thing in the per-step loop).
        self.skip: set[str] = set()
        self.reports: dict[str, EvictionReport] = {}
        # Decode state of all requests, a row each (see DecodeBank).
        self.decode_bank = DecodeBank(getattr(runner, "max_model_len", None))
        self._scoring_ordinals: set[int] = set()
        # This step's decode append when it is all the scoring layer has to do (see
        # DecodeStage.append_plan); None otherwise.
        self.decode_append = None
        self.trace = TraceWriter(cfg.trace_path, self.view.tp_rank)
        # 0 scores every request in the forward (tests compare the two paths).
        self.prefill = PrefillStage(self.view, self.decode_bank, self.trace, envs.defer_scoring_bytes())
        self.decode = DecodeStage(self.view, self.decode_bank, self.trace, check=envs.check_decode())

    @property
    def runner(self) -> "GPUModelRunner":
        return self.view.runner

    @property
    def holes(self):
        return self.view.holes

    # ------------------------------------------------------------------ what the backends call
    def strip_holes(self, common_attn_metadata, block_size: int):
        """The metadata builders' call: ``CommonAttentionMetadata`` with this process's null
        holes dropped from every block-table row (the same object when there are none)."""
        if not self.view.holes.num_requests:
            return common_attn_metadata
        return metadata_without_holes(common_attn_metadata, self.view.holes, self.view.batch_req_ids, block_size)

    def drop_holes(self, block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                   num_reqs: int | None = None):
        """:func:`~hae_vllm.worker.holes.drop_hole_blocks` for this step's batch (rows in
        ``input_batch`` order, the first ``num_reqs``), cached across steps
        (:meth:`~hae_vllm.worker.holes.HoleTable.drop`)."""
        return self.view.holes.drop(block_table, seq_lens, block_size, self.view.batch_req_ids, num_reqs)

    def after_kv_write(self, impl, layer, query: torch.Tensor, key: torch.Tensor, kv_cache: torch.Tensor,
                       attn_metadata) -> None:
        """The attention implementations' call, once a layer has written this step's KV:
        layer-0 decode scoring and prefill scoring where a request asked for this layer."""
        name = getattr(layer, "layer_name", None)
        # With an fp8 KV cache on CUDA, vLLM hands some backends the query in fp8 (scaled).
        query = dequantized_query(query, layer, key.dtype)
        plan = self.decode_append
        if plan is not None:
            # Most decode steps with score_interval k > 1: this step's layer-0 key and query join
            # the bank, nothing is scored, and no other layer has work.
            if name == plan.layer:
                self.decode.append(plan, query, key)
            return
        if not self.wants_scoring(name):
            return
        qsl = getattr(attn_metadata, QUERY_STARTS_ATTR, None)  # the eviction builders put it there
        if qsl is None:
            qsl = getattr(attn_metadata, "query_start_loc_cpu", None)
        if qsl is None:
            raise RuntimeError(f"{type(attn_metadata).__name__} was not built by an eviction backend's builder "
                               "(no host query starts): scoring cannot split the step's queries")
        # Scoring reads what attention reads: with an fp8 cache, this step's keys as stored
        # (rounded through the format and the layer's scale), like every earlier key it gathers.
        key = self.view.layout().as_stored_keys(key, kv_cache)
        self.score(impl, name, query, key, kv_cache, qsl.cpu())

    def wants_scoring(self, layer_name: str | None) -> bool:
        if not self._scoring_ordinals:
            return False
        return self.view.ordinal(layer_name) in self._scoring_ordinals

    # ------------------------------------------------------------------ 1. step start
    def _drop(self, req_id: str) -> None:
        st = self.states.pop(req_id, None)
        if st is not None and st.decode is not None:
            self.decode_bank.release(st.decode.row)
            st.decode = None
        self.skip.discard(req_id)
        self.view.holes.forget(req_id)

    def on_states_updated(self, scheduler_output) -> None:
        self.tasks = []
        self.decode_tasks = []
        self._scoring_ordinals = set()
        self.decode_append = None
        for req_id in scheduler_output.finished_req_ids:
            self._drop(req_id)
        cached = scheduler_output.scheduled_cached_reqs
        for req_id in getattr(cached, "resumed_req_ids", ()) or ():
            # Preempted: every block was freed; the request recomputes from scratch, or from
            # the session its blocks left (hae_vllm.engine.sessions).
            self._drop(req_id)
        for new in scheduler_output.scheduled_new_reqs:
            self._drop(new.req_id)
        started = getattr(scheduler_output, SESSION_ATTR, None)
        if started:
            self._start_sessions(started)
        self.decode.apply_bin_updates(getattr(scheduler_output, BIN_UPDATES_ATTR, None), self.states)
        self._pressure = getattr(scheduler_output, PRESSURE_ATTR, True)
        self.reports.update(self.prefill.run_pending(scheduler_output.num_scheduled_tokens, self.states))
        if not scheduler_output.num_scheduled_tokens:
            return
        self._build_tasks(scheduler_output, started)

    def _build_tasks(self, scheduler_output, started) -> None:
        """This step's prefill scoring and decode tasks, and the layers they score at."""
        num_layers = len(self.view.attention_layers())
        runner = self.view.runner
        index = runner.input_batch.req_id_to_index
        skip = self.skip
        bs = self.view.block_size
        bank = self.decode_bank
        slot_pos, scored = bank.slot_pos, bank.scored
        multi = []  # (row, first, count) of decode requests running several tokens
        for req_id, n in scheduler_output.num_scheduled_tokens.items():
            if req_id in skip:
                continue
            st = self.states.get(req_id)
            req = runner.requests.get(req_id)
            if req is None:
                continue
            if st is None:
                if (req_id in self.view.holes and req_id not in (started or ())) or req.num_computed_tokens >= req.num_tokens:
                    continue
                st = self.prefill.start(req, self.cfg)
                if st is None:
                    skip.add(req_id)
                    continue
                self.states[req_id] = st
            if st.decided:
                ds = st.decode
                if ds is not None:
                    start = req.num_computed_tokens
                    table = req.block_ids[0]
                    if len(table) * bs > bank.capacity:
                        bank.ensure(len(table) * bs)
                        slot_pos, scored = bank.slot_pos, bank.scored
                    # This step's tokens land in slot == position (vLLM's slot mapping is
                    # logical) and are scored from now on.
                    if n == 1:
                        slot_pos[ds.row, start] = start
                        scored[ds.row, start] = True
                    else:
                        multi.append((ds.row, start, n))
                    self.decode_tasks.append(DecodeTask(st, index[req_id], start, start + n, table))
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
        for row, start, n in multi:
            bank.slot_pos[row, start : start + n] = np.arange(start, start + n)
            bank.scored[row, start : start + n] = True
        if self.decode_tasks:
            self._scoring_ordinals.add(0)
            if not self.tasks and not multi:
                # One token per request in the whole batch: a request's query row is its batch row.
                unit = scheduler_output.total_num_scheduled_tokens == len(scheduler_output.num_scheduled_tokens)
                if unit and self.view.keys_as_computed():
                    self.decode_append = self.decode.append_plan(self.decode_tasks)
        for task in self.tasks:
            sc = task.state.scoring
            if sc is not None:
                self._scoring_ordinals.update(range(num_layers) if sc.layers is None else sc.layers)

    def _start_sessions(self, started: dict) -> None:
        """Requests served a conversation hit (hae_vllm.engine.sessions): their tables hold
        null placeholders where the earlier request had holes."""
        for req_id, (source, num_tokens) in started.items():
            req = self.view.runner.requests.get(req_id)
            if req is None:
                continue
            self.view.note_session(req_id, num_tokens)
            if self.trace:
                self.trace.session(req_id, source, num_tokens, req.num_tokens)

    # ------------------------------------------------------------------ 2. scoring layers
    def score(self, impl, layer_name: str, query: torch.Tensor, key: torch.Tensor, kv_cache: torch.Tensor,
              query_start_loc: torch.Tensor) -> None:
        """Scoring at one layer, after it wrote this step's KV.

        query: [num_tokens, num_heads, head_dim], key: [num_tokens, num_kv_heads, head_dim] of
        the layer (post-RoPE); kv_cache: the layer's cache."""
        ordinal = self.view.ordinal(layer_name)
        layout = self.view.layout()
        qsl = query_start_loc.tolist()
        if ordinal == 0 and self.decode_tasks:
            self.decode.score(self.decode_tasks, impl, query, key, kv_cache, qsl, layout)
        if self.tasks:
            self.prefill.score(self.tasks, impl, ordinal, query, key, kv_cache, qsl, layout)

    # ------------------------------------------------------------------ 3. after forward
    def after_forward(self) -> None:
        self.decode_append = None  # this step's plan only (no dummy run may take it)
        dtasks, self.decode_tasks = self.decode_tasks, []
        # A request compacted at the start of this step (its first decode step) may also park
        # now: both reports reach the scheduler, in one.
        early = self.reports
        self.reports = self.decode.end_of_step(dtasks)
        for req_id, rep in early.items():
            later = self.reports.get(req_id)
            self.reports[req_id] = rep if later is None else dataclasses.replace(
                later, hole_blocks=rep.hole_blocks, num_visual=rep.num_visual, num_text=rep.num_text,
                num_prompt_tokens=rep.num_prompt_tokens)
        tasks, self.tasks = self.tasks, []
        reports, settled = self.prefill.end_of_step(tasks, self._pressure)
        self.reports.update(reports)
        self.skip.update(settled)

    def take_reports(self) -> dict[str, EvictionReport]:
        reports, self.reports = self.reports, {}
        return reports


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


def activate(runner) -> EvictionRuntime | None:
    """Make ``runner``'s runtime the one the attention backends call until another runner's
    step (None when its eviction is off).  The model runner's hooks call this at the start of
    every step: a process may hold several engines (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), and
    one's attention must never reach another's runtime."""
    global _CURRENT
    _CURRENT = runtime_for(runner)
    return _CURRENT


def current_runtime() -> EvictionRuntime | None:
    """The runtime of the model runner stepping in this process (attention backends have no
    runner handle): the last one :func:`activate` named, else the last created."""
    return _CURRENT
