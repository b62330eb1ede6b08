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

Holes (:mod:`hae_vllm.worker.holes`) and reports/trace (:mod:`hae_vllm.worker.trace`) have
their own modules.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING

import numpy as np
import torch

from hae_vllm.config import EvictionConfig, engine_config_from_additional
from hae_vllm.kv_format import KVFormat
from hae_vllm.layout import SlotLayout
from hae_vllm.worker.decode import DecodeBank
from hae_vllm.worker.decode_stage import DecodeStage
from hae_vllm.worker.holes import HoleTable
from hae_vllm.worker.prefill import PrefillStage
from hae_vllm.worker.state import DecodeTask, RequestState, ScoringTask
from hae_vllm.worker.trace import BIN_UPDATES_ATTR, PRESSURE_ATTR, SESSION_ATTR, EvictionReport, TraceWriter

if TYPE_CHECKING:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

logger = logging.getLogger("vllm.hae_vllm")  # under vLLM's logger: its handlers and level apply

# Layer queries a request may keep for scoring at selection time (off the first token's path);
# a request whose scoring queries would take more is scored in the forward, chunk by chunk.
_DEFER_BYTES = 64 << 20


class EvictionRuntime:
    def __init__(self, runner: "GPUModelRunner", cfg: EvictionConfig):
        self.runner = runner
        self.cfg = cfg
        self.states: dict[str, RequestState] = {}
        self.tasks: list[ScoringTask] = []
        self.decode_tasks: list[DecodeTask] = []
        self._pressure = True
        # Requests with no per-step work: no eviction, or prefill eviction decided and no
        # decode eviction (skipped first thing in the per-step loop).
        self.skip: set[str] = set()
        self.reports: dict[str, EvictionReport] = {}
        self.holes = HoleTable(check=os.environ.get("HAE_VLLM_CHECK_HOLES", "") == "1")
        # Decode state of all requests, a row each (see DecodeBank).
        self.decode_bank = DecodeBank(getattr(runner, "max_model_len", None))
        # 0 scores every request in the forward (tests compare the two paths).
        self.defer_bytes = int(os.environ.get("HAE_VLLM_DEFER_SCORING_BYTES", _DEFER_BYTES))
        self._layout: SlotLayout | None = None
        self._scoring_layer: str | None = None
        self._layer_names: list[str] | None = None
        self._ordinal: dict[str, int] = {}
        self._scoring_ordinals: set[int] = set()
        # This step's decode append when it is all the scoring layer has to do (see
        # DecodeStage.append_plan); None otherwise.
        self.decode_append: tuple | None = None
        self._plain_keys: bool | None = None  # keys are stored as computed (no fp8 rounding)
        self.tp_group = None
        self.tp_size = 1
        tp_rank = 0
        try:
            from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size, get_tp_group

            self.tp_size = get_tensor_model_parallel_world_size()
            if self.tp_size > 1:
                self.tp_group = get_tp_group()
            tp_rank = get_tensor_model_parallel_rank()
        except Exception:  # not initialised (unit tests)
            pass
        self.trace = TraceWriter(cfg.trace_path, tp_rank)
        self.prefill = PrefillStage(self)
        self.decode = DecodeStage(self, check=os.environ.get("HAE_VLLM_CHECK_DECODE", "") == "1")

    # ------------------------------------------------------------------ shared helpers
    @property
    def block_size(self) -> int:
        return self.runner.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size

    def attention_layers(self) -> list[str]:
        """Names of the attention layers, in decoder order (ordinal 0 scores)."""
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
        self.attention_layers()
        assert self._scoring_layer is not None
        return self._scoring_layer

    def layer(self, name: str):
        return self.runner.compilation_config.static_forward_context[name]

    def layout(self) -> SlotLayout:
        if self._layout is None:
            layer = self.layer(self.scoring_layer)
            kv = layer.kv_cache
            spec = self.runner.kv_cache_config.kv_cache_groups[0].kv_cache_spec
            impl = layer.impl

            def write(k, v, cache, slots):
                impl.do_kv_cache_update(layer, k, v, cache, slots)

            fmt = KVFormat.of_layers(impl, [self.layer(n) for n in self.attention_layers()], self.runner.dtype)
            self._layout = SlotLayout.probe(
                write,
                tuple(kv.shape),
                kv.dtype,
                self.runner.kv_cache_config.num_blocks,
                spec.block_size,
                spec.num_kv_heads,
                spec.head_size,
                device=kv.device,
                kv_format=fmt,
                write_scales=fmt.scales_of(kv),
            )
        return self._layout

    def caches(self) -> list[torch.Tensor]:
        """Every attention layer's KV cache tensor, once each (one plan, all layers)."""
        seen: set[int] = set()
        caches = []
        for name in self.attention_layers():
            kv = self.layer(name).kv_cache
            if kv.data_ptr() not in seen:
                seen.add(kv.data_ptr())
                caches.append(kv)
        return caches

    def slots(self, block_ids: list[int], positions) -> torch.Tensor:
        """Physical slots of logical ``positions`` (any int sequence) of a request; int64, CPU."""
        bs = self.block_size
        pos = np.asarray(positions, dtype=np.int64)
        table = np.asarray(block_ids, dtype=np.int64)
        return torch.from_numpy(table[pos // bs] * bs + pos % bs)

    # ------------------------------------------------------------------ what the backends ask
    def has_holes(self) -> bool:
        return self.holes.any()

    def drop_holes(self, block_table: torch.Tensor, seq_lens: torch.Tensor, block_size: int,
                   num_reqs: int | None = None):
        """:func:`~hae_vllm.worker.holes.drop_hole_blocks` for this step's batch (rows in
        ``input_batch`` order, the first ``num_reqs``), cached across steps
        (:meth:`~hae_vllm.worker.holes.HoleTable.drop`)."""
        return self.holes.drop(block_table, seq_lens, block_size, self.runner.input_batch.req_ids, num_reqs)

    def _keys_as_computed(self) -> bool:
        """The cache stores keys as the layer computed them (no fp8 rounding to mirror)."""
        if self._plain_keys is None:
            self._plain_keys = not self.layout().kv_format.quantized
        return self._plain_keys

    def wants_scoring(self, layer_name: str) -> bool:
        if not self._scoring_ordinals:
            return False
        return self._ordinal.get(layer_name, -1) in self._scoring_ordinals

    # ------------------------------------------------------------------ 1. step start
    def _drop(self, req_id: str) -> None:
        st = self.states.pop(req_id, None)
        if st is not None and st.decode is not None:
            self.decode_bank.release(st.decode.row)
            st.decode = None
        self.skip.discard(req_id)
        self.holes.forget(req_id)

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
        self.decode.apply_bin_updates(getattr(scheduler_output, BIN_UPDATES_ATTR, None))
        self._pressure = getattr(scheduler_output, PRESSURE_ATTR, True)
        self.prefill.run_pending(scheduler_output.num_scheduled_tokens)
        if not scheduler_output.num_scheduled_tokens:
            return
        self.attention_layers()
        runner = self.runner
        index = runner.input_batch.req_id_to_index
        skip = self.skip
        bs = self.block_size
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
                if (req_id in self.holes and req_id not in (started or ())) or req.num_computed_tokens >= req.num_tokens:
                    continue
                st = self.prefill.start(req)
                if st is None:
                    skip.add(req_id)
                    continue
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
                if unit and self._keys_as_computed():
                    self.decode_append = self.decode.append_plan(self.decode_tasks)
        if self.tasks:
            num_layers = len(self.attention_layers())
            for task in self.tasks:
                sc = task.state.scoring
                if sc is not None:
                    self._scoring_ordinals.update(range(num_layers) if sc.layers is None else sc.layers)

    def _start_sessions(self, started: dict) -> None:
        """Requests served a conversation hit (hae_vllm.engine.sessions): their tables hold
        null placeholders where the earlier request had holes."""
        for req_id, (source, num_tokens) in started.items():
            req = self.runner.requests.get(req_id)
            if req is None:
                continue
            num_holes = sum(1 for b in req.block_ids[0][: num_tokens // self.block_size] if b == 0)
            if num_holes:
                self.holes.add(req_id, num_holes)
            if self.trace:
                self.trace.session(req_id, source, num_tokens, req.num_tokens)

    # ------------------------------------------------------------------ 2. scoring layers
    def score(self, impl, layer_name: str, query: torch.Tensor, key: torch.Tensor, kv_cache: torch.Tensor,
              query_start_loc: torch.Tensor) -> None:
        """Called by a scoring layer's attention after it wrote this step's KV.

        query: [num_tokens, num_heads, head_dim], key: [num_tokens, num_kv_heads, head_dim] of
        the layer (post-RoPE); kv_cache: the layer's cache."""
        ordinal = self._ordinal[layer_name]
        layout = self.layout()
        qsl = query_start_loc.tolist()
        if ordinal == 0 and self.decode_tasks:
            self.decode.score(self.decode_tasks, impl, query, key, kv_cache, qsl, layout)
        if self.tasks:
            self.prefill.score(impl, ordinal, query, key, kv_cache, qsl, layout)

    # ------------------------------------------------------------------ 3. after forward
    def after_forward(self) -> None:
        self.decode_append = None  # this step's plan only (no dummy run may take it)
        dtasks, self.decode_tasks = self.decode_tasks, []
        # A request compacted at the start of this step (its first decode step) may also park
        # now: both reports reach the scheduler, in one.
        early, self.reports = self.reports, {}
        self.decode.end_of_step(dtasks)
        for req_id, rep in early.items():
            later = self.reports.get(req_id)
            self.reports[req_id] = rep if later is None else dataclasses.replace(
                later, hole_blocks=rep.hole_blocks, num_visual=rep.num_visual, num_text=rep.num_text,
                num_prompt_tokens=rep.num_prompt_tokens)
        tasks, self.tasks = self.tasks, []
        self.prefill.end_of_step(tasks, self._pressure)

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
