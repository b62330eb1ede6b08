"""HAE's decode stage, worker side: layer-0 scoring of every decode step, parking into the
recycle bin, final release, restore proposals (the data structures are in
:mod:`hae_vllm.worker.decode`).

Each decode step, layer 0's attention implementation calls :meth:`DecodeStage.score`: the new
query of every request with a decode budget scores its live and binned tokens from the
:class:`~hae_vllm.worker.decode.DecodeBank` (decayed, accumulated).  After the forward,
:meth:`DecodeStage.end_of_step` enforces each request's budget (:meth:`DecodeStage.step`: park
the weakest tokens in whole blocks, release bin overflow, propose restores) and makes the
parking swaps of all requests at once.  Restores the scheduler confirmed come back at the start
of the next step (:meth:`DecodeStage.apply_bin_updates`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from hae_vllm.policies.attention import attention_probs, decode_mass
from hae_vllm.worker.decode import BinEntry, DecodeActions, choose_parking, decode_limit, weakest_live_value
from hae_vllm.worker.state import DecodeTask
from hae_vllm.worker.trace import EvictionReport

if TYPE_CHECKING:
    from hae_vllm.worker.runtime import EvictionRuntime


def rows_of(t: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    """``t[index]`` (numpy indexing on the host: cheaper per call than torch's)."""
    if t.device.type == "cpu" and t.dtype != torch.bfloat16:
        return torch.from_numpy(t.numpy()[index])
    return t[torch.as_tensor(index, device=t.device)]


def decode_mass_rows(q: torch.Tensor, rows: np.ndarray, keys: torch.Tensor, L: int, scale: float,
                     visible: np.ndarray) -> torch.Tensor:
    """:func:`decode_mass` of queries ``q`` over the bank's key ``rows`` (one per query).

    When the rows lie in a span at most twice their number (the bank hands out its lowest
    free row, so rows in use stay packed), the span is read as one strided view instead of
    copying every row's keys: rows of the span without a query this step get a zero query
    that sees only position 0, and their output is dropped.  Otherwise the rows are
    gathered."""
    B = len(rows)
    r0, r1 = int(rows.min()), int(rows.max()) + 1
    if r1 - r0 > 2 * B:
        rows_t = torch.from_numpy(rows).to(keys.device)
        return decode_mass(q, keys[:, :, :L].index_select(0, rows_t), scale, visible)
    local = rows - r0
    local_t = torch.from_numpy(local).to(q.device)
    q_all = q.new_zeros((r1 - r0,) + tuple(q.shape[1:]))
    q_all[local_t] = q
    vis_all = np.zeros((r1 - r0, L), dtype=bool)
    vis_all[:, 0] = True
    vis_all[local] = visible
    return decode_mass(q_all, keys[r0:r1, :, :L], scale, vis_all)[local_t]


class DecodeStage:
    def __init__(self, rt: "EvictionRuntime", check: bool = False) -> None:
        self.rt = rt
        # HAE_VLLM_CHECK_DECODE=1 (the tests): every decode step checks the bank's incremental
        # bookkeeping (scored positions, live counts) against a recomputation per request.
        self.check = check

    # ------------------------------------------------------------------ layer 0, every step
    def score(self, tasks: list[DecodeTask], impl, query, key, kv_cache, qsl, layout) -> None:
        """Decayed layer-0 attention of each request's new query over its live and binned
        tokens, and each request's live count against its budget.  One decode token per
        request (the usual case): all requests at once from the bank's key rows, masked to each
        row's scored positions; otherwise request by request."""
        rt = self.rt
        bank = rt.decode_bank
        for dt in tasks:
            if not dt.state.decode.has_keys:
                self.fill_keys(dt, kv_cache, layout)
        rows = np.fromiter((dt.state.decode.row for dt in tasks), dtype=np.int64, count=len(tasks))
        starts = np.fromiter((dt.start for dt in tasks), dtype=np.int64, count=len(tasks))
        ends = np.fromiter((dt.end for dt in tasks), dtype=np.int64, count=len(tasks))
        L = int(ends.max())
        keys = bank.keys
        if bool((ends - starts == 1).all()):
            dev = keys.device
            rows_t = torch.from_numpy(rows).to(dev)
            qrows = torch.as_tensor([qsl[dt.row] for dt in tasks], device=query.device)
            new = key[qrows].reshape(len(tasks), keys.shape[1], keys.shape[3]).to(keys.dtype)
            keys[rows_t, :, torch.from_numpy(starts).to(dev)] = new  # [B, kv_heads, head_dim]
            visible = bank.scored[rows, :L] & (np.arange(L)[None, :] <= starts[:, None])
            mass = decode_mass_rows(query[qrows], rows, keys, L, impl.scale, visible)
            num_heads = query.shape[1]
            if rt.tp_group is not None:
                # Summed in rank order on every rank: the same bits everywhere.
                mass = rt.tp_group.all_gather(mass[None].contiguous(), dim=0).sum(0)
                num_heads *= rt.tp_group.world_size
            decay = np.fromiter((dt.state.cfg.decode_decay for dt in tasks), dtype=np.float32, count=len(tasks))
            # Unscored columns get zero mass: their scores only decay, as before.
            bank.score[rows, :L] = bank.score[rows, :L] * decay[:, None] + (mass / num_heads).cpu().numpy()
        else:
            for dt in tasks:
                ds, n, q0 = dt.state.decode, dt.end - dt.start, qsl[dt.row]
                ds.keys[dt.start : dt.end] = key[q0 : q0 + n].reshape(n, keys.shape[1], keys.shape[3]).to(keys.dtype)
                pos = ds.scored_positions()
                probs = self._gather_probs(query[q0 : q0 + n], rows_of(ds.keys, pos),
                                           torch.arange(dt.start, dt.end), torch.as_tensor(pos), impl)
                score = ds.score  # the bank's row (a view)
                score *= dt.state.cfg.decode_decay
                score[pos] += probs.mean(0).sum(0).numpy()  # positions are distinct
        slots = max(len(dt.block_ids) for dt in tasks) * rt.block_size
        live = (bank.slot_pos[rows, :slots] >= 0).sum(1)
        for dt, n_live in zip(tasks, live.tolist()):
            dt.num_live = n_live
        if self.check:
            self.check_state(tasks)

    def _gather_probs(self, q: torch.Tensor, keys: torch.Tensor, qpos: torch.Tensor, key_pos, impl) -> torch.Tensor:
        probs = attention_probs(q, keys, qpos, impl.scale, key_pos)
        if self.rt.tp_group is not None:
            probs = self.rt.tp_group.all_gather(probs.to(q.device).contiguous(), dim=0)
        return probs.cpu()

    def check_state(self, tasks: list[DecodeTask]) -> None:
        """The bank's incremental bookkeeping against a recomputation from the block tables and
        the bin (HAE_VLLM_CHECK_DECODE=1)."""
        bs = self.rt.block_size
        for dt in tasks:
            ds = dt.state.decode
            live = ds.live_slots(dt.block_ids, bs)
            expect = np.sort(np.concatenate([ds.slot_pos[live]] + [e.positions for e in ds.bin.values()]))
            got = ds.scored_positions()
            if dt.num_live != len(live) or not np.array_equal(expect, got):
                raise AssertionError(
                    f"decode state of {dt.state.req_id} out of step: live {dt.num_live} vs {len(live)}, "
                    f"scored {len(got)} positions vs {len(expect)} live and binned")

    def fill_keys(self, dt: DecodeTask, kv_cache, layout) -> None:
        """First decode step of a request: its bank row gets the layer-0 keys of every token
        already cached (live and binned), indexed by position.  Later tokens come from each
        step's own key rows, so decode scoring never gathers from the paged cache again: the
        bank holds exactly what the cache holds for every token scored (binned tokens stay
        readable in the pool until the bin drops them)."""
        ds, bs = dt.state.decode, self.rt.block_size
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
        self.rt.decode_bank.ensure_keys(cached)
        ds.keys[torch.as_tensor(np.concatenate(pos), device=cached.device)] = cached.to(ds.keys.dtype)
        ds.has_keys = True

    # ------------------------------------------------------------------ step start
    def apply_bin_updates(self, updates) -> None:
        """Scheduler confirmations from the previous step: restored blocks re-enter the table."""
        if not updates:
            return
        rt = self.rt
        bs = rt.block_size
        batch = rt.runner.input_batch
        for req_id, upd in updates.items():
            st = rt.states.get(req_id)
            if st is None or st.decode is None:
                continue
            ds = st.decode
            for bid in upd.lost:
                entry = ds.bin.pop(bid, None)
                ds.pending_restore.discard(bid)
                if entry is not None:
                    ds.unscore(entry.positions)
            req = rt.runner.requests.get(req_id)
            for idx, bid in upd.restored:
                entry = ds.bin.pop(bid, None)
                ds.pending_restore.discard(bid)
                if entry is None or req is None:
                    continue
                req.block_ids[0][idx] = bid
                rt.holes.changed()
                row = batch.req_id_to_index.get(req_id)
                if row is not None:
                    batch.block_table[0].block_table.np[row, idx] = bid
                ds.slot_pos[idx * bs : (idx + 1) * bs] = entry.positions
                rt.trace.event(st, "restore", req.num_computed_tokens, entry.positions.tolist(), 1)

    # ------------------------------------------------------------------ after the forward
    def end_of_step(self, tasks: list[DecodeTask]) -> None:
        """Budgets, bin and restore proposals of every decode request, then the parking swaps of
        all of them in one call per layer (disjoint slots: each request swaps within its own
        blocks)."""
        swaps = [m for m in (self.step(dt) for dt in tasks) if m is not None]
        if swaps:
            rt = self.rt
            rt.layout().swap_many(rt.caches(), torch.cat([m[0] for m in swaps]), torch.cat([m[1] for m in swaps]))

    def step(self, dt: DecodeTask) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Budget enforcement, bin overflow and restore proposals after a decode step.
        Returns the slot swaps that park victims (the caller makes them for all requests at
        once, before the next forward); the bookkeeping here already assumes them."""
        rt = self.rt
        st, cfg, bs = dt.state, dt.state.cfg, rt.block_size
        ds = st.decode
        ds.steps += 1
        num_live = dt.num_live if dt.num_live is not None else len(ds.live_slots(dt.block_ids, bs))
        # Only a request a whole block over its budget has anything to park.
        over = num_live - decode_limit(cfg, dt.end) >= bs
        rescore = not ds.by_position and ds.steps % cfg.rescore_interval == 0
        if not over and not (rescore and ds.bin) and len(ds.bin) <= cfg.bin_capacity:
            return None  # most requests, most steps: nothing to park, release or restore
        acts = DecodeActions()
        swap = None
        plan = choose_parking(ds, cfg, dt.block_ids, dt.end, bs, st.protected_prefix) if over else None
        if plan is not None:
            swap = rt.slots(dt.block_ids, plan.move_src), rt.slots(dt.block_ids, plan.move_dst)
            a, b = list(plan.move_src), list(plan.move_dst)
            ds.slot_pos[a], ds.slot_pos[b] = ds.slot_pos[b].copy(), ds.slot_pos[a].copy()
            req = rt.runner.requests[st.req_id]
            row = rt.runner.input_batch.req_id_to_index[st.req_id]
            table_np = rt.runner.input_batch.block_table[0].block_table.np
            for h in plan.hole_blocks:
                bid = int(dt.block_ids[h])
                positions = ds.slot_pos[h * bs : (h + 1) * bs].copy()
                ds.bin[bid] = BinEntry(bid, h, positions)
                ds.slot_pos[h * bs : (h + 1) * bs] = -1
                req.block_ids[0][h] = 0
                table_np[row, h] = 0
                acts.parked.append((h, bid))
                acts.parked_positions.extend(int(p) for p in positions)
            rt.holes.add(st.req_id, len(plan.hole_blocks))
            rt.trace.event(st, "park", dt.end, acts.parked_positions, len(acts.parked))
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
        if acts.parked or acts.released or acts.restore:
            rt.reports[st.req_id] = EvictionReport(
                parked=tuple(acts.parked), released=tuple(acts.released), restore=tuple(acts.restore)
            )
        return swap
