"""The model runner as eviction sees it.

Two jobs, one owner each:

* what the stages read from vLLM's runner: block size, the attention layers in decoder order,
  their KV caches and slot layout, the physical slots of a request's positions, the tensor-
  parallel group;
* the only code that edits the runner's block tables (:meth:`RunnerView.null_blocks`,
  :meth:`RunnerView.restore_block`): a request's cached block list (used when it re-enters
  the persistent batch) and its row of the persistent batch, kept in step with the hole table
  the attention backends read (:class:`~hae_vllm.worker.holes.HoleTable`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from hae_vllm.kv_format import KVFormat
from hae_vllm.layout import SlotLayout
from hae_vllm.worker.holes import HoleTable

if TYPE_CHECKING:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner


class RunnerView:
    def __init__(self, runner: "GPUModelRunner", check_holes: bool = False) -> None:
        self.runner = runner
        self.holes = HoleTable(check=check_holes)
        self._layout: SlotLayout | None = None
        self._layer_names: list[str] | None = None
        self._ordinal: dict[str, int] = {}
        self._plain_keys: bool | None = None
        self.tp_group = None
        self.tp_size = 1
        self.tp_rank = 0
        try:
            from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size, get_tp_group

            self.tp_size = get_tensor_model_parallel_world_size()
            if self.tp_size > 1:
                self.tp_group = get_tp_group()
            self.tp_rank = get_tensor_model_parallel_rank()
        except Exception:  # not initialised (unit tests)
            pass

    # ------------------------------------------------------------------ reading
    @property
    def block_size(self) -> int:
        return self.runner.kv_cache_config.kv_cache_groups[0].kv_cache_spec.block_size

    @property
    def prefix_caching(self) -> bool:
        cache = getattr(self.runner, "cache_config", None)
        return bool(getattr(cache, "enable_prefix_caching", False))

    def attention_layers(self) -> list[str]:
        """Names of the attention layers, in decoder order (ordinal 0 scores)."""
        if self._layer_names is None:
            from vllm.model_executor.models.utils import extract_layer_index

            groups = self.runner.kv_cache_config.kv_cache_groups
            names = sorted((n for g in groups for n in g.layer_names), key=extract_layer_index)
            self._layer_names = names
            self._ordinal = {n: i for i, n in enumerate(names)}
        return self._layer_names

    def ordinal(self, layer_name: str | None) -> int:
        """Decoder-order index of an attention layer (-1: not one)."""
        self.attention_layers()
        return self._ordinal.get(layer_name, -1)

    @property
    def scoring_layer(self) -> str:
        return self.attention_layers()[0]

    def layer(self, name: str):
        return self.runner.compilation_config.static_forward_context[name]

    def layout(self) -> SlotLayout:
        """Where each slot's key and value elements live in a cache tensor, probed once through
        the backend's own cache-update op (:class:`~hae_vllm.layout.SlotLayout`)."""
        if self._layout is None:
            layer = self.layer(self.scoring_layer)
            kv = layer.kv_cache
            spec = self.runner.kv_cache_config.kv_cache_groups[0].kv_cache_spec
            impl = layer.impl

            def write(k, v, cache, slots):
                impl.do_kv_cache_update(layer, k, v, cache, slots)

            fmt = KVFormat.of_layers(impl, [self.layer(n) for n in self.attention_layers()], self.runner.dtype)
            self._layout = SlotLayout.probe(
                write,
                tuple(kv.shape),
                kv.dtype,
                self.runner.kv_cache_config.num_blocks,
                spec.block_size,
                spec.num_kv_heads,
                spec.head_size,
                device=kv.device,
                kv_format=fmt,
                write_scales=fmt.scales_of(kv),
            )
        return self._layout

    def caches(self) -> list[torch.Tensor]:
        """Every attention layer's KV cache tensor, once each (one plan, all layers)."""
        seen: set[int] = set()
        caches = []
        for name in self.attention_layers():
            kv = self.layer(name).kv_cache
            if kv.data_ptr() not in seen:
                seen.add(kv.data_ptr())
                caches.append(kv)
        return caches

    def slots(self, block_ids: list[int], positions) -> torch.Tensor:
        """Physical slots of logical ``positions`` (any int sequence) of a request; int64, CPU."""
        bs = self.block_size
        pos = np.asarray(positions, dtype=np.int64)
        table = np.asarray(block_ids, dtype=np.int64)
        return torch.from_numpy(table[pos // bs] * bs + pos % bs)

    def keys_as_computed(self) -> bool:
        """The cache stores keys as the layer computed them (no fp8 rounding to mirror)."""
        if self._plain_keys is None:
            self._plain_keys = not self.layout().kv_format.quantized
        return self._plain_keys

    @property
    def batch_req_ids(self) -> list[str]:
        """Request ids in persistent-batch row order (the rows of the attention metadata)."""
        return self.runner.input_batch.req_ids

    # ------------------------------------------------------------------ the table edits
    def null_blocks(self, req_id: str, indices) -> None:
        """Block-table entries ``indices`` of ``req_id`` become the null block (id 0): holes
        attention skips, whose blocks the scheduler frees or parks."""
        req = self.runner.requests[req_id]
        batch = self.runner.input_batch
        table = batch.block_table[0].block_table.np
        row = batch.req_id_to_index[req_id]
        for h in indices:
            req.block_ids[0][h] = 0
            table[row, h] = 0
        self.holes.add(req_id, len(indices))

    def restore_block(self, req_id: str, index: int, block_id: int) -> bool:
        """A parked block re-enters ``req_id``'s table at ``index``; False when the request is
        gone from the runner."""
        req = self.runner.requests.get(req_id)
        if req is None:
            return False
        req.block_ids[0][index] = block_id
        self.holes.changed()
        batch = self.runner.input_batch
        row = batch.req_id_to_index.get(req_id)
        if row is not None:
            batch.block_table[0].block_table.np[row, index] = block_id
        return True

    def note_session(self, req_id: str, num_tokens: int) -> None:
        """A conversation hit (hae_vllm.engine.sessions): the scheduler put null placeholders
        where the earlier request had holes; the hole table learns how many."""
        req = self.runner.requests.get(req_id)
        if req is None:
            return
        num_holes = sum(1 for b in req.block_ids[0][: num_tokens // self.block_size] if b == 0)
        if num_holes:
            self.holes.add(req_id, num_holes)
