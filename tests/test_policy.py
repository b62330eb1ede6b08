"""Policies: attention statistics against brute force, HAE's rule, and the shared matrix that
crosses every method with every modifier (kvpress style)."""

import math

import numpy as np
import pytest
import torch

from hae_vllm.config import EvictionConfig
from hae_vllm.kernels.scoring import column_mass
from hae_vllm.policies.attention import LayerAccumulator, attention_probs, attention_rows
from hae_vllm.policies.base import AttentionStats, LayerStats
from hae_vllm.policies.hae import normalized_scores
from hae_vllm.policies.madakv import coverage_count, exact_selection
from hae_vllm.policies.registry import POLICIES, get_policy


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
    torch.testing.assert_close(got.double(), naive_rows(q, k, qpos, 0.3), rtol=1e-5, atol=1e-6)
    assert attention_probs(q, k, qpos, 0.3).shape == (H, q.shape[0], T)


def test_accumulator_chunking_equals_one_shot():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 10, 50, generator=g)
    qpos = torch.arange(40, 50)
    one = LayerAccumulator(50, 2, per_head=True)
    one.add(probs, qpos)
    parts = LayerAccumulator(8, 2, per_head=True)  # grows as needed
    parts.add(probs[:, :3], qpos[:3])
    parts.add(probs[:, 3:], qpos[3:])
    a, b = one.stats(50), parts.stats(50)
    for x, y in ((a.g, b.g), (a.m, b.m), (a.count, b.count), (a.head_sum, b.head_sum)):
        torch.testing.assert_close(x, y)
    assert b.count[45].item() == 5  # queries 45..49 see key 45


@pytest.mark.parametrize("H,Hkv,D,T,q0", [(4, 2, 32, 37, 0), (4, 2, 32, 37, 20), (8, 1, 8, 70, 69), (3, 3, 5, 9, 4)])
def test_column_mass_matches_naive(H, Hkv, D, T, q0):
    """The host's two flash passes give what summing every query's row gives."""
    g = torch.Generator().manual_seed(T + q0)
    q = torch.randn(T - q0, H, D, generator=g) * 2
    k = torch.randn(T + 3, Hkv, D, generator=g) * 2  # keys past the run are never read
    qpos = torch.arange(q0, T)
    per_head = torch.zeros(H, T, dtype=torch.float64)
    for h in range(H):  # naive_rows summed over queries, one head at a time
        per_head[h] = naive_rows(q[:, h : h + 1], k[:T, h // (H // Hkv)][:, None], qpos, 0.3).sum(0)
    got = column_mass(q, k, q0, 0.3)
    assert got.shape == (H, T)
    torch.testing.assert_close(got.double(), per_head, rtol=1e-4, atol=1e-5)
    # Through the accumulator, the sums-only path equals the rows path.
    rows = LayerAccumulator(T, H, per_head=True)
    rows.add(attention_probs(q, k[:T], qpos, 0.3), qpos)
    cols = LayerAccumulator(T, H, per_head=True, keep_max=False)
    cols.add_columns(got, qpos)
    a, b = rows.stats(T), cols.stats(T)
    assert b.m is None
    for x, y in ((a.g, b.g), (a.count, b.count), (a.head_sum, b.head_sum)):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


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
    assert torch.equal(s[vis] < 1, (p < 0.004) & (m[vis] < 0.002))
    assert torch.isinf(s[~vis]).all()


def test_variance_rule_raises_threshold_for_concentrated_attention():
    T = 100
    vis = torch.ones(T, dtype=torch.bool)
    m = torch.zeros(T)
    peaked = torch.ones(T)
    peaked[:5] = 100.0
    assert (normalized_scores(torch.ones(T), m, vis, 0.01, 1.0, 1.0) < 1).sum() == 0
    assert (normalized_scores(peaked, m, vis, 0.01, 1.0, 1.0)[5:] < 1).all()


def test_hae_without_budget_evicts_threshold_victims_only():
    T = 120
    vis = torch.zeros(T, dtype=torch.bool)
    vis[4:110] = True
    g = torch.ones(T)
    g[4:30] = 1e-4  # 26 tokens far below the global threshold...
    m = torch.full((T,), 1.0)
    m[4:30] = 0.0  # ...and the individual one
    stats = AttentionStats({0: LayerStats(g, m, torch.ones(T))})
    sel = get_policy("hae").select(stats, vis, torch.zeros(T, dtype=torch.bool),
                                   EvictionConfig(method="hae", budget=None, r_global=0.001, r_individual=0.5))
    assert sorted(sel.victims.tolist()) == list(range(4, 30))
    assert sel.num_threshold_victims == 26


def synthetic_stats(T, H=4, L=4, seed=0):
    rng = np.random.default_rng(seed)
    layers = {}
    for layer in range(L):
        hs = torch.tensor(rng.exponential(1.0, (H, T)), dtype=torch.float32)
        g = hs.mean(0)
        layers[layer] = LayerStats(g, g / 10, torch.tensor(np.arange(T, 0, -1), dtype=torch.float32), hs)
    return AttentionStats(layers)


MODIFIERS = [
    dict(evict_text=False),
    dict(evict_text=True),
    dict(evict_text=True, sink_tokens=0, recent_tokens=0),
    dict(evict_text=False, sink_tokens=16, recent_tokens=24),
]


@pytest.mark.parametrize("method", sorted(POLICIES))
@pytest.mark.parametrize("modifier", range(len(MODIFIERS)))
@pytest.mark.parametrize("budget", [1.0, 0.7, 0.5, 0.2])
def test_method_matrix_invariants(method, modifier, budget):
    T = 300
    vis = torch.zeros(T, dtype=torch.bool)
    vis[20:276] = True
    mod = MODIFIERS[modifier]
    cfg = EvictionConfig(method=method, budget=budget, max_evict_frac=0.95, **mod).validate()
    policy = get_policy(method)
    prot = torch.zeros(T, dtype=torch.bool)
    prot[: cfg.sink_tokens] = True
    if cfg.recent_tokens:
        prot[T - cfg.recent_tokens :] = True
    stats = synthetic_stats(T)
    sel = policy.select(stats, vis, prot, cfg)
    v = sel.victims
    # Sinks, recent window and the method's own protected tokens stay.
    all_prot = prot | policy.protected(T, cfg)
    assert not all_prot[v].any()
    assert len(set(v.tolist())) == len(v)
    cand = policy.candidates(vis, cfg) & ~all_prot
    assert cand[v].all(), "a non-candidate was evicted"
    if not cfg.evict_text or method == "fastv":
        assert vis[v].all()
    # Budget respected: the same count for every method (equal physical memory).
    want = T - math.ceil(budget * T - 1e-9)
    assert len(v) == min(want, int(0.95 * int(cand.sum())))
    # Kept candidates all score at least as high as every victim.
    if len(v):
        s = policy.scores(stats, vis, cand, cfg)
        kept = cand.clone()
        kept[v] = False
        if kept.any():
            assert s[kept].min() >= s[v].max()
    # Deterministic: same inputs, same victims.
    again = get_policy(method).select(synthetic_stats(T), vis, prot, cfg)
    assert torch.equal(again.victims, v)


def test_random_is_seeded():
    T = 200
    vis = torch.ones(T, dtype=torch.bool)
    prot = torch.zeros(T, dtype=torch.bool)
    pick = lambda seed: get_policy("random").select(  # noqa: E731
        AttentionStats(), vis, prot, EvictionConfig(method="random", budget=0.5, seed=seed)
    ).victims
    assert torch.equal(pick(1), pick(1))
    assert not torch.equal(pick(1), pick(2))


def test_streamingllm_keeps_sinks_and_most_recent():
    T = 100
    cfg = EvictionConfig(method="streamingllm", budget=0.3, evict_text=True, sink_tokens=4, recent_tokens=0)
    prot = torch.zeros(T, dtype=torch.bool)
    prot[:4] = True
    sel = get_policy("streamingllm").select(AttentionStats(), torch.zeros(T, dtype=torch.bool), prot, cfg)
    assert sorted(sel.victims.tolist()) == list(range(4, 4 + 70))


def test_madakv_exact_selection_follows_modality_preference_and_compensation():
    T = 40
    vis = torch.zeros(T, dtype=torch.bool)
    vis[:30] = True
    psi = torch.ones(2, 2, T)
    psi[:, 0, 30:] = 9.0  # head 0 prefers text: text holds 9*10/(30+90) = 75% of its mass
    keep = exact_selection(psi, vis, keep_budget=20, theta=0.1)
    # Head 0 splits its budget 25/75 visual/text, head 1 by token count (30/10 -> 75/25).
    assert keep[0, 0, :30].sum() == 5 and keep[0, 0, 30:].sum() == 10  # text capped at its 10 tokens
    assert keep[0, 1, :30].sum() == 15 and keep[0, 1, 30:].sum() == 5
    # Layer 0 (uniform attention) needs far more than its budget to cover theta=0.9 of the mass;
    # layer 1 (peaked attention) needs little, and pays layer 0's overspend back.
    psi = torch.ones(2, 2, T)
    psi[1] = 1e-3
    psi[1, :, 0] = 10.0
    psi[1, :, 35] = 10.0
    keep = exact_selection(psi, vis, keep_budget=10, theta=0.9)
    assert keep[0].sum(-1).float().mean() > 10
    assert keep[1].sum(-1).float().mean() < 10  # without compensation it would keep 10 per head
    assert coverage_count(torch.tensor([5.0, 3.0, 2.0]), 0.8) == 2


def test_madakv_diagnostics_measure_the_deviation():
    T = 300
    vis = torch.zeros(T, dtype=torch.bool)
    vis[20:276] = True
    cfg = EvictionConfig(method="madakv", budget=0.5, evict_text=True).validate()
    sel = get_policy("madakv").select(synthetic_stats(T), vis, torch.zeros(T, dtype=torch.bool), cfg)
    share = sel.diagnostics["madakv_exact_retained"]
    assert 0.0 < share <= 1.0


@pytest.mark.parametrize("H,Hkv", [(4, 2), (6, 3), (4, 4), (8, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_mass_matches_per_request_attention(H, Hkv, dtype):
    """Batched decode scoring (one query per request, keys in a padded bank by position,
    a visibility mask per row) equals attention_probs over the gathered keys,
    request by request: requests of different lengths, keys after the query masked by the
    caller, rows not visible ignored whatever they hold."""
    from hae_vllm.policies.attention import decode_mass

    g = torch.Generator().manual_seed(H * 10 + Hkv)
    D, lengths = 16, [1, 7, 33, 20]
    q = torch.randn(len(lengths), H, D, generator=g)
    kpos = [np.random.default_rng(T).permutation(T + 3)[:T] for T in lengths]  # scattered positions
    qpos = [int(p.max()) if T > 1 else int(p[0]) for p, T in zip(kpos, lengths)]
    qpos[2] -= 2  # some of request 2's keys lie after its query
    L = max(int(p.max()) for p in kpos) + 3
    # The bank holds garbage (large values) at the positions that are not scored.
    bank = (100 * torch.randn(len(lengths), L, Hkv, D, generator=g)).to(dtype)
    keys = [torch.randn(T, Hkv, D, generator=g).to(dtype) for T in lengths]
    visible = np.zeros((len(lengths), L), dtype=bool)
    for b, (k, p) in enumerate(zip(keys, kpos)):
        bank[b, torch.as_tensor(p)] = k
        visible[b, p[p <= qpos[b]]] = True
    bank = bank.transpose(1, 2)  # [B, kv_heads, L, D], as the decode bank stores keys
    out = decode_mass(q, bank, 0.3, visible)
    assert out.shape == (len(lengths), L) and out.dtype == torch.float32
    for b in range(len(lengths)):
        ref = attention_probs(q[b : b + 1], keys[b], torch.tensor([qpos[b]]), 0.3, torch.as_tensor(kpos[b]))[:, 0].sum(0)
        torch.testing.assert_close(out[b, torch.as_tensor(kpos[b])], ref, rtol=1e-5, atol=1e-6)
        others = np.setdiff1d(np.arange(L), kpos[b])
        assert bool((out[b, torch.as_tensor(others)] == 0).all())
        torch.testing.assert_close(out[b].sum(), torch.tensor(float(H)))  # every head sums to 1
    masked = torch.as_tensor(kpos[2][kpos[2] > qpos[2]])
    assert len(masked) >= 1 and bool((out[2, masked] == 0).all())
    # A torch mask gives the same numbers.
    torch.testing.assert_close(decode_mass(q, bank, 0.3, torch.from_numpy(visible)), out, rtol=0, atol=0)


@pytest.mark.parametrize("H,Hkv,T,with_key_positions", [(4, 2, 37, False), (8, 1, 70, True), (3, 3, 9, False), (6, 2, 50, True)])
def test_attention_probs_host_path_matches_torch_path(H, Hkv, T, with_key_positions):
    """attention_probs on the host (numpy) and the device path (torch, run here on CPU tensors)
    give the same probabilities, masks included."""
    from hae_vllm.policies.attention import _attention_probs_torch

    g = torch.Generator().manual_seed(T + H)
    q = torch.randn(min(T, 6), H, 16, generator=g)
    k = torch.randn(T, Hkv, 16, generator=g)
    qpos = torch.sort(torch.randperm(T, generator=g)[: q.shape[0]]).values
    kpos = torch.randperm(T + 5, generator=g)[:T] if with_key_positions else None
    if kpos is not None:
        qpos = torch.maximum(qpos, kpos.min())  # every query sees at least one key
    host = attention_probs(q, k, qpos, 0.25, kpos)
    dev = _attention_probs_torch(q, k, qpos, 0.25, kpos)
    torch.testing.assert_close(host, dev, rtol=1e-5, atol=1e-6)
    future = (torch.arange(T) if kpos is None else kpos)[None, :] > qpos[:, None]
    assert bool((host[:, future] == 0).all()) and torch.allclose(host.sum(-1), torch.ones(H, q.shape[0]))
