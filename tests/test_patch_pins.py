"""Pins on every upstream vLLM symbol hae_vllm patches, subclasses, or swaps in (see the
docstring of hae_vllm/patches/__init__.py): it exists, and its parameters and the attributes
the patch relies on are what the patch expects.  No engine starts; a failure here names the
upstream change to review before upgrading vLLM."""

from __future__ import annotations

import dataclasses
import importlib
import inspect

import pytest

from hae_vllm.patches import PATCH_MARK


def upstream(cls, name):
    """``cls.name`` as vLLM defines it (under any hae_vllm patch), unwrapped from
    staticmethod/classmethod."""
    raw = inspect.getattr_static(cls, name)
    fn = getattr(raw, "__func__", raw)
    while getattr(fn, PATCH_MARK, False):
        fn = fn.__hae_original__
    return fn


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def assert_starts_with(fn, names):
    got = params(fn)
    assert got[: len(names)] == names, f"{fn.__qualname__}{inspect.signature(fn)}: expected parameters {names} first"


def sets_attributes(cls, *names):
    """The attributes ``cls.__init__`` (or a base's) assigns on ``self``."""
    src = "".join(inspect.getsource(k.__init__) for k in cls.__mro__ if "__init__" in k.__dict__ and k.__module__.startswith("vllm"))
    missing = [n for n in names if f"self.{n} =" not in src and f"self.{n}:" not in src]
    assert not missing, f"{cls.__name__}.__init__ no longer sets {missing}"


# ---------------------------------------------------------------- patches/engine_args.py
def test_engine_args():
    from vllm.config.cache import CacheConfig
    from vllm.engine.arg_utils import EngineArgs

    assert isinstance(inspect.getattr_static(EngineArgs, "add_cli_args"), staticmethod)
    assert params(upstream(EngineArgs, "add_cli_args")) == ["parser"]
    assert isinstance(inspect.getattr_static(EngineArgs, "from_cli_args"), classmethod)
    assert params(upstream(EngineArgs, "from_cli_args")) == ["cls", "args"]
    assert_starts_with(upstream(EngineArgs, "create_engine_config"), ["self"])
    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    needed = {"additional_config", "speculative_config", "scheduler_cls", "kv_cache_dtype", "pipeline_parallel_size",
              "kv_transfer_config", "async_scheduling", "block_size", "compilation_config",
              "kv_cache_memory_bytes", "gpu_memory_utilization", "decode_context_parallel_size",
              "prefill_context_parallel_size"}
    assert needed <= fields, needed - fields
    assert isinstance(CacheConfig.gpu_memory_utilization, float)


def test_scheduler_class_is_a_config_field():
    from vllm.config import SchedulerConfig

    assert "scheduler_cls" in {f.name for f in dataclasses.fields(SchedulerConfig)}


# ---------------------------------------------------------------- patches/requests.py
def test_request_validation_points():
    from vllm.entrypoints.common.offline import OfflineInferenceMixin
    from vllm.entrypoints.serve.engine.serving import BaseServing
    from vllm.exceptions import VLLMValidationError
    from vllm.multimodal.cache.base import BaseMultiModalProcessorCache
    from vllm.renderers.base import BaseRenderer
    from vllm.v1.engine.input_processor import InputProcessor

    assert_starts_with(upstream(InputProcessor, "_validate_params"), ["self", "params"])
    assert_starts_with(upstream(InputProcessor, "process_inputs"), ["self", "request_id", "prompt", "params"])
    sets_attributes(InputProcessor, "vllm_config", "renderer")
    assert isinstance(inspect.getattr_static(BaseRenderer, "mm_processor_cache"), property)
    assert params(BaseMultiModalProcessorCache.invalidate) == ["self", "mm_hash"]
    assert params(upstream(OfflineInferenceMixin, "_params_to_seq")) == ["self", "params", "num_requests"]
    check = upstream(BaseServing, "_check_model")
    assert inspect.iscoroutinefunction(check) and params(check) == ["self", "request"]
    # The generating endpoints inherit the patched check and carry the engine client whose
    # vllm_config holds the eviction settings.
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

    for cls in (OpenAIServingChat, OpenAIServingCompletion):
        assert issubclass(cls, BaseServing)
        assert next(k for k in cls.__mro__ if "_check_model" in k.__dict__) is BaseServing, cls
        sets_attributes(cls, "engine_client")
    assert {"parameter", "value"} <= set(params(VLLMValidationError.__init__))


# ---------------------------------------------------------------- patches/mm_resubmit.py
def test_resubmit_points():
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    from vllm.multimodal.cache.base import BaseMultiModalProcessorCache
    from vllm.renderers.online_renderer import OnlineRenderer
    from vllm.v1.engine.async_llm import AsyncLLM

    gen = upstream(AsyncLLM, "generate")
    assert inspect.isasyncgenfunction(gen)
    assert_starts_with(gen, ["self", "prompt", "sampling_params", "request_id"])
    sets_attributes(AsyncLLM, "renderer", "vllm_config")
    for cls, name, method in ((OpenAIServingChat, "render_chat_request", "render_chat"),
                              (OpenAIServingCompletion, "render_completion_request", "render_completion")):
        fn = upstream(cls, name)
        assert inspect.iscoroutinefunction(fn) and params(fn) == ["self", "request"], (cls, name)
        sets_attributes(cls, "online_renderer")
        assert "skip_mm_cache" in params(getattr(OnlineRenderer, method))
    assert params(BaseMultiModalProcessorCache.is_cached_item) == ["self", "mm_hash"]


# ---------------------------------------------------------------- patches/model_runner.py
RUNNER_HOOKS = {
    "initialize_attn_backend": ["self", "kv_cache_config"],
    "_update_states": ["self", "scheduler_output"],
    "execute_model": ["self", "scheduler_output"],
    "sample_tokens": ["self"],
}


def test_model_runner_hooks():
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    for name, first in RUNNER_HOOKS.items():
        assert_starts_with(upstream(GPUModelRunner, name), first)
    sets_attributes(GPUModelRunner, "vllm_config", "compilation_config")
    assert "attn_groups" in inspect.getsource(GPUModelRunner)
    assert isinstance(EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput)


def test_cpu_model_runner_inherits_the_hooks():
    """The patches go on GPUModelRunner: the CPU runner must not override what they wrap."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert issubclass(CPUModelRunner, GPUModelRunner)
    for name in RUNNER_HOOKS:
        owner = next(k for k in CPUModelRunner.__mro__ if name in k.__dict__)
        assert owner is GPUModelRunner, f"{owner.__name__} overrides {name}"


# ---------------------------------------------------------------- patches/metrics.py, hae_vllm/metrics.py
def test_stat_logger_plugin_interface():
    import vllm.v1.engine.async_llm as async_llm
    from vllm.plugins import STAT_LOGGER_PLUGINS_GROUP
    from vllm.v1.metrics.loggers import AggregateStatLoggerBase, StatLoggerBase, StatLoggerManager
    from vllm.v1.metrics.stats import SchedulerStats

    from hae_vllm.metrics import EvictionStatLogger

    assert STAT_LOGGER_PLUGINS_GROUP == "vllm.stat_logger_plugins"
    assert async_llm.load_stat_logger_plugin_factories is not None  # AsyncLLM loads the group
    assert issubclass(EvictionStatLogger, StatLoggerBase) and not issubclass(EvictionStatLogger, AggregateStatLoggerBase)
    assert params(StatLoggerBase.__init__) == ["self", "vllm_config", "engine_index"]
    assert params(StatLoggerBase.record) == ["self", "scheduler_stats", "iteration_stats", "mm_cache_stats", "engine_idx"]
    assert params(EvictionStatLogger.record) == params(StatLoggerBase.record)
    assert StatLoggerBase.__abstractmethods__ == {"__init__", "record", "log_engine_initialized"}
    assert not EvictionStatLogger.__abstractmethods__
    assert params(StatLoggerManager.__init__)[:3] == ["self", "vllm_config", "engine_idxs"]
    assert "custom_stat_loggers" in params(StatLoggerManager.__init__)
    assert "kv_connector_stats" in {f.name for f in dataclasses.fields(SchedulerStats)}


def test_offline_engine_takes_stat_loggers():
    from vllm.v1.engine.llm_engine import LLMEngine

    assert "stat_loggers" in params(upstream(LLMEngine, "__init__"))
    sets_attributes(LLMEngine, "logger_manager")


# ---------------------------------------------------------------- engine/scheduler.py
SCHEDULER_OVERRIDES = {
    "add_request": ["self", "request"],
    "_free_request": ["self", "request"],
    "_preempt_request": ["self", "request"],
    "_free_request_blocks": ["self", "request"],
    "_free_blocks": ["self", "request"],
    "update_from_output": ["self", "scheduler_output", "model_runner_output"],
    "make_stats": ["self"],
    "schedule": ["self"],
}


def test_scheduler_overrides():
    from vllm.v1.core.sched.scheduler import Scheduler

    from hae_vllm.engine.scheduler import EvictionScheduler

    overridden = {n for n, v in vars(EvictionScheduler).items() if callable(v) and hasattr(Scheduler, n)}
    assert overridden == set(SCHEDULER_OVERRIDES) | {"__init__"}, "review SCHEDULER_OVERRIDES"
    for name, first in SCHEDULER_OVERRIDES.items():
        assert_starts_with(getattr(Scheduler, name), first)
    sets_attributes(Scheduler, "kv_cache_manager", "kv_cache_config", "cache_config", "vllm_config", "requests", "waiting")
    assert "peek_request" in dir(importlib.import_module("vllm.v1.core.sched.request_queue").RequestQueue)


# ---------------------------------------------------------------- patches/kv_cache_manager.py, engine/kv_manager.py
def test_kv_cache_manager_instance_patches():
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_coordinator import KVCacheCoordinator
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager, SingleTypeKVCacheManager

    from hae_vllm.engine.kv_manager import EvictableFullAttentionManager

    # get_computed_blocks(request) -> (blocks, num_tokens, boundary), looked up on the instance.
    get = KVCacheManager.get_computed_blocks
    assert params(get) == ["self", "request"]
    assert str(inspect.signature(get).return_annotation).count(",") == 2, inspect.signature(get)
    for name in ("prefix_cache_lookup_enabled", "create_kv_cache_blocks"):
        assert callable(getattr(KVCacheManager, name)), name
    sets_attributes(KVCacheManager, "coordinator", "block_pool", "watermark_blocks")
    sets_attributes(KVCacheCoordinator, "single_type_managers")
    # FullAttentionManager instances are re-classed: the subclass must add no state, and what
    # it overrides or reads must be upstream's.
    assert "__init__" not in vars(EvictableFullAttentionManager) and "__slots__" not in vars(FullAttentionManager)
    assert params(upstream(FullAttentionManager, "cache_blocks")) == params(EvictableFullAttentionManager.cache_blocks)
    sets_attributes(SingleTypeKVCacheManager, "req_to_blocks", "_null_block", "block_pool", "block_size")
    assert callable(BlockPool.free_blocks) and callable(BlockPool.get_num_free_blocks)
    sets_attributes(BlockPool, "num_gpu_blocks")


def test_kv_cache_manager_patches_apply_to_one_instance():
    from types import SimpleNamespace

    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

    from hae_vllm.engine.kv_manager import EvictableFullAttentionManager
    from hae_vllm.patches import is_patched
    from hae_vllm.patches.kv_cache_manager import patch_full_attention_manager, patch_get_computed_blocks

    mgr = FullAttentionManager.__new__(FullAttentionManager)
    assert patch_full_attention_manager(mgr) and type(mgr) is EvictableFullAttentionManager
    assert not patch_full_attention_manager(SimpleNamespace())

    kv = KVCacheManager.__new__(KVCacheManager)
    seen = []
    original = patch_get_computed_blocks(kv, lambda r: seen.append(r) or "hit")
    assert original.__func__ is KVCacheManager.get_computed_blocks
    assert kv.get_computed_blocks("req") == "hit" and seen == ["req"] and is_patched(kv.get_computed_blocks)
    assert patch_get_computed_blocks(kv, lambda r: None) is original  # idempotent
    assert not is_patched(KVCacheManager.get_computed_blocks)  # the class is untouched


# ---------------------------------------------------------------- attention/backends.py
def test_attention_backend_registry():
    from vllm.v1.attention.backend import AttentionMetadataBuilder, CommonAttentionMetadata
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from hae_vllm.attention.backends import SUPPORTED

    assert params(register_backend)[:2] == ["backend", "class_path"]
    for member in SUPPORTED:
        assert hasattr(AttentionBackendEnum, member), member
    fields = {f.name for f in dataclasses.fields(CommonAttentionMetadata)}
    assert {"block_table_tensor", "seq_lens", "num_reqs"} <= fields
    assert hasattr(AttentionMetadataBuilder, "supports_update_block_table")
    sets_attributes(AttentionMetadataBuilder, "kv_cache_spec")


@pytest.mark.parametrize("member", ["CPU_ATTN", "FLASH_ATTN", "TRITON_ATTN", "FLASHINFER"])
def test_attention_backend_subclassed(member):
    from hae_vllm.attention.backends import SUPPORTED, make_eviction_backend

    module, name = SUPPORTED[member].rsplit(".", 1)
    try:
        backend = getattr(importlib.import_module(module), name)
    except Exception as e:  # a CUDA backend on the CPU build
        pytest.skip(f"{SUPPORTED[member]} does not import here: {type(e).__name__}")
    builder, impl = backend.get_builder_cls(), backend.get_impl_cls()
    assert params(builder.build)[:4] == ["self", "common_prefix_len", "common_attn_metadata", "fast_build"]
    assert params(impl.forward)[:8] == ["self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output"]
    assert isinstance(inspect.getattr_static(backend, "get_impl_cls"), staticmethod)
    assert isinstance(inspect.getattr_static(backend, "get_builder_cls"), staticmethod)
    ev = make_eviction_backend(backend)
    assert ev.get_name() == backend.get_name()
    assert ev.get_builder_cls().supports_update_block_table is False
