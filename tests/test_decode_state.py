"""DecodeBank: every request's decode state in dense rows (hae_vllm/worker/decode_bank.py).

The engine tests check the bank's bookkeeping against a recomputation on every decode step
(HAE_VLLM_CHECK_DECODE=1, set in conftest); these check the bank itself: rows recycled clean,
growth that keeps every row's data and every state's view, the state a prefill plan leaves."""

import numpy as np
import torch

from hae_vllm.plan import apply_plan_to_positions, plan_compaction
from hae_vllm.worker.decode_bank import DecodeBank, DecodeState, choose_parking
from hae_vllm.config import EvictionConfig


def _state(bank: DecodeBank, victims, num_tokens: int, bs: int = 4) -> DecodeState:
    plan = plan_compaction(np.asarray(victims, dtype=np.int64), num_tokens, bs)
    return DecodeState.after_prefill(plan, num_tokens, bs, bank)


def test_after_prefill_row_matches_the_plan():
    bank = DecodeBank()
    T, bs = 22, 4
    victims = [2, 3, 5, 8, 9, 10, 11, 13]
    plan = plan_compaction(np.asarray(victims), T, bs)
    ds = DecodeState.after_prefill(plan, T, bs, bank)
    expect = apply_plan_to_positions(plan, T, bs)
    assert np.array_equal(ds.slot_pos[:T], expect)
    assert bool((ds.slot_pos[T:] == -1).all())
    kept = np.setdiff1d(np.arange(T), victims)
    assert np.array_equal(ds.scored_positions(), kept)
    assert len(ds.live_slots(list(range(1, 7)), bs)) == len(kept)


def test_rows_are_recycled_clean():
    bank = DecodeBank()
    a = _state(bank, [1, 2], 12)
    b = _state(bank, [], 12)
    assert a.row != b.row and bank.in_use == 2
    a.score[:5] = 3.0
    bank.release(a.row)
    c = _state(bank, [1, 2, 5, 6], 8)
    assert c.row == a.row and bank.in_use == 2
    assert bool((c.score == 0).all()) and bool((c.slot_pos[8:] == -1).all())
    assert np.array_equal(c.scored_positions(), [0, 3, 4, 7])
    # The other row is untouched.
    assert np.array_equal(b.scored_positions(), np.arange(12))


def test_growth_keeps_rows_and_views():
    bank = DecodeBank(max_len=100)
    states = [_state(bank, [i], 10 + i) for i in range(11)]  # more rows than the first 8
    assert bank.num_rows >= 11 and len({s.row for s in states}) == 11
    bank.ensure_keys(torch.zeros(1, 2, 3))
    for i, s in enumerate(states):
        s.score[: 10 + i] = np.arange(10 + i) + 100 * i
        s.keys[: 10 + i] = float(i)
    before = [(s.slot_pos.copy(), s.score.copy(), s.scored_positions()) for s in states]
    cap = bank.capacity
    bank.ensure(cap + 1)
    assert bank.capacity == min(2 * cap, 100)
    bank.ensure(150)  # past max_len when a request needs it
    assert bank.capacity == 150 and bank.keys.shape == (bank.num_rows, 2, 150, 3)
    for i, (s, (sp, sc, pos)) in enumerate(zip(states, before)):
        assert np.array_equal(s.slot_pos[: len(sp)], sp) and bool((s.slot_pos[len(sp):] == -1).all())
        assert np.array_equal(s.score[: len(sc)], sc) and bool((s.score[len(sc):] == 0).all())
        assert np.array_equal(s.scored_positions(), pos)
        assert bool((s.keys[: 10 + i] == float(i)).all()) and bool((s.keys[10 + i :] == 0).all())
    # Views follow the bank: a write through the state lands in the bank's current array.
    states[3].slot_pos[140] = 7
    assert bank.slot_pos[states[3].row, 140] == 7


def test_parking_choice_reads_the_bank_row():
    """choose_parking through a bank-backed state: victims are the lowest-scored evictable
    tokens, never sinks, the recent window or the tail block."""
    bs = 4
    bank = DecodeBank()
    cfg = EvictionConfig(method="hae", decode_budget_tokens=12, sink_tokens=2, decode_recent_tokens=4)
    ds = _state(bank, [], 24, bs)
    ds.score[:24] = np.linspace(1.0, 2.0, 24)
    ds.score[[9, 10, 13, 14]] = 0.0  # the four weakest
    plan = choose_parking(ds, cfg, list(range(1, 7)), 24, bs)
    assert plan is not None and len(plan.hole_blocks) == 3  # 12 over the budget: three blocks
    parked = set(np.asarray(plan.victims).tolist())
    assert len(parked) == 12 and parked >= {9, 10, 13, 14}
    assert not parked & {0, 1} and not parked & set(range(20, 24))


def test_bank_hands_out_its_lowest_free_row():
    bank = DecodeBank()
    rows = [bank.acquire() for _ in range(10)]
    assert rows == list(range(10))
    bank.release(7)
    bank.release(2)
    assert bank.acquire() == 2 and bank.acquire() == 7 and bank.acquire() == 10


def test_decode_mass_over_bank_rows_matches_gathered_rows():
    """The runtime's decode scoring reads a packed span of bank rows as one view (queries of
    rows not in the step zeroed and dropped) or gathers scattered rows: both must give each
    query its own row's attention, as decode_mass over the gathered rows does."""
    from hae_vllm.policies.attention import decode_mass
    from hae_vllm.policies.attention import decode_mass_rows

    g = torch.Generator().manual_seed(0)
    num_rows, H, Hkv, cap, D, L = 12, 4, 2, 40, 8, 29
    keys = torch.randn(num_rows, Hkv, cap, D, generator=g)
    for rows in ([3, 1, 4, 2], [0, 11], [5], [9, 7, 8, 6, 10]):  # packed spans and a sparse pair
        rows = np.asarray(rows, dtype=np.int64)
        q = torch.randn(len(rows), H, D, generator=g)
        visible = np.random.default_rng(len(rows)).random((len(rows), L)) < 0.6
        visible[:, 0] = True
        got = decode_mass_rows(q, rows, keys, L, 0.3, visible)
        ref = decode_mass(q, keys[torch.from_numpy(rows)][:, :, :L].contiguous(), 0.3, visible)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        assert bool((got[torch.from_numpy(~visible)] == 0).all())


def test_a_keep_ratio_waits_for_an_answer_as_long_as_the_cache():
    """decode_start: a keep ratio applies once the request generated that share of what its
    prefill left live (a short answer never parks); an absolute budget applies at once."""
    from hae_vllm.worker.decode_bank import decode_started

    bank = DecodeBank()
    ds = _state(bank, [2, 3, 5, 8, 9, 10, 11, 13], 22)  # 14 of 22 prompt tokens live
    assert (ds.start_tokens, ds.start_live) == (22, 14)
    cfg = EvictionConfig(method="hae", decode_budget=0.5)
    assert cfg.decode_start == 1.0
    assert not decode_started(ds, cfg, 22 + 13)
    assert decode_started(ds, cfg, 22 + 14)
    half = cfg.replace(decode_start=0.5)
    assert not decode_started(ds, half, 22 + 6) and decode_started(ds, half, 22 + 7)
    assert decode_started(ds, cfg.replace(decode_start=0.0), 22)
    absolute = EvictionConfig(method="hae", decode_budget_tokens=12)
    assert decode_started(ds, absolute, 22)
