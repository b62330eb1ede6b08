"""The ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` in the API server process, the EngineCore process and every
worker.  It is idempotent and has no effect until called (no import-time side effects).
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger("hae_vllm")

SUPPORTED_VLLM = ("0.32",)
_lock = threading.Lock()
_registered = False


def _check_version() -> str:
    import vllm

    version = vllm.__version__
    if not version.startswith(SUPPORTED_VLLM):
        logger.warning(
            "hae_vllm was written against vLLM %s; found %s. Eviction patches may not apply.",
            "/".join(SUPPORTED_VLLM),
            version,
        )
    return version


def register_attention_backends() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CPU_ATTN, "hae_vllm.attention.cpu.EvictionCPUAttentionBackend")
    try:
        import vllm.v1.attention.backends.flash_attn  # noqa: F401  (CUDA builds only)
    except Exception:
        return
    register_backend(AttentionBackendEnum.FLASH_ATTN, "hae_vllm.attention.cuda.EvictionFlashAttentionBackend")


def register() -> None:
    global _registered
    with _lock:
        if _registered:
            return
        _check_version()
        from hae_vllm.patches import engine_args, metrics, model_runner, requests

        engine_args.apply()
        requests.apply()
        metrics.apply()
        model_runner.apply()
        register_attention_backends()
        _registered = True
