"""What the eviction backends (CPU and CUDA) call: the worker's eviction runtime, through two
named hooks (:class:`~hae_vllm.worker.runtime.EvictionRuntime`), and nothing else."""

from __future__ import annotations

import torch

from hae_vllm.protocol import QUERY_STARTS_ATTR
from hae_vllm.worker.runtime import current_runtime


def without_holes(common_attn_metadata, block_size: int):
    """CommonAttentionMetadata with null holes removed from every block-table row (the same
    object when no request of this process has holes)."""
    rt = current_runtime()
    if rt is None:
        return common_attn_metadata
    return rt.strip_holes(common_attn_metadata, block_size)


def with_query_starts(attn_metadata, common_attn_metadata):
    """``attn_metadata`` carrying the step's host query starts (``QUERY_STARTS_ATTR``), which
    scoring needs to split the step's queries by request: FlashInfer's metadata has no
    ``query_start_loc`` at all, FlashAttention's only a device copy (reading it would
    synchronise with the GPU on every scoring layer)."""
    setattr(attn_metadata, QUERY_STARTS_ATTR, common_attn_metadata.query_start_loc_cpu)
    return attn_metadata


def maybe_score(impl, layer, query: torch.Tensor, key: torch.Tensor, kv_cache: torch.Tensor, attn_metadata) -> None:
    """After a layer wrote this step's KV: layer-0 dual-attention scoring (and decode scoring)
    when this is a layer a request scores at."""
    if attn_metadata is None:
        return
    rt = current_runtime()
    if rt is not None:
        rt.after_kv_write(impl, layer, query, key, kv_cache, attn_metadata)
