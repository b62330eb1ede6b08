"""Backend-independent pieces shared by the CPU and CUDA eviction backends."""

from __future__ import annotations

import dataclasses

import torch

from hae_vllm.worker.runtime import current_runtime


def without_holes(common_attn_metadata, block_size: int):
    """CommonAttentionMetadata with null holes removed from every block-table row.

    Untouched (same object) when no request of this process has holes.  Runs every step
    before attention: on the host it is a gather and a subtraction into buffers the hole
    table reuses (:meth:`~hae_vllm.worker.holes.HoleTable.drop`) and a shallow copy."""
    rt = current_runtime()
    if rt is None or not rt.has_holes():
        return common_attn_metadata
    cam = common_attn_metadata
    n = cam.num_reqs
    res = rt.drop_holes(cam.block_table_tensor, cam.seq_lens, block_size, n)
    if res is None:
        return cam
    table, seq_lens = res
    if not n:
        max_seq_len = cam.max_seq_len
    elif seq_lens.device.type == "cpu":
        max_seq_len = int(seq_lens.numpy()[:n].max())
    else:
        max_seq_len = int(seq_lens[:n].max().item())
    changes = dict(block_table_tensor=table, seq_lens=seq_lens, max_seq_len=max_seq_len)
    ub = getattr(cam, "seq_lens_cpu_upper_bound", None)
    if ub is not None and ub.device == seq_lens.device and ub.shape == seq_lens.shape and ub.dtype == seq_lens.dtype:
        changes["seq_lens_cpu_upper_bound"] = seq_lens  # exact lengths bound themselves (read only)
    elif ub is not None:
        ub = ub.clone()
        ub[:n] = seq_lens[:n].to(ub.device, ub.dtype)
        changes["seq_lens_cpu_upper_bound"] = ub
    if hasattr(cam, "__dict__") and dataclasses.is_dataclass(cam):
        # A shallow copy without dataclasses.replace's re-validation (all fields are set).
        out = object.__new__(type(cam))
        out.__dict__.update(cam.__dict__)
        out.__dict__.update(changes)
        return out
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
