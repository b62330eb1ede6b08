"""The ``vllm.general_plugins`` entry point.

vLLM calls :func:`register` in the API server process, the EngineCore process and every
worker.  It is idempotent and has no effect until called (no import-time side effects).
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger("vllm.hae_vllm")  # under vLLM's logger: its handlers and level apply

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
    """Override every backend in ``SUPPORTED`` with its eviction subclass (by class path: the
    class is built, and the upstream module imported, only if vLLM picks that backend).

    ``HAE_VLLM_TEST_UNREGISTERED_BACKENDS`` (comma-separated enum names) is for tests only: it
    leaves those backends plain, to prove that eviction refuses to start on them."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from hae_vllm.attention.backends import SUPPORTED, eviction_class_path

    from hae_vllm import envs

    skip = envs.unregistered_backends()
    for member in SUPPORTED:
        if member not in skip:
            register_backend(getattr(AttentionBackendEnum, member), eviction_class_path(member))


def register() -> None:
    global _registered
    with _lock:
        if _registered:
            return
        _check_version()
        from hae_vllm.patches import engine_args, metrics, mm_resubmit, model_runner, requests

        engine_args.apply()
        requests.apply()
        mm_resubmit.apply()
        metrics.apply()
        model_runner.apply()
        register_attention_backends()
        _registered = True
