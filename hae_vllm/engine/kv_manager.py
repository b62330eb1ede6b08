"""Scheduler-side block accounting for evicted blocks.

:class:`EvictableFullAttentionManager` is a ``FullAttentionManager`` with two additions:

* :meth:`release_blocks` replaces a request's evicted blocks by the null block and frees them
  into the block pool (the same move vLLM makes for sliding-window attention).  The invariant
  ``len(req_to_blocks[r]) == cdiv(logical_tokens, block_size)`` is kept: holes are null
  placeholders, so every later allocation computes the right number of new blocks.
* requests that may evict register in the prefix cache only the blocks before their first
  eviction candidate (:mod:`hae_vllm.prefix`), which the worker never rewrites; a compacted
  or parked block no longer holds what its hash says and is never registered.  They read the
  prefix cache as usual: the hit blocks are shared, and the worker never moves tokens inside
  them.
"""

from __future__ import annotations

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

class EvictionAccountingError(RuntimeError):
    pass


class EvictableFullAttentionManager(FullAttentionManager):
    """Existing FullAttentionManager instances are re-classed in place
    (:func:`hae_vllm.patches.kv_cache_manager.patch_full_attention_manager`, called by
    :class:`hae_vllm.engine.scheduler.EvictionScheduler`), which then hands it ``records``: the
    scheduler's per-request records (``RequestRecord``), read here, never written."""

    records: dict = {}

    def cache_blocks(self, request, num_tokens, retention_interval=None, *, replay_boundaries):
        rec = self.records.get(request.request_id)
        if rec is not None and rec.may_evict:
            num_tokens = min(num_tokens, rec.untouched_tokens)
            if rec.hit is not None:
                # After a session hit every token was computed over the kept (compacted) cache:
                # its KV is not what the content hash of those tokens promises.
                num_tokens = min(num_tokens, rec.hit_tokens)
            if num_tokens < self.block_size:
                return
        super().cache_blocks(
            request, num_tokens, retention_interval, replay_boundaries=replay_boundaries
        )

    def release_blocks(self, request_id: str, block_indices) -> int:
        """Turn ``block_indices`` of a request into null holes and free the blocks.

        Returns the number of blocks freed."""
        blocks = self.req_to_blocks.get(request_id)
        if blocks is None:
            return 0
        freed = []
        for i in block_indices:
            if i >= len(blocks):
                raise EvictionAccountingError(
                    f"request {request_id}: hole block {i} beyond its {len(blocks)} blocks"
                )
            block = blocks[i]
            if block.is_null:
                raise EvictionAccountingError(f"request {request_id}: block {i} is already a hole")
            if block.ref_cnt != 1 or block.block_hash is not None:
                # Shared or registered in the prefix cache: the worker must never have
                # rewritten it.  Refuse loudly rather than corrupt another request.
                raise EvictionAccountingError(
                    f"request {request_id}: block {block.block_id} (index {i}) is shared "
                    f"(ref_cnt={block.ref_cnt}) or cached and cannot be evicted"
                )
            blocks[i] = self._null_block
            freed.append(block)
        self.block_pool.free_blocks(freed)
        return len(freed)
