"""Backend-independent pieces shared by the CPU and CUDA eviction backends."""

from __future__ import annotations

import dataclasses

import torch

from hae_vllm.worker.runtime import current_runtime


def without_holes(common_attn_metadata, block_size: int):
    """CommonAttentionMetadata with null holes removed from every block-table row.

    Untouched (same object) when no request of this process has holes."""
    rt = current_runtime()
    if rt is None or not rt.has_holes():
        return common_attn_metadata
    cam = common_attn_metadata
    n = cam.num_reqs
    res = rt.drop_holes(cam.block_table_tensor[:n], cam.seq_lens[:n], block_size)
    if res is None:
        return cam
    table, seq_lens = res
    full_table = cam.block_table_tensor.clone()
    full_table[:n] = table
    full_seq = cam.seq_lens.clone()
    full_seq[:n] = seq_lens
    if not n:
        max_seq_len = cam.max_seq_len
    elif seq_lens.device.type == "cpu":
        max_seq_len = int(seq_lens.numpy().max())
    else:
        max_seq_len = int(seq_lens.max().item())
    changes = dict(block_table_tensor=full_table, seq_lens=full_seq, max_seq_len=max_seq_len)
    if getattr(cam, "seq_lens_cpu_upper_bound", None) is not None:
        ub = cam.seq_lens_cpu_upper_bound.clone()
        ub[:n] = seq_lens.to(ub.device, ub.dtype)
        changes["seq_lens_cpu_upper_bound"] = ub
    return dataclasses.replace(cam, **changes)


def maybe_score(impl, layer, query: torch.Tensor, key: torch.Tensor, kv_cache: torch.Tensor, attn_metadata) -> None:
    """Run layer-0 dual-attention scoring when this is the scoring layer and a request needs it."""
    if attn_metadata is None:
        return
    rt = current_runtime()
    name = getattr(layer, "layer_name", None)
    if rt is None or not rt.wants_scoring(name):
        return
    qsl = getattr(attn_metadata, "query_start_loc_cpu", None)
    if qsl is None:
        qsl = attn_metadata.query_start_loc
    # Scoring reads what attention reads: with an fp8 cache, this step's keys as stored
    # (rounded through the format and the layer's scale), like every earlier key it gathers.
    key = rt.layout().as_stored_keys(key, kv_cache)
    rt.score(impl, name, query, key, kv_cache, qsl.cpu())
