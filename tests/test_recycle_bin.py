"""Recycle-bin block accounting on vLLM's real BlockPool, with exact block ids, and the
data path: parked KV is bit-identical when restored."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hae_vllm.engine.recycle_bin import RecycleBin
from hae_vllm.layout import SlotLayout
from hae_vllm.plan import plan_compaction

BlockPool = pytest.importorskip("vllm.v1.core.block_pool").BlockPool


def make_pool(n=16):
    pool = BlockPool(num_gpu_blocks=n, enable_caching=False, hash_block_size=16)
    return pool, RecycleBin(pool, pool.null_block)


def test_park_restore_exact_ids():
    pool, bin_ = make_pool(8)
    blocks = pool.get_new_blocks(3)
    ids = [b.block_id for b in blocks]
    assert ids == [1, 2, 3]
    free0 = pool.get_num_free_blocks()
    bin_.park("r", blocks, 1)
    assert blocks[1].is_null and pool.get_num_free_blocks() == free0 + 1
    assert bin_.restore("r", blocks, 2, 1)
    assert blocks[1].block_id == 2 and blocks[1].ref_cnt == 1
    assert pool.get_num_free_blocks() == free0
    assert bin_.take_updates()["r"].restored == [(1, 2)]


def test_reused_block_is_lost_not_restored():
    pool, bin_ = make_pool(5)  # null + 4 usable
    blocks = pool.get_new_blocks(2)  # ids 1, 2
    bin_.park("r", blocks, 0)  # block 1 parked at the tail of the free queue
    other = pool.get_new_blocks(3)  # 3, 4, then the parked 1
    assert 1 in [b.block_id for b in other]
    upd = bin_.take_updates()["r"]
    assert upd.lost == [1]
    assert not bin_.restore("r", blocks, 1, 0)
    assert blocks[0].is_null


def _check(pool, bin_, reqs):
    owned = [b for blocks in reqs.values() for b in blocks if not b.is_null]
    ids = [b.block_id for b in owned]
    assert len(ids) == len(set(ids)), "a block is owned twice"
    free_ids = {b.block_id for b in pool.free_block_queue.get_all_free_blocks()}
    assert not (set(ids) & free_ids), "an owned block is in the free queue"
    assert all(b.ref_cnt == 1 for b in owned)
    for bid in bin_.owner:
        assert bid in free_ids and pool.blocks[bid].ref_cnt == 0
    assert pool.get_num_free_blocks() + len(owned) == pool.num_gpu_blocks - 1


ops = st.lists(
    st.tuples(st.sampled_from(["alloc", "park", "restore", "release", "finish", "preempt", "pressure"]),
              st.integers(0, 3), st.integers(0, 100)),
    min_size=1, max_size=60,
)


@settings(max_examples=2000, deadline=None)
@given(ops)
def test_random_sequences_no_leak_no_double_free(seq):
    pool, bin_ = make_pool(24)
    reqs: dict[str, list] = {}
    for op, r, x in seq:
        rid = f"r{r}"
        blocks = reqs.get(rid)
        if op == "alloc":
            n = 1 + x % 3
            if pool.get_num_free_blocks() >= n:
                reqs.setdefault(rid, []).extend(pool.get_new_blocks(n))
        elif op == "park" and blocks:
            live = [i for i, b in enumerate(blocks) if not b.is_null]
            if live:
                bin_.park(rid, blocks, live[x % len(live)])
        elif op == "restore" and blocks and bin_.parked.get(rid):
            bid, idx = sorted(bin_.parked[rid].items())[x % len(bin_.parked[rid])]
            bin_.restore(rid, blocks, bid, idx)
        elif op == "release" and bin_.parked.get(rid):
            bid = sorted(bin_.parked[rid])[x % len(bin_.parked[rid])]
            bin_.release(rid, bid)
        elif op in ("finish", "preempt") and blocks is not None:
            bin_.drop_request(rid)
            pool.free_blocks(reversed(reqs.pop(rid)))
        elif op == "pressure":
            n = min(pool.get_num_free_blocks(), 1 + x % 6)
            if n:
                grabbed = pool.get_new_blocks(n)
                pool.free_blocks(grabbed)
        bin_.take_updates()
        _check(pool, bin_, reqs)
    for rid in list(reqs):
        bin_.drop_request(rid)
        pool.free_blocks(reversed(reqs.pop(rid)))
    assert pool.get_num_free_blocks() == pool.num_gpu_blocks - 1
    assert not bin_.owner


def test_parked_kv_is_bit_identical():
    """Swap-compaction puts the victims' KV, bit for bit, into the parked blocks."""
    bs, H, D, nb = 16, 2, 8, 8

    def write(k, v, cache, slots):
        b, o = slots // bs, slots % bs
        cache[0, b, o] = k
        cache[1, b, o] = v

    layout = SlotLayout.probe(write, (2, nb, bs, H, D), torch.bfloat16, nb, bs, H, D)
    cache = torch.zeros(2, nb, bs, H, D, dtype=torch.bfloat16)
    table = np.array([5, 2, 7, 1])  # logical block -> physical block
    T = 60
    kv = torch.randn(T, 2, H, D).to(torch.bfloat16)
    slots = torch.as_tensor(table[np.arange(T) // bs] * bs + np.arange(T) % bs)
    write(kv[:, 0], kv[:, 1], cache, slots)
    rng = np.random.default_rng(0)
    victims = rng.permutation(T - 12)[:bs]  # one block's worth, scattered
    plan = plan_compaction(victims, T, bs)
    phys = lambda s: torch.as_tensor(table[np.asarray(s) // bs] * bs + np.asarray(s) % bs)  # noqa: E731
    layout.swap(cache, phys(plan.move_src), phys(plan.move_dst))
    (h,) = plan.hole_blocks
    parked = layout.gather(cache, torch.as_tensor(table[h] * bs + np.arange(bs)))
    # Every victim's K and V is in the parked block, bit-identical.
    got = {tuple(parked[i].flatten().view(torch.int16).tolist()) for i in range(bs)}
    want = {tuple(kv[v].flatten().view(torch.int16).tolist()) for v in victims}
    assert got == want
    # And every kept token is still somewhere outside the hole, bit-identical.
    kept = sorted(set(range(T)) - set(victims.tolist()))
    live_slots = [s for s in range(T) if s // bs != h]
    rest = layout.gather(cache, phys(live_slots))
    got_rest = {tuple(r.flatten().view(torch.int16).tolist()) for r in rest}
    assert {tuple(kv[k].flatten().view(torch.int16).tolist()) for k in kept} <= got_rest
