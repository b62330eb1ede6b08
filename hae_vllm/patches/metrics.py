"""The eviction stat logger for the offline engine.

``vllm serve`` (``AsyncLLM``) loads :class:`hae_vllm.metrics.EvictionStatLogger` through vLLM's
own ``vllm.stat_logger_plugins`` entry point (pyproject.toml); no patch is involved.  The
offline ``LLMEngine`` (``vllm.LLM``) does not load that group, and ``LLM`` has no way to pass
stat loggers, so with ``disable_log_stats=False`` vLLM's ``LoggingStatLogger`` would meet the
scheduler's eviction payload in ``kv_connector_stats`` and fail on it (it expects a KV
connector's stats).  This patch gives ``LLMEngine`` the same logger, first in its list, as the
plugin group gives ``AsyncLLM``.
"""

from __future__ import annotations

import inspect

from hae_vllm.patches import is_patched, wraps_patch


def patch___init__(cls) -> None:
    original = cls.__init__
    if is_patched(original):
        return
    signature = inspect.signature(original)

    @wraps_patch(original)
    def __init__(self, *args, **kwargs):
        from hae_vllm.metrics import EvictionStatLogger

        bound = signature.bind(self, *args, **kwargs)
        loggers = list(bound.arguments.get("stat_loggers") or [])
        if EvictionStatLogger not in loggers:
            loggers.insert(0, EvictionStatLogger)  # before any logger that reads kv_connector_stats
        bound.arguments["stat_loggers"] = loggers
        original(*bound.args, **bound.kwargs)

    cls.__init__ = __init__


def apply() -> None:
    from vllm.v1.engine.llm_engine import LLMEngine

    patch___init__(LLMEngine)
