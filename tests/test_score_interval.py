"""score_interval: decode scoring every k steps from the queries of the steps since, in one
pass (hae_vllm/worker/decode_stage.py, DecodeBank's query queues).

The decayed scores a request has when it is scored must be those of scoring every step (the
same updates, decay applied per step), whatever k, however requests join, and however the
batch's rows are ordered; requests are due for budgets and parking only when scored."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hae_vllm.config import EvictionConfig, EvictionConfigError
from hae_vllm.plan import plan_compaction
from hae_vllm.policies.attention import decode_mass, decode_mass_queued
from hae_vllm.worker.decode_bank import DecodeBank, DecodeState
from hae_vllm.worker.decode_stage import DecodeStage
from hae_vllm.worker.state import DecodeTask

H, HKV, D, BS = 4, 2, 8, 4


class _Engine:
    """One decode stage over a fake runtime: keys of every token in a dense 'cache' by
    physical slot, each request's blocks laid out contiguously."""

    def __init__(self, intervals: list[int], prompt_lens: list[int], seed: int = 0, fast: bool = False) -> None:
        self.bank = DecodeBank()
        self.view = SimpleNamespace(block_size=BS, tp_group=None, scoring_layer="layers.0")
        # fast: steps DecodeStage.append_plan accepts take its append-only path (what the runtime
        # does for a batch of single-token decodes), counted in appended.
        self.fast, self.appended = fast, 0
        self.stage = DecodeStage(self.view, self.bank, trace=None, check=True)
        self.g = torch.Generator().manual_seed(seed)
        self.cache = torch.zeros(4096, HKV, D)
        self.layout = SimpleNamespace(gather_keys=lambda kv, slots: self.cache[slots])
        self.reqs = []
        for i, (k, T) in enumerate(zip(intervals, prompt_lens)):
            victims = np.asarray([1, 2, 5] if T > 8 else [], dtype=np.int64)
            plan = plan_compaction(victims, T, BS)
            ds = DecodeState.after_prefill(plan, T, BS, self.bank)
            blocks = list(range(1 + 64 * i, 1 + 64 * i + 64))
            self.cache[blocks[0] * BS : blocks[0] * BS + T] = torch.randn(T, HKV, D, generator=self.g)
            cfg = EvictionConfig(method="hae", decode_budget=0.5, decode_start=0, score_interval=k, decode_decay=0.8)
            st = SimpleNamespace(cfg=cfg, decode=ds, req_id=f"r{i}")
            self.reqs.append({"state": st, "blocks": blocks, "pos": T})

    def step(self, active: list[int], rng: np.random.Generator) -> list[DecodeTask]:
        bank = self.bank
        tasks = []
        for row, i in enumerate(active):
            r = self.reqs[i]
            p = r["pos"]
            ds = r["state"].decode
            bank.ensure(p + 1)
            ds.slot_pos[p] = p  # what the runtime does at step start
            bank.scored[ds.row, p] = True
            tasks.append(DecodeTask(r["state"], row, p, p + 1, r["blocks"]))
        query = torch.from_numpy(rng.standard_normal((len(active), H, D)).astype(np.float32))
        key = torch.from_numpy(rng.standard_normal((len(active), HKV, D)).astype(np.float32))
        for t, dt in enumerate(tasks):  # the layer writes this step's keys to the cache first
            self.cache[dt.block_ids[0] * BS + dt.start] = key[t]
        plan = self.stage.append_plan(tasks) if self.fast else None
        if plan is not None:
            assert plan.layer == "layers.0" and all(not dt.due for dt in tasks)
            self.stage.append(plan, query, key)
            self.appended += 1
        else:
            self.stage.score(tasks, SimpleNamespace(scale=0.35), query, key, None, list(range(len(active) + 1)),
                             self.layout)
        for i in active:
            self.reqs[i]["pos"] += 1
        return tasks

    def score(self, i: int) -> np.ndarray:
        ds = self.reqs[i]["state"].decode
        return ds.score[: self.reqs[i]["pos"]].copy()


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("k", [2, 3, 8])
def test_scores_at_scoring_steps_equal_scoring_every_step(k, fast):
    """Three requests (two prompts with holes), one joining late, one skipping a step, the
    batch order changing: at every step a request is scored, its scores equal those of k = 1
    (float32 rounding), and it was scored exactly when its queue was due.  ``fast``: the steps
    with nothing due go through the append-only path (``DecodeStage.append_plan``), as in the
    engine, with the same scores."""
    every = _Engine([1, 1, 1], [11, 14, 6])
    batched = _Engine([k, k, k], [11, 14, 6], fast=fast)
    schedule = [[0, 1], [0, 1], [1, 0, 2], [0, 1, 2], [0, 2], [2, 1, 0]] + [[0, 1, 2]] * 14
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    scored_steps = {0: 0, 1: 0, 2: 0}
    for n, active in enumerate(schedule):
        every.step(active, rng_a)
        tasks = batched.step(active, rng_b)
        for i, dt in zip(active, tasks):
            if not dt.due:
                assert dt.num_live is None
                continue
            scored_steps[i] += dt.num_scored
            assert dt.num_live is not None
            np.testing.assert_allclose(batched.score(i), every.score(i), rtol=2e-5, atol=1e-6)
            # Scored at the shared cadence (a multiple of k) or with k steps pending.
            assert n % k == 0 or dt.num_scored >= k
    assert (batched.appended > 0) == fast  # the fast path was taken, and only when asked
    # Every query of a request was scored once (the rest are still queued).
    for i in range(3):
        steps = sum(i in a for a in schedule)
        assert 0 <= steps - scored_steps[i] < k


def test_k1_scores_every_step_and_keeps_nothing_queued():
    eng = _Engine([1, 1], [11, 6])
    rng = np.random.default_rng(0)
    for _ in range(5):
        tasks = eng.step([0, 1], rng)
        assert all(dt.due and dt.num_scored == 1 for dt in tasks)
    assert eng.bank.queued_q is None and not eng.bank.num_queued.any()


def test_released_row_takes_no_queued_queries_to_its_next_owner():
    """A request finishing between two scorings: its queued steps leave with it, and the row
    comes back clean for the next request."""
    eng = _Engine([4, 4], [11, 14])
    rng = np.random.default_rng(1)
    eng.step([0, 1], rng)  # step 0: scored (a multiple of 4)
    eng.step([0, 1], rng)  # queued
    row = eng.reqs[1]["state"].decode.row
    assert eng.bank.num_queued[row] == 1
    eng.bank.release(row)
    assert eng.bank.num_queued[row] == 0 and eng.bank.interval[row] == 1
    assert eng.bank.num_staging_rows == 1


def test_decode_mass_queued_is_weighted_sum_of_single_queries():
    g = torch.Generator().manual_seed(3)
    B, N, L = 3, 5, 23
    q = torch.randn(B, N, H, D, generator=g)
    keys = torch.randn(B, HKV, L, D, generator=g)
    vis = np.random.default_rng(2).random((B, N, L)) < 0.5
    vis[..., 0] = True
    w = torch.rand(B, N, generator=g)
    ref = sum(w[:, j, None] * decode_mass(q[:, j], keys, 0.3, vis[:, j]) for j in range(N))
    torch.testing.assert_close(decode_mass_queued(q, keys, 0.3, vis, w), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -1, 2.5, "8"])
def test_score_interval_is_validated(bad):
    with pytest.raises(EvictionConfigError, match="score_interval"):
        EvictionConfig(method="hae", score_interval=bad).validate()


def test_logged_steps_join_queues_as_queued_steps_do():
    """Append-only steps (DecodeBank.log_query) reach the rows' queues at the next use of the
    queues exactly as DecodeBank.queue would have put them: same queries, positions and
    counts, in step order, with the batch order changing, a row skipping a step, more steps
    than the queue held, and a row released in between taking nothing to its next owner."""
    logged, queued = DecodeBank(), DecodeBank()
    rng = np.random.default_rng(4)
    for bank in (logged, queued):
        for _ in range(3):
            bank.set_interval(bank.acquire(), 4)
        bank.queue([0, 1, 2], [0, 0, 0], torch.zeros(3, H, D))  # allocates the queues (width 4)
        bank.take_queued(np.array([0, 1, 2]))
    steps = [([0, 1, 2], [2, 0, 1]), ([2, 0], [0, 1]), ([1, 2, 0], [1, 2, 0])] + [([0, 1, 2], [0, 1, 2])] * 3
    for n, (rows, at) in enumerate(steps):
        q = torch.from_numpy(rng.standard_normal((len(rows), H, D)).astype(np.float32))
        pos = [10 + n] * len(rows)
        assert logged.log_query(rows, pos, at, q)
        queued.queue(rows, pos, q[at])
    assert int(queued.num_queued.max()) > 4  # the queues grew
    ref_q, ref_pos, ref_n = queued.take_queued(np.array([0, 1, 2]))
    got_q, got_pos, got_n = logged.take_queued(np.array([0, 1, 2]))
    np.testing.assert_array_equal(got_n, ref_n)
    for r, k in enumerate(ref_n):
        np.testing.assert_array_equal(got_pos[r, :k], ref_pos[r, :k])
        assert torch.equal(got_q[r, :k], ref_q[r, :k])
    # A row released with logged steps: they leave with it.
    q = torch.ones(3, H, D)
    assert logged.log_query([0, 1, 2], [20, 20, 20], [0, 1, 2], q)
    logged.release(1)
    assert logged.num_queued[1] == 0 and logged.num_queued[0] == 1 and logged.num_queued[2] == 1
    assert logged.acquire() == 1 and logged.num_queued[1] == 0
