"""Eviction counters on vLLM's ``/metrics``.

The counters live in the scheduler (EngineCore process).  They reach the API process inside
``SchedulerStats.kv_connector_stats`` under :data:`STATS_KEY` (eviction refuses KV connectors,
so the field is otherwise unused), where :class:`EvictionStatLogger` pops them (:func:`observe`)
and mirrors them into Prometheus metrics registered next to vLLM's.

:class:`EvictionStatLogger` is a vLLM stat logger plugin (entry point group
``vllm.stat_logger_plugins``, loaded by ``AsyncLLM``, i.e. ``vllm serve``).  vLLM's
``StatLoggerManager`` runs plugin loggers before its own ``LoggingStatLogger`` and
``PrometheusStatLogger``, so those never see our payload; that matters, because with no KV
connector configured ``LoggingStatLogger`` raises on any non-empty ``kv_connector_stats``
(``KVConnectorLogging.observe``: no ``connector_cls``).  The offline ``LLMEngine`` does not
load stat logger plugins: :mod:`hae_vllm.patches.metrics` hands it the same logger.
"""

from __future__ import annotations

import threading
from typing import Any

from vllm.v1.metrics.loggers import StatLoggerBase

STATS_KEY = "hae_eviction"

_lock = threading.Lock()
_metrics: dict[str, Any] | None = None
_last: dict[int, dict[str, int]] = {}


def _create() -> dict[str, Any]:
    from prometheus_client import Counter, Gauge

    return {
        "tokens": Counter(
            "vllm:hae_evicted_tokens",
            "KV-cache tokens evicted by hae_vllm (logical count), by modality.",
            labelnames=["engine", "modality"],
        ),
        "blocks": Counter(
            "vllm:hae_freed_kv_blocks",
            "Paged KV blocks returned to vLLM's block pool by eviction (physical).",
            labelnames=["engine"],
        ),
        "requests": Counter(
            "vllm:hae_evicted_requests",
            "Requests whose KV cache was compacted by eviction.",
            labelnames=["engine"],
        ),
        "bin_events": Counter(
            "vllm:hae_bin_blocks",
            "Recycle-bin block events: parked, restored, released (final), lost (reused by the pool).",
            labelnames=["engine", "event"],
        ),
        "bin_occupancy": Gauge(
            "vllm:hae_bin_occupancy_blocks",
            "KV blocks currently parked in recycle bins (free, still readable).",
            labelnames=["engine"],
        ),
        "pressure": Counter(
            "vllm:hae_pressure_steps",
            "Steps under KV memory pressure, whose evicted blocks were freed within the step "
            "(otherwise at the start of the request's first decode step).",
            labelnames=["engine"],
        ),
        "session_hits": Counter(
            "vllm:hae_session_hits",
            "Requests that continued from an earlier request's evicted cache (conversation reuse).",
            labelnames=["engine"],
        ),
        "session_tokens": Counter(
            "vllm:hae_session_hit_tokens",
            "Prompt tokens served from an earlier request's evicted cache (not recomputed).",
            labelnames=["engine"],
        ),
        "reserve": Gauge(
            "vllm:hae_admission_reserve_blocks",
            "Free KV blocks a waiting request must leave to the running ones to be admitted "
            "(growth-aware admission reserve at the last schedule(); 0 with a fixed admission_reserve).",
            labelnames=["engine"],
        ),
        "peak": Gauge(
            "vllm:hae_peak_kv_blocks_in_use",
            "Largest number of KV blocks in use seen after any schedule() step.",
            labelnames=["engine"],
        ),
    }


def _register_again() -> None:
    """Put our metrics back into the Prometheus registry: a ``PrometheusStatLogger`` built
    after them (a second engine in this process) unregisters every ``vllm:`` collector."""
    from prometheus_client import REGISTRY

    with _lock:
        for metric in (_metrics or {}).values():
            try:
                REGISTRY.register(metric)
            except ValueError:  # still registered
                pass


class EvictionStatLogger(StatLoggerBase):
    """Per-engine stat logger: publishes the eviction counters of each step's scheduler stats."""

    def __init__(self, vllm_config, engine_index: int = 0):
        self.engine_index = engine_index
        with _lock:
            # A new engine's scheduler counts from zero: forget the last one's snapshot.
            _last.pop(engine_index, None)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        observe(scheduler_stats, engine_idx or 0)

    def log_engine_initialized(self) -> None:
        # Runs once every logger of the StatLoggerManager exists (vLLM's PrometheusStatLogger
        # included, which unregisters "vllm:" collectors when built).
        _register_again()


def observe(scheduler_stats, engine_idx: int) -> None:
    """Pop our counters out of ``scheduler_stats`` and publish the increments."""
    global _metrics
    if scheduler_stats is None:
        return
    payload = scheduler_stats.kv_connector_stats
    if not isinstance(payload, dict) or STATS_KEY not in payload:
        return
    stats = payload.pop(STATS_KEY)
    if not payload:
        scheduler_stats.kv_connector_stats = None
    with _lock:
        if _metrics is None:
            _metrics = _create()
        last = _last.setdefault(engine_idx, {})
        if last == stats:
            return  # nothing changed since the last step (most steps): no label lookups
        eng = str(engine_idx)

        def delta(key: str) -> int:
            d = int(stats.get(key, 0)) - last.get(key, 0)
            last[key] = int(stats.get(key, 0))
            return max(d, 0)

        _metrics["tokens"].labels(eng, "visual").inc(delta("evicted_visual_tokens"))
        _metrics["tokens"].labels(eng, "text").inc(delta("evicted_text_tokens"))
        _metrics["blocks"].labels(eng).inc(delta("freed_blocks"))
        _metrics["requests"].labels(eng).inc(delta("evicted_requests"))
        _metrics["pressure"].labels(eng).inc(delta("pressure_steps"))
        _metrics["session_hits"].labels(eng).inc(delta("session_hits"))
        _metrics["session_tokens"].labels(eng).inc(delta("session_hit_tokens"))
        _metrics["peak"].labels(eng).set(int(stats.get("peak_blocks_in_use", 0)))
        _metrics["reserve"].labels(eng).set(int(stats.get("admission_reserve_blocks", 0)))
        for event in ("parked", "restored", "released", "lost"):
            _metrics["bin_events"].labels(eng, event).inc(delta(f"{event}_blocks"))
        _metrics["bin_occupancy"].labels(eng).set(int(stats.get("bin_occupancy", 0)))
        last.update((k, int(v)) for k, v in stats.items())  # the snapshot compared next step
