"""The scheduler used when eviction is on (set as ``SchedulerConfig.scheduler_cls``).

It differs from vLLM's :class:`Scheduler` only in block accounting: reports of evicted blocks
arriving with the model runner output are applied (blocks freed to the pool) before the
output is processed, so the very next ``schedule()`` can hand those blocks to other requests.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec

from hae_vllm.config import EvictionConfig, EvictionConfigError, engine_config_from_additional, request_config
from hae_vllm.engine.admission import GrowthReserve
from hae_vllm.engine.kv_manager import EvictableFullAttentionManager
from hae_vllm.engine.recycle_bin import RecycleBin
from hae_vllm.engine.kv_events import RouterStream
from hae_vllm.engine.sessions import SessionCache, settings_signature
from hae_vllm.patches.kv_cache_manager import patch_full_attention_manager, patch_get_computed_blocks
from hae_vllm.prefix import has_candidates_after, untouched_prefix_tokens, visual_mask_from_features
from hae_vllm.protocol import BIN_UPDATES_ATTR, PRESSURE_ATTR, REPORT_ATTR, SESSION_ATTR, SessionStart

logger = logging.getLogger("vllm.hae_vllm")  # under vLLM's logger: its handlers and level apply


@dataclass
class RequestRecord:
    """What the scheduler keeps about one request (from ``add_request`` to its free)."""

    config: EvictionConfig | None  # the request's settings (None: eviction refused for it)
    may_evict: bool = False
    untouched_tokens: int = 0  # prompt tokens before its first eviction candidate
    signature: Any = None  # what its sessions are bound to (sessions.settings_signature; None: none)
    hit_tokens: int = 0  # tokens served from a cache at the last (re)start
    hit: Any = None  # the SessionHit it started from (None: none)
    decided_tokens: int = 0  # prompt tokens the worker's eviction decision saw (0: none yet)

    def restart(self) -> None:
        """Preempted: it recomputes (or resumes from a session), and decides again."""
        self.hit_tokens, self.hit, self.decided_tokens = 0, None, 0


class EvictionStats:
    """Counters since start (exported by the scheduler; read by metrics and benchmarks)."""

    def __init__(self) -> None:
        self.evicted_visual_tokens = 0
        self.evicted_text_tokens = 0
        self.freed_blocks = 0
        self.evicted_requests = 0
        self.peak_blocks_in_use = 0
        self.parked_blocks = 0
        self.restored_blocks = 0
        self.released_blocks = 0
        self.lost_blocks = 0
        self.bin_occupancy = 0
        self.pressure_steps = 0  # steps whose evicted blocks were freed at once (pool short)
        self.session_hits = 0  # requests that continued from an earlier request's evicted cache
        self.session_hit_tokens = 0  # prompt tokens they were served from it
        self.admission_reserve_blocks = 0  # the growth-aware reserve at the last schedule()

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


class EvictionScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.eviction_config = engine_config_from_additional(self.vllm_config.additional_config)
        self.eviction_stats = EvictionStats()
        groups = self.kv_cache_config.kv_cache_groups
        specs = [g.kv_cache_spec for g in groups]
        if len(groups) != 1 or type(specs[0]) is not FullAttentionSpec or (
            specs[0].sliding_window is not None or specs[0].attention_chunk_size is not None
        ):
            raise EvictionConfigError(
                "KV eviction supports models whose decoder uses full attention only (one KV "
                f"cache group of FullAttentionSpec); this model has {[type(s).__name__ for s in specs]}. "
                "Start without --kv-eviction."
            )
        self._evict_manager: EvictableFullAttentionManager | None = None
        for mgr in self.kv_cache_manager.coordinator.single_type_managers:
            if patch_full_attention_manager(mgr):
                self._evict_manager = mgr  # type: ignore[assignment]
        if self._evict_manager is None:
            raise EvictionConfigError("no full-attention KV cache manager found; eviction unsupported")
        self.records: dict[str, RequestRecord] = {}
        self._evict_manager.records = self.records
        self.recycle_bin = RecycleBin(self.kv_cache_manager.block_pool, self._evict_manager._null_block)
        self._reserve_admission_blocks()
        # Conversation reuse (hae_vllm.engine.sessions) rides on prefix caching.
        self.sessions: SessionCache | None = None
        if self.cache_config.enable_prefix_caching:
            self.sessions = SessionCache(self.kv_cache_manager.block_pool, self.cache_config.block_size)
            self._content_hit = patch_get_computed_blocks(self.kv_cache_manager, self._computed_blocks)
            # The KV-event stream (--kv-events-config) routers replay: reference-counted, sessions
            # announced under their content hashes, session keys never (hae_vllm.engine.kv_events).
            take_events = self.kv_cache_manager.take_events
            meta = getattr(self.kv_cache_manager, "kv_cache_event_metadata", None)
            self.router_stream = RouterStream(self.kv_cache_manager.block_pool, self.sessions,
                                              tuple(meta[0]) if meta else None)
            self.kv_cache_manager.take_events = lambda: self.router_stream.take(take_events())

    # ------------------------------------------------------------------ admission
    def _reserve_admission_blocks(self) -> None:
        """Admission through vLLM's own watermark (blocks a waiting or preempted request must
        leave free to be admitted while others run), keeping the larger of vLLM's and ours:
        a fixed ``admission_reserve``, or (None, the default) what the running requests are
        expected to grow into (:class:`~hae_vllm.engine.admission.GrowthReserve`), set before
        every ``schedule()``."""
        cfg = self.eviction_config
        kv = self.kv_cache_manager
        self.growth_reserve: GrowthReserve | None = None
        if not cfg.enabled:
            return
        if not hasattr(kv, "watermark_blocks"):
            logger.warning("this vLLM's KV cache manager has no admission watermark: "
                           "eviction's admission reserve is not applied")
            return
        self._vllm_watermark = kv.watermark_blocks
        if cfg.admission_reserve is None:
            self.growth_reserve = GrowthReserve(self.kv_cache_config.num_blocks, self.cache_config.block_size)
        else:
            kv.watermark_blocks = max(kv.watermark_blocks, int(cfg.admission_reserve * self.kv_cache_config.num_blocks))

    def add_request(self, request) -> None:
        cfg = self._request_config(request)
        rec = RequestRecord(cfg, cfg is not None and (cfg.decode_enabled or (cfg.enabled and bool(request.mm_features))))
        if rec.may_evict:
            mask = visual_mask_from_features(request.mm_features, request.num_prompt_tokens)
            rec.untouched_tokens = untouched_prefix_tokens(cfg, mask, self.cache_config.block_size)
            if self.sessions is not None and cfg.session_reuse and not cfg.decode_enabled:
                rec.signature = settings_signature(cfg)
        self.records[request.request_id] = rec
        super().add_request(request)

    def _request_config(self, request):
        if request.sampling_params is None:
            return None
        try:
            return request_config(self.eviction_config, request.sampling_params.extra_args)
        except EvictionConfigError:
            return None

    def _free_request(self, request, *args, **kwargs):
        self.recycle_bin.drop_request(request.request_id)
        return super()._free_request(request, *args, **kwargs)

    def _free_blocks(self, request, *args, **kwargs):
        # Where vLLM forgets the request (after its blocks went back, or into a session).
        out = super()._free_blocks(request, *args, **kwargs)
        self.records.pop(request.request_id, None)
        return out

    def _preempt_request(self, request, *args, **kwargs):
        # Parked blocks are already free; forget them.  The request resumes from the session
        # its blocks leave (when it keeps one), else recomputes from scratch.
        self.recycle_bin.drop_request(request.request_id)
        if self.growth_reserve is not None:
            self.growth_reserve.preempted(self.running)
        out = super()._preempt_request(request, *args, **kwargs)
        rec = self.records.get(request.request_id)
        if rec is not None:
            rec.restart()
        return out

    # ------------------------------------------------------------------ conversation reuse
    def _computed_blocks(self, request):
        """``KVCacheManager.get_computed_blocks``: vLLM's content hit, or a longer hit on a
        session an earlier evicting request left (:mod:`hae_vllm.engine.sessions`)."""
        blocks, num_tokens, boundary = self._content_hit(request)
        hit = None
        rec = self.records.get(request.request_id)
        signature = rec.signature if rec is not None else None
        if signature is not None and self.kv_cache_manager.prefix_cache_lookup_enabled(request):
            found = self.sessions.lookup(request, signature, request.num_tokens - 1)
            bs = self.cache_config.block_size
            if found is not None and found.num_blocks * bs > num_tokens:
                hit = found
                num_tokens = found.num_blocks * bs
                blocks = self.kv_cache_manager.create_kv_cache_blocks((list(found.session.blocks[: found.num_blocks]),))
        if rec is not None:
            rec.hit_tokens, rec.hit = num_tokens, hit
        return blocks, num_tokens, boundary

    def _free_request_blocks(self, request) -> None:
        if self.sessions is not None:
            self._keep_session(request)
        super()._free_request_blocks(request)

    def _keep_session(self, request) -> None:
        """Keep a finished or preempted request's blocks as a session when its eviction is
        final: the worker decided (or had nothing to decide) and no decode stage runs."""
        rec = self.records.get(request.request_id)
        if rec is None or rec.signature is None or request.num_computed_tokens < request.num_prompt_tokens:
            return  # no sessions for it, or prefill unfinished: nothing was decided
        signature, hit_tokens, hit, decided = rec.signature, rec.hit_tokens, rec.hit, rec.decided_tokens
        if not decided:
            # Did the worker have anything to decide after the hit it started from?  (The same
            # question PrefillStage.start asks; positions past the prompt are never visual, so
            # the longer token count now gives the same answer.)
            mask = visual_mask_from_features(request.mm_features, request.num_tokens)
            start = max(hit_tokens, rec.untouched_tokens)
            if has_candidates_after(rec.config, mask, start):
                return  # selection still pending in the worker (e.g. finished at its first token)
        horizon = max(hit.horizon if hit is not None else 0, decided)
        blocks = self._evict_manager.req_to_blocks.get(request.request_id)
        if horizon and blocks:
            self.sessions.register(request, blocks, request.num_computed_tokens, horizon, signature)

    # ------------------------------------------------------------------ step output
    def update_from_output(self, scheduler_output, model_runner_output):
        reports = getattr(model_runner_output, REPORT_ATTR, None)
        if reports:
            self._apply_evictions(reports)
        return super().update_from_output(scheduler_output, model_runner_output)

    def _apply_evictions(self, reports) -> None:
        mgr = self._evict_manager
        assert mgr is not None
        stats = self.eviction_stats
        bin_ = self.recycle_bin
        for req_id, rep in reports.items():
            if req_id not in self.requests:
                continue  # finished and freed meanwhile
            if rep.num_prompt_tokens and req_id in self.records:
                self.records[req_id].decided_tokens = rep.num_prompt_tokens
            if rep.hole_blocks:
                freed = mgr.release_blocks(req_id, rep.hole_blocks)
                stats.freed_blocks += freed
                stats.evicted_visual_tokens += rep.num_visual
                stats.evicted_text_tokens += rep.num_text
                stats.evicted_requests += 1
            blocks = mgr.req_to_blocks.get(req_id)
            if blocks is None:
                continue
            for idx, bid in rep.parked:
                if idx < len(blocks) and blocks[idx].block_id == bid:
                    bin_.park(req_id, blocks, idx)
            for bid in rep.released:
                bin_.release(req_id, bid)
            for idx, bid in rep.restore:
                bin_.restore(req_id, blocks, bid, idx)
        stats.parked_blocks = bin_.num_parked
        stats.restored_blocks = bin_.num_restored
        stats.released_blocks = bin_.num_released
        stats.lost_blocks = bin_.num_lost
        stats.bin_occupancy = bin_.occupancy()

    def _announce_sessions(self, out) -> None:
        """Tell the workers which requests started this step from a session (the trace
        records it: the oracle replays the conversation)."""
        started = [r.req_id for r in out.scheduled_new_reqs]
        started += list(getattr(out.scheduled_cached_reqs, "resumed_req_ids", ()) or ())
        announced = {}
        for req_id in started:
            rec = self.records.get(req_id)
            num_tokens, hit = (rec.hit_tokens, rec.hit) if rec is not None else (0, None)
            if hit is not None:
                announced[req_id] = SessionStart(hit.source, num_tokens)
                self.eviction_stats.session_hits += 1
                self.eviction_stats.session_hit_tokens += num_tokens
        if announced:
            setattr(out, SESSION_ATTR, announced)

    def make_stats(self, *args, **kwargs):
        stats = super().make_stats(*args, **kwargs)
        if stats is not None and stats.kv_connector_stats is None:
            from hae_vllm.metrics import STATS_KEY

            stats.kv_connector_stats = {STATS_KEY: self.eviction_stats.as_dict()}
        return stats

    def schedule(self, *args, **kwargs):
        if self.growth_reserve is not None:
            reserve = self.growth_reserve.blocks(self.running)
            self.kv_cache_manager.watermark_blocks = max(self._vllm_watermark, reserve)
            self.eviction_stats.admission_reserve_blocks = reserve
        out = super().schedule(*args, **kwargs)
        # Restores confirmed in the last update, and parked blocks the pool handed out during
        # this schedule(): the worker applies both before this step's forward.
        updates = self.recycle_bin.take_updates()
        if updates:
            setattr(out, BIN_UPDATES_ATTR, updates)
        if self.sessions is not None:
            self._announce_sessions(out)
        pool = self.kv_cache_manager.block_pool
        # Memory pressure: this step preempted, or the next waiting request does not fit.  The
        # worker then frees evicted blocks at the end of this step instead of at the start of
        # the request's first decode step (which keeps selection off the first token's path).
        pressure = bool(getattr(out, "preempted_req_ids", None))
        if not pressure and self.waiting:
            head = self.waiting.peek_request()
            bs = self.cache_config.block_size
            pressure = pool.get_num_free_blocks() < -(-head.num_tokens // bs)
        setattr(out, PRESSURE_ATTR, pressure)
        self.eviction_stats.pressure_steps += pressure
        in_use = pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()
        if in_use > self.eviction_stats.peak_blocks_in_use:
            self.eviction_stats.peak_blocks_in_use = in_use
        return out
