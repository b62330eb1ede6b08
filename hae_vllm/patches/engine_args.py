"""``--kv-eviction`` / ``--kv-eviction-config`` on vLLM's engine arguments.

The flags are translated into ``additional_config["kv_eviction"]`` (a full, validated config
mapping), which vLLM hands to every process.  ``create_engine_config`` enforces the settings
eviction needs (DESIGN.md §2) before the VllmConfig is frozen.
"""

from __future__ import annotations

import logging

from hae_vllm.config import CONFIG_KEY, EvictionConfigError, build_engine_config, engine_config_from_additional, methods
from hae_vllm.patches import is_patched, wraps_patch

logger = logging.getLogger("vllm.hae_vllm")  # under vLLM's logger: its handlers and level apply

SCHEDULER_CLS = "hae_vllm.engine.scheduler.EvictionScheduler"
# KV cache dtypes eviction can move and read: the model's own, or one fp8 byte per element
# with a per-layer scale (hae_vllm.kv_format).  Per-token-head scales, fp4 and MLA packings
# keep metadata beside the bytes that compaction would have to move too.
_SUPPORTED_KV = {"None", "auto", "bfloat16", "float16", "fp8", "fp8_e4m3", "fp8_e5m2"}

def _help_method() -> str:
    return "KV-cache token eviction method (hae_vllm; `python -m hae_vllm.policies` lists them). " + "; ".join(
        f"{k}: {v}" for k, v in methods().items()
    )
_HELP_CONFIG = (
    "Settings of the eviction method: inline JSON (e.g. '{\"budget\": 0.4}'), a YAML file, or "
    "the name of a preset shipped in hae_vllm/presets/. Per request: vllm_xargs "
    "kv_eviction=<method>, kv_eviction_<setting>=<value>."
)


def patch_add_cli_args(cls) -> None:
    original = cls.add_cli_args
    if is_patched(original):
        return

    @wraps_patch(original)
    def add_cli_args(parser, *args, **kwargs):
        parser = original(parser, *args, **kwargs)
        if any("--kv-eviction" in a.option_strings for a in parser._actions):
            return parser
        group = parser.add_argument_group(
            "KVEviction", "hae_vllm: evict multimodal KV-cache tokens and free whole paged blocks."
        )
        group.add_argument("--kv-eviction", choices=sorted(methods()), default=None, help=_help_method())
        group.add_argument("--kv-eviction-config", type=str, default=None, help=_HELP_CONFIG)
        return parser

    cls.add_cli_args = staticmethod(add_cli_args)


def merge_eviction_args(additional_config: dict | None, method: str | None, source: str | None) -> dict:
    """additional_config with the CLI flags folded in (flags win)."""
    additional = dict(additional_config or {})
    if method is None and source is None:
        return additional
    cfg = build_engine_config(method, source)
    additional[CONFIG_KEY] = cfg.to_dict()
    return additional


def patch_from_cli_args(cls) -> None:
    original = cls.from_cli_args.__func__
    if is_patched(original):
        return

    @wraps_patch(original)
    def from_cli_args(klass, args):
        method = getattr(args, "kv_eviction", None)
        source = getattr(args, "kv_eviction_config", None)
        engine_args = original(klass, args)
        if method is not None or source is not None:
            engine_args.additional_config = merge_eviction_args(
                engine_args.additional_config, method, source
            )
        return engine_args

    cls.from_cli_args = classmethod(from_cli_args)


def enforce_eviction_settings(engine_args) -> None:
    """Normalise additional_config and set what eviction needs; raise on what it cannot do."""
    cfg = engine_config_from_additional(engine_args.additional_config)
    if engine_args.additional_config and CONFIG_KEY in engine_args.additional_config:
        engine_args.additional_config = dict(engine_args.additional_config)
        engine_args.additional_config[CONFIG_KEY] = cfg.to_dict()
    if not cfg.enabled:
        return
    if engine_args.speculative_config:
        raise EvictionConfigError(
            "--kv-eviction cannot be combined with speculative decoding; drop "
            "--speculative-config or use --kv-eviction none"
        )
    if engine_args.scheduler_cls not in (None, SCHEDULER_CLS):
        raise EvictionConfigError(
            f"--kv-eviction needs its own scheduler class; drop --scheduler-cls "
            f"{engine_args.scheduler_cls!r}"
        )
    if str(engine_args.kv_cache_dtype) not in _SUPPORTED_KV:
        raise EvictionConfigError(
            f"--kv-eviction supports unquantised and per-layer-scaled fp8 KV caches only (--kv-cache-dtype "
            f"fp8, fp8_e4m3 or fp8_e5m2); drop --kv-cache-dtype {engine_args.kv_cache_dtype}"
        )
    if (engine_args.pipeline_parallel_size or 1) > 1:
        raise EvictionConfigError(
            "--kv-eviction does not support pipeline parallelism (one plan must reach every "
            "layer's cache in one worker); use --tensor-parallel-size instead"
        )
    for flag, size in (("--decode-context-parallel-size", getattr(engine_args, "decode_context_parallel_size", 1)),
                       ("--prefill-context-parallel-size", getattr(engine_args, "prefill_context_parallel_size", 1))):
        if (size or 1) > 1:
            # Context parallelism shards a request's tokens over ranks by logical position;
            # eviction's holes and compaction change which tokens each block holds.
            raise EvictionConfigError(
                f"--kv-eviction does not support context parallelism ({flag} {size}); drop it or use "
                "--tensor-parallel-size instead"
            )
    if getattr(engine_args, "kv_transfer_config", None):
        raise EvictionConfigError("--kv-eviction cannot be combined with a KV connector (--kv-transfer-config)")
    engine_args.scheduler_cls = SCHEDULER_CLS
    # Eviction reports travel with the step's output and are applied before the next
    # schedule(); async scheduling would schedule one step ahead of them.
    if engine_args.async_scheduling:
        raise EvictionConfigError("--kv-eviction requires --no-async-scheduling")
    engine_args.async_scheduling = False
    _enforce_cuda_settings(engine_args)
    _fit_cpu_memory(engine_args)
    if engine_args.block_size is None:
        engine_args.block_size = cfg.default_block_size
        logger.info(
            "hae_vllm: --kv-eviction %s with no --block-size: using block size %d "
            "(eviction frees whole blocks, so smaller blocks free memory more finely)",
            cfg.method,
            cfg.default_block_size,
        )


# Memory the EngineCore and worker processes take (torch, the model) between this check in the
# API process and the worker's own check of the node's available memory.
_CPU_START_HEADROOM = 2 << 30


def _fit_cpu_memory(engine_args) -> None:
    """On the CPU, a KV cache size that fits the node when the user chose none.

    vLLM's CPU worker reserves ``gpu_memory_utilization`` (default 0.92) of its NUMA node's
    memory and refuses to start when less than that is available, which is the case on many
    shared machines (our reference machine included): ``vllm serve MODEL --kv-eviction hae``
    would stop before serving anything.  Only when that would happen (with the processes
    still to start counted), and the user set none of ``--gpu-memory-utilization``,
    ``--kv-cache-memory-bytes`` and ``VLLM_CPU_KVCACHE_SPACE``, the KV cache gets half of what
    will be left (logged); wherever vLLM's default fits it is left alone."""
    import os

    from vllm.config.cache import CacheConfig
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or engine_args.kv_cache_memory_bytes is not None:
        return
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE", "") != "":
        return
    default = CacheConfig.gpu_memory_utilization
    if engine_args.gpu_memory_utilization != default:
        return
    try:
        from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

        node = get_allowed_cpu_list()[0].numa_node
        info = get_memory_node_info(node)
    except Exception:  # unknown topology: leave vLLM's own check to speak
        return
    left = info.available_memory - _CPU_START_HEADROOM
    if default * info.total_memory <= left:
        return
    kv_bytes = (left // 2) >> 28 << 28  # whole 256 MiB
    if kv_bytes < 1 << 28:
        return
    engine_args.kv_cache_memory_bytes = kv_bytes
    logger.info(
        "hae_vllm: NUMA node %d has %.1f of %.1f GiB available, less than vLLM's default share %.2f "
        "needs; using a %.2f GiB KV cache (set --kv-cache-memory-bytes, --gpu-memory-utilization or "
        "VLLM_CPU_KVCACHE_SPACE to choose)",
        node, info.available_memory / 2**30, info.total_memory / 2**30, default, kv_bytes / 2**30,
    )


def _enforce_cuda_settings(engine_args) -> None:
    """On CUDA: the V1 model runner (our runner hooks) and piecewise CUDA graphs (attention,
    where holes are dropped and layer 0 is scored, must run eagerly)."""
    import os

    from vllm.platforms import current_platform

    if not current_platform.is_cuda_alike():
        return
    if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "") not in ("", "0"):
        raise EvictionConfigError("--kv-eviction needs the V1 model runner; unset VLLM_USE_V2_MODEL_RUNNER")
    os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"  # inherited by the EngineCore and workers
    from vllm.config.compilation import CUDAGraphMode

    cc = engine_args.compilation_config
    mode = cc.get("cudagraph_mode") if isinstance(cc, dict) else getattr(cc, "cudagraph_mode", None)
    if mode is None:
        if isinstance(cc, dict):
            cc["cudagraph_mode"] = "PIECEWISE"
        else:
            cc.cudagraph_mode = CUDAGraphMode.PIECEWISE
    elif str(mode).upper().split(".")[-1] not in ("NONE", "PIECEWISE"):
        raise EvictionConfigError(
            f"--kv-eviction supports cudagraph_mode NONE or PIECEWISE, not {mode}"
        )


_ALIBI_MODEL_TYPES = {"bloom", "mpt", "baichuan", "jais"}


def check_model_supported(vllm_config) -> None:
    cfg = engine_config_from_additional(vllm_config.additional_config)
    if not cfg.enabled:
        return
    mc = vllm_config.model_config
    if mc.get_sliding_window() is not None:
        raise EvictionConfigError(
            f"--kv-eviction {cfg.method}: model {mc.model} uses sliding-window attention, which "
            "eviction does not support; start without --kv-eviction"
        )
    hf = mc.hf_text_config
    if getattr(hf, "alibi", False) or getattr(hf, "use_alibi", False) or getattr(hf, "position_embedding_type", "") == "alibi" or mc.hf_config.model_type in _ALIBI_MODEL_TYPES:
        raise EvictionConfigError(
            f"--kv-eviction {cfg.method}: model {mc.model} uses ALiBi position biases, which "
            "eviction does not support (scores and holes assume rotary or absolute positions); "
            "start without --kv-eviction"
        )
    if not mc.is_multimodal_model:
        logger.warning(
            "hae_vllm: model %s is not multimodal; --kv-eviction %s evicts visual tokens only, "
            "so requests run without eviction",
            mc.model,
            cfg.method,
        )


def patch_create_engine_config(cls) -> None:
    original = cls.create_engine_config
    if is_patched(original):
        return

    @wraps_patch(original)
    def create_engine_config(self, *args, **kwargs):
        enforce_eviction_settings(self)
        config = original(self, *args, **kwargs)
        check_model_supported(config)
        return config

    cls.create_engine_config = create_engine_config


def apply() -> None:
    from vllm.engine.arg_utils import EngineArgs

    patch_add_cli_args(EngineArgs)
    patch_from_cli_args(EngineArgs)
    patch_create_engine_config(EngineArgs)
