"""Route the scheduler's eviction counters to Prometheus in the API process."""

from __future__ import annotations

from hae_vllm.patches import is_patched, wraps_patch


def patch_record(cls) -> None:
    original = cls.record
    if is_patched(original):
        return

    @wraps_patch(original)
    def record(self, scheduler_stats, iteration_stats, *args, **kwargs):
        from hae_vllm.metrics import observe

        engine_idx = kwargs.get("engine_idx")
        if engine_idx is None and len(args) >= 2:
            engine_idx = args[1]
        observe(scheduler_stats, engine_idx or 0)
        return original(self, scheduler_stats, iteration_stats, *args, **kwargs)

    cls.record = record


def apply() -> None:
    from vllm.v1.metrics.loggers import StatLoggerManager

    patch_record(StatLoggerManager)
