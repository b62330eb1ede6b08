"""Scheduler side of the recycle bin: parked KV blocks that count as free but stay readable.

Parking uses vLLM's release-until-reuse primitive, ``BlockPool.unpin_blocks(blocks, on_reuse)``:
the block joins the tail of the free queue (its memory is available to every request at once)
and keeps its content until the pool hands it out again, when ``on_reuse`` fires.  Until then
the owner may take it back with no data movement (:meth:`RecycleBin.restore`).

Invariants (tested with exact block ids in tests/test_recycle_bin.py):

* a parked block is referenced by no request (its slot in ``req_to_blocks`` is the null block)
  and sits in the free queue;
* a block is in at most one request's bin;
* restore succeeds only while the block has not been reused; it then leaves the free queue
  with ``ref_cnt == 1`` and fills the request's hole again;
* dropping a request's bin (finish, preemption) frees nothing: parked blocks already count as
  free.
"""

from __future__ import annotations

from hae_vllm.protocol import BinUpdates


class RecycleBin:
    def __init__(self, block_pool, null_block) -> None:
        self.pool = block_pool
        self.null_block = null_block
        self.parked: dict[str, dict[int, int]] = {}  # req_id -> {block_id: logical index}
        self.owner: dict[int, str] = {}  # block_id -> req_id
        self.updates: dict[str, BinUpdates] = {}
        self.num_parked = 0
        self.num_restored = 0
        self.num_lost = 0
        self.num_released = 0

    def _update(self, req_id: str) -> BinUpdates:
        return self.updates.setdefault(req_id, BinUpdates())

    def park(self, req_id: str, blocks: list, index: int) -> None:
        """Move ``blocks[index]`` of a request into its bin (the slot becomes a null hole)."""
        block = blocks[index]
        assert not block.is_null and block.ref_cnt == 1 and block.block_hash is None, (
            f"cannot park block {block.block_id}: null, shared or cached"
        )
        blocks[index] = self.null_block
        self.parked.setdefault(req_id, {})[block.block_id] = index
        self.owner[block.block_id] = req_id
        self.pool.unpin_blocks([block], on_reuse=self._on_reuse)
        self.num_parked += 1

    def _on_reuse(self, block) -> None:
        req_id = self.owner.pop(block.block_id, None)
        if req_id is None:
            return  # released or dropped earlier: nothing to tell
        self.parked[req_id].pop(block.block_id, None)
        self._update(req_id).lost.append(block.block_id)
        self.num_lost += 1

    def restore(self, req_id: str, blocks: list, block_id: int, index: int) -> bool:
        """Take a parked block back into hole ``index``; False if it was reused meanwhile."""
        if self.owner.get(block_id) != req_id or self.parked.get(req_id, {}).get(block_id) != index:
            return False
        if not blocks[index].is_null:
            return False
        block = self.pool.blocks[block_id]
        assert block.ref_cnt == 0 and not block.is_null
        self.pool.touch([block])  # leaves the free queue, ref_cnt 1
        blocks[index] = block
        del self.parked[req_id][block_id]
        del self.owner[block_id]
        self._update(req_id).restored.append((index, block_id))
        self.num_restored += 1
        return True

    def release(self, req_id: str, block_id: int) -> None:
        """Final release: forget a parked block (it is already free)."""
        if self.owner.get(block_id) == req_id:
            del self.owner[block_id]
            self.parked[req_id].pop(block_id, None)
            self.num_released += 1

    def drop_request(self, req_id: str) -> None:
        for block_id in self.parked.pop(req_id, {}):
            self.owner.pop(block_id, None)
        self.updates.pop(req_id, None)

    def take_updates(self) -> dict[str, BinUpdates]:
        updates, self.updates = self.updates, {}
        return updates

    def occupancy(self) -> int:
        return len(self.owner)
