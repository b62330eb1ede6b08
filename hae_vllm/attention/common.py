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
    if rt is None or not rt.holes.num_requests:
        return common_attn_metadata
    cam = common_attn_metadata
    n = cam.num_reqs
    try:  # host tensors: numpy views (one touch of each tensor; cheaper than torch per step)
        bt, sl = cam.block_table_tensor.numpy(), cam.seq_lens.numpy()
    except TypeError:
        bt = None
    if bt is not None and not rt.holes.check:
        res = rt.holes.drop_host(bt, sl, block_size, rt.runner.input_batch.req_ids, n)
    else:
        res = rt.drop_holes(cam.block_table_tensor, cam.seq_lens, block_size, n)
    if res is None:
        return cam
    table, seq_lens = res
    if not n:
        max_seq_len = cam.max_seq_len
    elif bt is not None:
        out_lens = rt.holes.host_seq_lens()
        max_seq_len = int(out_lens[0]) if n == 1 else int(out_lens[:n].max())
    else:
        max_seq_len = int(seq_lens[:n].max().item())
    changes = {"block_table_tensor": table, "seq_lens": seq_lens, "max_seq_len": max_seq_len}
    ub = getattr(cam, "seq_lens_cpu_upper_bound", None)
    if ub is not None:
        if bt is not None and ub.is_cpu and ub.shape == seq_lens.shape and ub.dtype == seq_lens.dtype:
            changes["seq_lens_cpu_upper_bound"] = seq_lens  # exact lengths bound themselves (read only)
        else:
            ub = ub.clone()
            ub[:n] = seq_lens[:n].to(ub.device, ub.dtype)
            changes["seq_lens_cpu_upper_bound"] = ub
    d = getattr(cam, "__dict__", None)
    if d is not None and dataclasses.is_dataclass(cam):
        # A shallow copy without dataclasses.replace's re-validation (all fields are set).
        out = object.__new__(type(cam))
        out.__dict__.update(d)
        out.__dict__.update(changes)
        return out
    return dataclasses.replace(cam, **changes)


def maybe_score(impl, layer, query: torch.Tensor, key: torch.Tensor, kv_cache: torch.Tensor, attn_metadata) -> None:
    """Run layer-0 dual-attention scoring when this is the scoring layer and a request needs it."""
    if attn_metadata is None:
        return
    rt = current_runtime()
    if rt is None:
        return
    name = getattr(layer, "layer_name", None)
    plan = rt.decode_append
    if plan is not None:
        # Most decode steps with score_interval k > 1: this step's layer-0 key and query join
        # the bank, nothing is scored, and no other layer has work.
        if name == plan[0]:
            rt.decode.append(plan, query, key)
        return
    if not rt.wants_scoring(name):
        return
    qsl = getattr(attn_metadata, "query_start_loc_cpu", None)
    if qsl is None:
        qsl = attn_metadata.query_start_loc
    # Scoring reads what attention reads: with an fp8 cache, this step's keys as stored
    # (rounded through the format and the layer's scale), like every earlier key it gathers.
    key = rt.layout().as_stored_keys(key, kv_cache)
    rt.score(impl, name, query, key, kv_cache, qsl.cpu())
