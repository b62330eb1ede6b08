"""Dual-Attention Pruning scores and victim selection against brute-force references."""

import math

import numpy as np
import pytest
import torch

from hae_vllm.config import EvictionConfig
from hae_vllm.policies.hae import ScoreAccumulator, attention_rows, normalized_scores, select_victims


def naive_rows(q, k, qpos, scale):
    """Reference: per head, full causal softmax, then sum over heads (no GQA folding)."""
    nq, H, D = q.shape
    T, Hkv, _ = k.shape
    rep = H // Hkv
    out = torch.zeros(nq, T, dtype=torch.float64)
    for h in range(H):
        kh = k[:, h // rep].double()
        for i in range(nq):
            p = int(qpos[i])
            logits = (kh[: p + 1] @ q[i, h].double()) * scale
            out[i, : p + 1] += torch.softmax(logits, 0)
    return out


@pytest.mark.parametrize("H,Hkv,D,T", [(4, 2, 32, 37), (2, 2, 16, 1), (8, 1, 8, 70), (3, 3, 5, 9)])
def test_attention_rows_matches_naive(H, Hkv, D, T):
    g = torch.Generator().manual_seed(T)
    q = torch.randn(min(T, 7), H, D, generator=g)
    k = torch.randn(T, Hkv, D, generator=g)
    qpos = torch.sort(torch.randperm(T, generator=g)[: q.shape[0]]).values
    got = attention_rows(q, k, qpos, 0.3)
    ref = naive_rows(q, k, qpos, 0.3)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    # Every row is a probability distribution per head.
    torch.testing.assert_close(got.sum(1).double(), torch.full((q.shape[0],), float(H), dtype=torch.float64))


def test_accumulator_chunking_equals_one_shot():
    g = torch.Generator().manual_seed(0)
    rows = torch.rand(10, 50, generator=g)
    a = ScoreAccumulator.create(50)
    a.add(rows)
    b = ScoreAccumulator.create(8)  # grows as needed
    b.add(rows[:3, :20])
    b.add(rows[3:, :])
    # Rows of the first chunk only see 20 keys: pad them with zeros for the reference.
    ref = rows.clone()
    ref[:3, 20:] = 0
    torch.testing.assert_close(b.g, ref.sum(0))
    torch.testing.assert_close(b.m, ref.max(0).values)
    assert b.num_queries == 10


def test_threshold_rule_is_mustdrop_dual_rule():
    """s < 1 exactly when both the global share and the individual score are small."""
    rng = np.random.default_rng(1)
    T = 200
    g = torch.tensor(rng.exponential(1.0, T), dtype=torch.float32)
    m = torch.tensor(rng.uniform(0, 0.004, T), dtype=torch.float32)
    vis = torch.zeros(T, dtype=torch.bool)
    vis[10:190] = True
    s = normalized_scores(g, m, vis, 0.004, 0.002, variance_gain=0.0)
    p = g[vis] / g[vis].sum()
    expected = (p < 0.004) & (m[vis] < 0.002)
    assert torch.equal(s[vis] < 1, expected)
    assert torch.isinf(s[~vis]).all()


def test_variance_rule_raises_threshold_for_concentrated_attention():
    T = 100
    vis = torch.ones(T, dtype=torch.bool)
    m = torch.zeros(T)
    flat = torch.ones(T)
    peaked = torch.ones(T)
    peaked[:5] = 100.0
    s_flat = normalized_scores(flat, m, vis, 0.01, 1.0, variance_gain=1.0)
    s_peak = normalized_scores(peaked, m, vis, 0.01, 1.0, variance_gain=1.0)
    # Same small tokens: under concentrated attention their score relative to the threshold drops.
    assert (s_flat < 1).sum() == 0  # uniform share 0.01 is not below 0.01
    assert (s_peak[5:] < 1).all()


@pytest.mark.parametrize("budget", [None, 1.0, 0.9, 0.5, 0.2, 0.01])
@pytest.mark.parametrize("evict_text", [False, True])
def test_select_victims_invariants(budget, evict_text):
    rng = np.random.default_rng(7)
    T = 300
    g = torch.tensor(rng.exponential(1.0, T), dtype=torch.float32)
    m = torch.tensor(rng.uniform(0, 0.01, T), dtype=torch.float32)
    vis = torch.zeros(T, dtype=torch.bool)
    vis[20:276] = True
    prot = torch.zeros(T, dtype=torch.bool)
    prot[:4] = True
    prot[-8:] = True
    cfg = EvictionConfig(method="hae", budget=budget, evict_text=evict_text, max_evict_frac=0.9)
    sel = select_victims(g, m, vis, prot, cfg)
    v = sel.victims
    assert len(set(v.tolist())) == len(v)
    assert not prot[v].any(), "protected tokens were selected"
    if not evict_text:
        assert vis[v].all(), "text selected while evict_text is off"
    cand = (vis | (torch.tensor(evict_text) & ~vis)) & ~prot
    ncand = int(cand.sum())
    if budget is not None:
        want = T - math.ceil(budget * T - 1e-9)
        assert len(v) == min(want, int(0.9 * ncand))
    # Ranked ascending and the kept candidates all score at least as high as any victim.
    assert torch.all(sel.scores[1:] >= sel.scores[:-1])
    if len(v):
        s = normalized_scores(g, m, vis & ~prot, cfg.r_global, cfg.r_individual, cfg.variance_gain)
        if evict_text:
            st = normalized_scores(g, m, ~vis & ~prot, cfg.r_global * cfg.text_threshold_scale,
                                   cfg.r_individual * cfg.text_threshold_scale, cfg.variance_gain)
            s = torch.minimum(s, st)
        kept = cand.clone()
        kept[v] = False
        assert s[kept].min() >= s[v].max()


def test_budget_one_evicts_nothing():
    T = 64
    sel = select_victims(torch.rand(T), torch.zeros(T), torch.ones(T, dtype=torch.bool),
                         torch.zeros(T, dtype=torch.bool), EvictionConfig(method="hae", budget=1.0))
    assert sel.victims.numel() == 0
