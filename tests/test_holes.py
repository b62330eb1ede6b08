"""Attention metadata without holes: null blocks dropped, seq_lens shortened."""

import torch

from hae_vllm.worker.runtime import drop_hole_blocks


def test_drop_hole_blocks_rows():
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
    out = drop_hole_blocks(table, seq, bs)
    assert out is not None
    t, s = out
    assert t[0, :3].tolist() == [5, 7, 9]
    assert t[1, :2].tolist() == [3, 4]
    assert t[2, :3].tolist() == [6, 8, 11]
    assert s.tolist() == [10, 7, 5]
    assert s.dtype == seq.dtype


def test_no_holes_returns_none():
    table = torch.tensor([[1, 2, 0, 0]], dtype=torch.int32)
    assert drop_hole_blocks(table, torch.tensor([5]), 4) is None
