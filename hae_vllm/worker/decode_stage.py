"""HAE's decode stage, worker side: layer-0 scoring of every decode step, parking into the
recycle bin, final release, restore proposals (the data structures are in
:mod:`hae_vllm.worker.decode_bank`).

Each decode step, layer 0's attention implementation calls :meth:`DecodeStage.score`: the new
query of every request with a decode budget scores its live and binned tokens from the
:class:`~hae_vllm.worker.decode_bank.DecodeBank` (decayed, accumulated).  After the forward,
:meth:`DecodeStage.end_of_step` enforces each request's budget (:meth:`DecodeStage.step`: park
the weakest tokens in whole blocks, release bin overflow, propose restores) and makes the
parking swaps of all requests at once.  Restores the scheduler confirmed come back at the start
of the next step (:meth:`DecodeStage.apply_bin_updates`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from hae_vllm.policies.attention import attention_probs, decode_mass_rows, queued_mass_rows
from hae_vllm.worker.decode_bank import (BinEntry, DecodeActions, DecodeBank, choose_parking, decode_limit,
                                         decode_started, weakest_live_value)
from hae_vllm.worker.runner_view import RunnerView
from hae_vllm.worker.state import DecodeTask, RequestState
from hae_vllm.protocol import EvictionReport
from hae_vllm.worker.trace import TraceWriter


def rows_of(t: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    """``t[index]`` (numpy indexing on the host: cheaper per call than torch's)."""
    if t.device.type == "cpu" and t.dtype != torch.bfloat16:
        return torch.from_numpy(t.numpy()[index])
    return t[torch.as_tensor(index, device=t.device)]


def _decay(tasks: list[DecodeTask]) -> np.ndarray:
    return np.fromiter((dt.state.cfg.decode_decay for dt in tasks), dtype=np.float32, count=len(tasks))


def read_pending_keys(bank: DecodeBank, block_size: int, kv_cache, layout, tasks: list[DecodeTask], rows: np.ndarray,
                      prow: np.ndarray, ppos: np.ndarray) -> None:
    """The layer-0 keys of queued steps the append-only path left in the paged cache
    (bank rows ``prow``, positions ``ppos``; ``rows`` are the rows of ``tasks``), read into the
    bank before scoring.  They are where vLLM wrote them: parking moves tokens only when a row
    is scored, and a decoded token's slot is its position until then."""
    table_of = {int(r): dt.block_ids for r, dt in zip(rows, tasks)}
    slots = np.empty(len(prow), dtype=np.int64)
    for r in np.unique(prow):
        sel = prow == r
        table = np.asarray(table_of[int(r)], dtype=np.int64)
        p = ppos[sel]
        slots[sel] = table[p // block_size] * block_size + p % block_size
    keys = layout.gather_keys(kv_cache, torch.from_numpy(slots))
    bank.put_keys(prow.tolist(), ppos.tolist(), keys)


class DecodeAppend(NamedTuple):
    """A decode step whose only layer-0 work is to store each request's key and query
    (:meth:`DecodeStage.append_plan`)."""

    layer: str  # the scoring layer's name
    rows: list[int]  # bank rows
    starts: list[int]  # positions of the new tokens
    at: list[int]  # query rows in the batch


class DecodeStage:
    """Takes the step's decode tasks and returns its decisions (reports for the scheduler);
    edits the runner's tables only through ``view``; the decode state lives in ``bank``."""

    def __init__(self, view: RunnerView, bank: DecodeBank, trace: TraceWriter, check: bool = False) -> None:
        self.view = view
        self.bank = bank
        self.trace = trace
        # HAE_VLLM_CHECK_DECODE=1 (the tests): every decode step checks the bank's incremental
        # bookkeeping (scored positions, live counts) against a recomputation per request.
        self.check = check
        # Decode steps seen (the shared cadence of score_interval), and the next step at which
        # some request is due for scoring.
        self.num_steps = 0
        self.next_scoring = 0
        self._cache = None  # (layer-0 kv cache, layout) of the step being scored

    # ------------------------------------------------------------------ layer 0, every step
    def append_plan(self, tasks: list[DecodeTask]) -> DecodeAppend | None:
        """The step's decode work when it is only to store each request's layer-0 key and query
        (score_interval k > 1, no row due, every request one token with its key row filled,
        and the batch one token per request, so a request's query is its batch row): the
        (rows, positions, query rows) :meth:`append` takes, every task marked not due; None
        when :meth:`score` has more to do."""
        bank = self.bank
        if not bank.num_staging_rows or self.num_steps >= self.next_scoring:
            return None
        rows, starts, at = [], [], []
        for dt in tasks:
            ds = dt.state.decode
            if not ds.has_keys or dt.end - dt.start != 1 or bank.interval[ds.row] <= 1:
                return None
            rows.append(ds.row)
            starts.append(dt.start)
            at.append(dt.row)
        for dt in tasks:
            dt.due = False
        return DecodeAppend(self.view.scoring_layer, rows, starts, at)

    def append(self, plan: DecodeAppend, query: torch.Tensor, key: torch.Tensor) -> None:
        """:meth:`score` on a step :meth:`append_plan` planned: keys and queries stored."""
        rows, starts, at = plan.rows, plan.starts, plan.at
        bank = self.bank
        # The keys stay in the paged cache until the row is scored (one host copy per step).
        if not bank.log_query(rows, starts, at, query):
            bank.append(rows, starts, at, query, key)
        self.num_steps += 1

    def score(self, tasks: list[DecodeTask], impl, query, key, kv_cache, qsl, layout) -> None:
        """Decayed layer-0 attention of each request's new queries over its live and binned
        tokens, and each request's live count against its budget.

        One decode token per request (the usual case): the new key goes to the bank's row; with
        ``score_interval`` k = 1 the new query is scored at once, with k > 1 it joins the row's
        queue (one copy per step), and every k steps the row's queued queries are scored in
        one pass.  Either way all due rows at once, masked to each row's scored
        positions.
        Only the requests scored this step are due for :meth:`step` (``DecodeTask.due``).
        Otherwise (several tokens per request) queued queries are scored first, then request by
        request."""
        bank = self.bank
        bank.flush()  # append-only steps' queries into the queues (read below)
        self._cache = (kv_cache, layout)  # where queued keys not yet in the bank are read
        rows_l, starts_l, at = [], [], []
        single = True
        for dt in tasks:
            ds = dt.state.decode
            if not ds.has_keys:
                fill_bank_keys(bank, dt, self.view.block_size, kv_cache, layout)
                k = dt.state.cfg.score_interval
                bank.set_interval(ds.row, k)
                # Scored at the next multiple of k (the shared cadence), or every step.
                self.next_scoring = min(self.next_scoring, -(-self.num_steps // k) * k)
            rows_l.append(ds.row)
            starts_l.append(dt.start)
            at.append(qsl[dt.row])
            single = single and dt.end - dt.start == 1
        keys = bank.keys
        num_heads = query.shape[1]
        due = tasks
        if single and bank.num_staging_rows:
            # score_interval k > 1: this step's keys and queries are stored, and rows are
            # scored every k steps.
            bank.append(rows_l, starts_l, at, query, key)
            if self.num_steps < self.next_scoring:
                for dt in tasks:
                    dt.due = False
                due = []
            else:
                due = self._score_due(tasks, np.array(rows_l, dtype=np.int64), impl, num_heads)
        elif single:
            # Every request scores every step (k = 1): the new query alone, nothing queued.
            if at == list(range(at[0], at[0] + len(at))):
                q, k = query[at[0] : at[0] + len(at)], key[at[0] : at[0] + len(at)]  # the batch in order
            else:
                qrows = torch.as_tensor(at, device=query.device)
                q, k = query[qrows], key[qrows]
            bank.put_keys(rows_l, starts_l, k.reshape(len(tasks), keys.shape[1], keys.shape[3]))
            rows = np.array(rows_l, dtype=np.int64)
            starts = np.array(starts_l, dtype=np.int64)
            self._score_rows(rows, q[:, None], starts[:, None], _decay(tasks), impl, num_heads)
        else:
            rows = np.array(rows_l, dtype=np.int64)
            queued = np.flatnonzero(bank.num_queued[rows] > 0)
            if len(queued):
                self._score_queued([tasks[i] for i in queued], rows[queued], impl, num_heads)
                for i in queued:
                    tasks[i].num_scored += 1  # and this step's tokens, below
            for dt in tasks:
                ds, n, q0 = dt.state.decode, dt.end - dt.start, qsl[dt.row]
                ds.keys[dt.start : dt.end] = key[q0 : q0 + n].reshape(n, keys.shape[1], keys.shape[3]).to(keys.dtype)
                pos = ds.scored_positions()
                probs = self._gather_probs(query[q0 : q0 + n], rows_of(ds.keys, pos),
                                           torch.arange(dt.start, dt.end), torch.as_tensor(pos), impl)
                score = ds.score  # the bank's row (a view)
                score *= dt.state.cfg.decode_decay
                score[pos] += probs.mean(0).sum(0).numpy()  # positions are distinct
        self.num_steps += 1
        if not due:
            return
        due_rows = np.fromiter((dt.state.decode.row for dt in due), dtype=np.int64, count=len(due))
        slots = max(len(dt.block_ids) for dt in due) * self.view.block_size
        live = (bank.slot_pos[due_rows, :slots] >= 0).sum(1)
        for dt, n_live in zip(due, live.tolist()):
            dt.num_live = n_live
        if self.check:
            check_decode_state(due, self.view.block_size)

    def _score_due(self, tasks: list[DecodeTask], rows: np.ndarray, impl, num_heads: int) -> list[DecodeTask]:
        """Score the rows due at this step of the shared cadence (a multiple of their k, or k
        steps pending) and set when the next one is; returns the tasks scored."""
        bank, now = self.bank, self.num_steps
        interval = bank.interval[rows]
        hit = (now % interval == 0) | (bank.num_queued[rows] >= interval)
        if hit.all():
            due = tasks
            self._score_queued(tasks, rows, impl, num_heads)
        else:
            for i in np.flatnonzero(~hit):
                tasks[i].due = False
            sel = np.flatnonzero(hit)
            due = [tasks[i] for i in sel]
            if len(sel):
                self._score_queued(due, rows[sel], impl, num_heads)
        # Steps counted from the next one: a row is next due at its next multiple, or when k
        # steps are pending.
        nxt = np.minimum((now // interval + 1) * interval, now + 1 + interval - 1 - bank.num_queued[rows])
        self.next_scoring = int(nxt.min())
        return due

    def _score_queued(self, tasks: list[DecodeTask], rows: np.ndarray, impl, num_heads: int) -> None:
        """Score the queued queries of ``rows`` (the rows of ``tasks``) and empty their queues."""
        bank = self.bank
        prow, ppos = bank.pending_keys(rows)
        if len(prow):
            read_pending_keys(bank, self.view.block_size, *self._cache, tasks, rows, prow, ppos)
        q, pos, n = bank.take_queued(rows)  # q: [B, N, H, D]
        for dt, k in zip(tasks, n.tolist()):
            dt.num_scored = k
        self._score_rows(rows, q, pos, _decay(tasks), impl, num_heads, n)

    def _score_rows(self, rows: np.ndarray, q: torch.Tensor, qpos: np.ndarray, decay: np.ndarray, impl,
                    num_heads: int, n: np.ndarray | None = None) -> None:
        """``score <- decay^n * score + sum_j decay^(n-1-j) * mass_j`` for the rows' queries
        ``q`` [B, N, H, D] at positions ``qpos`` [B, N] in step order (row b's first ``n[b]``,
        default all): exactly the per-step update applied n times, the scored set being the
        same at every step in between (parking and releases happen only when a row is scored;
        a parked block the pool reuses in between leaves the set early)."""
        bank, tp = self.bank, self.view.tp_group
        B, N = qpos.shape
        last = qpos[:, N - 1] if n is None else qpos[np.arange(B), n - 1]
        L = int(last.max()) + 1
        ar = np.arange(L)
        if N == 1:
            visible = bank.scored[rows, :L] & (ar[None, :] <= qpos)
            mass = decode_mass_rows(q[:, 0], rows, bank.keys, L, impl.scale, visible)
            factor = decay
        else:
            n = np.full(B, N) if n is None else n
            mass = queued_mass_rows(bank.keys, bank.scored, rows, q, qpos, n, decay, L, impl.scale)
            factor = (decay ** n).astype(np.float32)
        if tp is not None:
            # Summed in rank order on every rank: the same bits everywhere.
            mass = tp.all_gather(mass[None].contiguous(), dim=0).sum(0)
            num_heads *= tp.world_size
        # Unscored columns get zero mass: their scores only decay, as before.
        bank.score[rows, :L] = bank.score[rows, :L] * factor[:, None] + (mass / num_heads).cpu().numpy()

    def _gather_probs(self, q: torch.Tensor, keys: torch.Tensor, qpos: torch.Tensor, key_pos, impl) -> torch.Tensor:
        probs = attention_probs(q, keys, qpos, impl.scale, key_pos)
        if self.view.tp_group is not None:
            probs = self.view.tp_group.all_gather(probs.to(q.device).contiguous(), dim=0)
        return probs.cpu()


    # ------------------------------------------------------------------ step start
    def apply_bin_updates(self, updates, states: dict[str, RequestState]) -> None:
        """Scheduler confirmations from the previous step: restored blocks re-enter the table."""
        if not updates:
            return
        view = self.view
        bs = view.block_size
        for req_id, upd in updates.items():
            st = states.get(req_id)
            if st is None or st.decode is None:
                continue
            ds = st.decode
            for bid in upd.lost:
                entry = ds.bin.pop(bid, None)
                ds.pending_restore.discard(bid)
                if entry is not None:
                    ds.unscore(entry.positions)
            req = view.runner.requests.get(req_id)
            for idx, bid in upd.restored:
                entry = ds.bin.pop(bid, None)
                ds.pending_restore.discard(bid)
                if entry is None or not view.restore_block(req_id, idx, bid):
                    continue
                ds.slot_pos[idx * bs : (idx + 1) * bs] = entry.positions
                self.trace.event(st, "restore", req.num_computed_tokens, entry.positions.tolist(), 1)

    # ------------------------------------------------------------------ after the forward
    def end_of_step(self, tasks: list[DecodeTask]) -> dict[str, EvictionReport]:
        """Budgets, bin and restore proposals of every decode request, then the parking swaps of
        all of them in one call per layer (disjoint slots: each request swaps within its own
        blocks).  Returns the reports of the requests that parked, released or proposed a
        restore."""
        due = [dt for dt in tasks if dt.due]
        if not due:
            return {}  # score_interval > 1: most steps
        reports, swaps = {}, []
        for dt in due:
            swap, report = self.step(dt)
            if swap is not None:
                swaps.append(swap)
            if report is not None:
                reports[dt.state.req_id] = report
        if swaps:
            view = self.view
            view.layout().swap_many(view.caches(), torch.cat([m[0] for m in swaps]), torch.cat([m[1] for m in swaps]))
        return reports

    def step(self, dt: DecodeTask) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, EvictionReport | None]:
        """Budget enforcement, bin overflow and restore proposals after a decode step.
        Returns the slot swaps that park victims (the caller makes them for all requests at
        once, before the next forward; the bookkeeping here already assumes them) and the
        request's report (None: nothing to tell the scheduler)."""
        view = self.view
        st, cfg, bs = dt.state, dt.state.cfg, view.block_size
        ds = st.decode
        before = ds.steps
        ds.steps += dt.num_scored
        num_live = dt.num_live if dt.num_live is not None else len(ds.live_slots(dt.block_ids, bs))
        # Only a request a whole block over its budget has anything to park (and a keep ratio
        # applies only once the answer is decode_start x the cache its prefill left).
        over = num_live - decode_limit(cfg, dt.end) >= bs and decode_started(ds, cfg, dt.end)
        # Every rescore_interval steps (a multiple crossed since the last scoring, k > 1).
        rescore = not ds.by_position and ds.steps // cfg.rescore_interval > before // cfg.rescore_interval
        if not over and not (rescore and ds.bin) and len(ds.bin) <= cfg.bin_capacity:
            return None, None  # most requests, most steps: nothing to park, release or restore
        acts = DecodeActions()
        swap = None
        plan = choose_parking(ds, cfg, dt.block_ids, dt.end, bs, st.protected_prefix) if over else None
        if plan is not None:
            swap = view.slots(dt.block_ids, plan.move_src), view.slots(dt.block_ids, plan.move_dst)
            a, b = list(plan.move_src), list(plan.move_dst)
            ds.slot_pos[a], ds.slot_pos[b] = ds.slot_pos[b].copy(), ds.slot_pos[a].copy()
            for h in plan.hole_blocks:
                bid = int(dt.block_ids[h])
                positions = ds.slot_pos[h * bs : (h + 1) * bs].copy()
                ds.bin[bid] = BinEntry(bid, h, positions)
                ds.slot_pos[h * bs : (h + 1) * bs] = -1
                acts.parked.append((h, bid))
                acts.parked_positions.extend(int(p) for p in positions)
            view.null_blocks(st.req_id, plan.hole_blocks)
            self.trace.event(st, "park", dt.end, acts.parked_positions, len(acts.parked))
        # Final release when the bin is over capacity: lowest value first.
        while len(ds.bin) > cfg.bin_capacity:
            victim = min((e for e in ds.bin.values() if e.block_id not in ds.pending_restore),
                         key=ds.value, default=None)
            if victim is None:
                break
            del ds.bin[victim.block_id]
            ds.unscore(victim.positions)
            acts.released.append(victim.block_id)
        # Restore: every rescore_interval steps, the best binned block against the weakest live.
        if rescore and ds.bin:  # the bin as this step's parks and releases left it
            best = max((e for e in ds.bin.values() if e.block_id not in ds.pending_restore),
                       key=ds.value, default=None)
            weakest = weakest_live_value(ds, cfg, dt.block_ids, dt.end, bs, st.protected_prefix)
            if best is not None and weakest is not None and ds.value(best) > cfg.restore_margin * weakest:
                ds.pending_restore.add(best.block_id)
                acts.restore.append((best.index, best.block_id))
        report = None
        if acts.parked or acts.released or acts.restore:
            report = EvictionReport(parked=tuple(acts.parked), released=tuple(acts.released),
                                    restore=tuple(acts.restore))
        return swap, report


def check_decode_state(tasks: list[DecodeTask], block_size: int) -> None:
    """The bank's incremental bookkeeping against a recomputation from the block tables and
    the bin (HAE_VLLM_CHECK_DECODE=1)."""
    bs = block_size
    for dt in tasks:
        ds = dt.state.decode
        live = ds.live_slots(dt.block_ids, bs)
        expect = np.sort(np.concatenate([ds.slot_pos[live]] + [e.positions for e in ds.bin.values()]))
        got = ds.scored_positions()
        if dt.num_live != len(live) or not np.array_equal(expect, got):
            raise AssertionError(
                f"decode state of {dt.state.req_id} out of step: live {dt.num_live} vs {len(live)}, "
                f"scored {len(got)} positions vs {len(expect)} live and binned")


def fill_bank_keys(bank: DecodeBank, dt: DecodeTask, block_size: int, kv_cache, layout) -> None:
    """First decode step of a request: its bank row gets the layer-0 keys of every token
    already cached (live and binned), indexed by position.  Later tokens come from each
    step's own key rows, so decode scoring never gathers from the paged cache again: the
    bank holds exactly what the cache holds for every token scored (binned tokens stay
    readable in the pool until the bin drops them)."""
    ds, bs = dt.state.decode, block_size
    live = ds.live_slots(dt.block_ids, bs)
    pos = ds.slot_pos[live]
    old = pos < dt.start  # this step's tokens come from the layer input
    table = np.asarray(dt.block_ids)
    phys = [table[live[old] // bs] * bs + live[old] % bs]
    pos = [pos[old]]
    for entry in ds.bin.values():
        phys.append(entry.block_id * bs + np.arange(bs))
        pos.append(entry.positions)
    cached = layout.gather_keys(kv_cache, torch.as_tensor(np.concatenate(phys), dtype=torch.int64))
    bank.ensure_keys(cached)
    ds.keys[torch.as_tensor(np.concatenate(pos), device=cached.device)] = cached.to(ds.keys.dtype)
    ds.has_keys = True
