"""Every environment variable hae_vllm reads, in one place (vLLM's ``vllm/envs.py`` style).

Read when asked, not at import: engine processes inherit the environment their parent set up,
and the tests change it between engines.

=================================== ========================================================
``HAE_VLLM_KERNELS``                ``auto`` (default: Triton kernels on CUDA, torch on the
                                    CPU), ``triton`` or ``torch``: force the scoring and
                                    compaction implementation.
``HAE_VLLM_CHECK_HOLES``            ``1``: every step checks the cached hole removal against
                                    the direct computation (the test suite sets it).
``HAE_VLLM_CHECK_DECODE``           ``1``: every decode step checks the decode bank's
                                    incremental bookkeeping against a recomputation (tests).
``HAE_VLLM_DEFER_SCORING_BYTES``    bytes of layer queries a request may keep to be scored at
                                    selection (default 64 MiB; 0 scores in the forward).
``HAE_VLLM_TEST_UNREGISTERED_BACKENDS`` tests only: attention backends (comma-separated enum
                                    names) the plugin leaves unpatched, to test the refusal.
``HAE_VLLM_MODEL_CACHE``            where the tiny test checkpoints live
                                    (:mod:`hae_vllm.testing.inputs`).
``HAE_VLLM_MM_RESUBMIT``            ``0``: a request that hits vLLM's multimodal-cache drift
                                    is answered as vLLM does (500) instead of re-rendered and
                                    re-submitted once (:mod:`hae_vllm.patches.mm_resubmit`).
=================================== ========================================================
"""

from __future__ import annotations

import os

DEFAULT_DEFER_SCORING_BYTES = 64 << 20


def kernels() -> str:
    return os.environ.get("HAE_VLLM_KERNELS", "auto")


def check_holes() -> bool:
    return os.environ.get("HAE_VLLM_CHECK_HOLES", "") == "1"


def check_decode() -> bool:
    return os.environ.get("HAE_VLLM_CHECK_DECODE", "") == "1"


def defer_scoring_bytes() -> int:
    return int(os.environ.get("HAE_VLLM_DEFER_SCORING_BYTES", DEFAULT_DEFER_SCORING_BYTES))


def unregistered_backends() -> set[str]:
    return {s.strip() for s in os.environ.get("HAE_VLLM_TEST_UNREGISTERED_BACKENDS", "").split(",") if s.strip()}


def model_cache() -> str | None:
    return os.environ.get("HAE_VLLM_MODEL_CACHE") or None


def mm_resubmit() -> bool:
    return os.environ.get("HAE_VLLM_MM_RESUBMIT", "1") != "0"
