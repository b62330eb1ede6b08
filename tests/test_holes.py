"""Attention metadata without holes: null blocks dropped, seq_lens shortened."""

import pytest
import torch

from hae_vllm.worker.holes import _drop_hole_blocks_torch, drop_hole_blocks


@pytest.mark.parametrize("fn", [drop_hole_blocks, _drop_hole_blocks_torch], ids=["host", "device-path"])
def test_drop_hole_blocks_rows(fn):
    bs = 4
    table = torch.tensor(
        [
            [5, 0, 7, 0, 9, 0, 0],  # 5 live blocks, holes at 1 and 3 (seq 18 -> 5 blocks)
            [3, 4, 0, 0, 0, 0, 0],  # no holes (2 blocks, padding after)
            [0, 6, 8, 11, 0, 0, 0],  # hole at 0; an allocated lookahead block 11 beyond seq
        ],
        dtype=torch.int32,
    )
    seq = torch.tensor([18, 7, 9], dtype=torch.int32)
    out = fn(table, seq, bs)
    assert out is not None
    t, s = out
    assert t[0, :3].tolist() == [5, 7, 9]
    assert t[1, :2].tolist() == [3, 4]
    assert t[2, :3].tolist() == [6, 8, 11]
    assert s.tolist() == [10, 7, 5]
    assert s.dtype == seq.dtype


@pytest.mark.parametrize("fn", [drop_hole_blocks, _drop_hole_blocks_torch], ids=["host", "device-path"])
def test_no_holes_returns_none(fn):
    table = torch.tensor([[1, 2, 0, 0]], dtype=torch.int32)
    assert fn(table, torch.tensor([5]), 4) is None


def test_host_and_device_paths_agree_on_random_tables():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n, mb, bs = 7, 12, 4
        table = torch.randint(1, 100, (n, mb), generator=g, dtype=torch.int32)
        table[torch.rand(n, mb, generator=g) < 0.3] = 0
        table[:, 0] = torch.randint(1, 100, (n,), generator=g, dtype=torch.int32)
        seq = torch.randint(1, mb * bs, (n,), generator=g, dtype=torch.int32)
        # the tail block (where decode writes) is never a hole
        rows = torch.arange(n)
        table[rows, (seq - 1) // bs] = torch.randint(1, 100, (n,), generator=g, dtype=torch.int32)
        a, b = drop_hole_blocks(table, seq, bs), _drop_hole_blocks_torch(table, seq, bs)
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _runtime(req_ids, check=True):
    from types import SimpleNamespace

    from hae_vllm.config import EvictionConfig
    from hae_vllm.worker.runtime import EvictionRuntime

    rt = EvictionRuntime(SimpleNamespace(input_batch=SimpleNamespace(req_ids=req_ids)), EvictionConfig())
    rt.holes.check = check
    return rt


def _batch():
    table = torch.tensor([[5, 0, 7, 9, 0], [3, 4, 6, 0, 0], [0, 8, 2, 0, 0]], dtype=torch.int32)
    seq = torch.tensor([15, 10, 10], dtype=torch.int32)  # block size 4: 4, 3 and 3 blocks
    return table, seq


def test_cached_hole_removal_follows_rows_and_versions():
    ids = ["a", "b", "c"]
    rt = _runtime(ids)
    table, seq = _batch()
    for _ in range(2):  # second call: served from the cache, same answer
        t, s = rt.drop_holes(table, seq, 4)
        ref = drop_hole_blocks(table, seq, 4)
        assert torch.equal(t, ref[0]) and torch.equal(s, ref[1])
    assert s.tolist() == [11, 10, 6]
    # Decode appends: a longer sequence and a new block, same holes -> still the cached order.
    seq2 = seq + torch.tensor([2, 0, 0], dtype=torch.int32)
    table[0, 4] = 11
    t, s = rt.drop_holes(table, seq2, 4)
    assert t[0, :4].tolist() == [5, 7, 9, 11] and s[0].item() == 13
    # Rows reordered by the batch: recomputed.
    ids[:] = ["c", "a", "b"]
    t, s = rt.drop_holes(table[[2, 0, 1]], seq2[[2, 0, 1]], 4)
    assert s.tolist() == [6, 13, 10]
    # A hole restored (with the version bump the runtime makes): recomputed.
    table2 = table[[2, 0, 1]].clone()
    table2[1, 1] = 12
    rt.holes.changed()
    t, s = rt.drop_holes(table2, seq2[[2, 0, 1]], 4)
    assert t[1, :4].tolist() == [5, 12, 7, 9] and s.tolist() == [6, 17, 10]


def test_check_mode_catches_a_hole_change_without_version_bump():
    ids = ["a", "b", "c"]
    rt = _runtime(ids)
    table, seq = _batch()
    rt.drop_holes(table, seq, 4)
    table[1, 1] = 0  # a new hole nobody announced
    with pytest.raises(AssertionError, match="disagrees"):
        rt.drop_holes(table, seq, 4)
    unchecked = _runtime(ids, check=False)
    unchecked.drop_holes(_batch()[0], seq, 4)
