"""hae_vllm: Hierarchical Adaptive Eviction of multimodal KV caches inside vLLM V1.

Serving: ``vllm serve MODEL --kv-eviction hae [--kv-eviction-config JSON|FILE|PRESET]``.
Offline::

    from vllm import LLM
    import hae_vllm
    llm = LLM(model=..., additional_config=hae_vllm.kv_eviction("hae", budget=0.5))
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def kv_eviction(method: str = "hae", config: str | None = None, **settings: Any) -> dict[str, Any]:
    """``additional_config`` for ``vllm.LLM`` turning eviction on, validated now.

    ``config`` is what ``--kv-eviction-config`` takes (inline JSON, YAML path or preset name);
    ``settings`` override single fields (e.g. ``budget=0.4``)."""
    from hae_vllm.config import CONFIG_KEY, build_engine_config

    return {CONFIG_KEY: build_engine_config(method, config, **settings).to_dict()}
