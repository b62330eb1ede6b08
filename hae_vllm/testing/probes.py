"""Functions run inside vLLM's worker processes (``LLM.collective_rpc``) to prove, from
where it matters, that hae_vllm's patches took effect."""

from __future__ import annotations

import os


def probe_worker(worker) -> dict:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from hae_vllm.patches import is_patched
    from hae_vllm.worker.runtime import current_runtime

    runner = worker.model_runner
    ctx = runner.compilation_config.static_forward_context
    impls = sorted({type(layer.impl).__name__ for layer in ctx.values() if hasattr(layer, "impl")})
    builders = sorted(
        {type(b).__name__ for g in getattr(runner, "attn_groups", []) for ag in g for b in getattr(ag, "metadata_builders", [])}
    )
    return {
        "pid": os.getpid(),
        "runner_patched": {
            name: is_patched(getattr(GPUModelRunner, name)) for name in ("_update_states", "execute_model", "sample_tokens", "initialize_attn_backend")
        },
        "attention_impls": impls,
        "metadata_builders": builders,
        "runtime_active": current_runtime() is not None,
    }


def attention_backends(worker) -> list[str]:
    """The attention backends vLLM chose for this worker's layers (``get_name()``, with
    ``+eviction`` where hae_vllm's subclass runs), sorted."""
    from hae_vllm.attention.backends import is_eviction_backend

    runner = worker.model_runner
    return sorted({ag.backend.get_name() + ("+eviction" if is_eviction_backend(ag.backend) else "")
                   for g in getattr(runner, "attn_groups", []) for ag in g})
