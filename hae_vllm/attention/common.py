"""What the eviction backends (CPU and CUDA) call: the worker's eviction runtime, through two
named hooks (:class:`~hae_vllm.worker.runtime.EvictionRuntime`), and nothing else."""

from __future__ import annotations

import torch

from hae_vllm.worker.runtime import current_runtime


def without_holes(common_attn_metadata, block_size: int):
    """CommonAttentionMetadata with null holes removed from every block-table row (the same
    object when no request of this process has holes)."""
    rt = current_runtime()
    if rt is None:
        return common_attn_metadata
    return rt.strip_holes(common_attn_metadata, block_size)


def maybe_score(impl, layer, query: torch.Tensor, key: torch.Tensor, kv_cache: torch.Tensor, attn_metadata) -> None:
    """After a layer wrote this step's KV: layer-0 dual-attention scoring (and decode scoring)
    when this is a layer a request scores at."""
    if attn_metadata is None:
        return
    rt = current_runtime()
    if rt is not None:
        rt.after_kv_write(impl, layer, query, key, kv_cache, attn_metadata)
