"""The KV-event stream prefix-aware routers replay (``--kv-events-config``), with eviction on.

llm-d's precise prefix-cache scorer and NVIDIA Dynamo's KV router learn what an instance
holds only from this stream and assume it is a faithful log: a ``BlockRemoved`` names a block
that was announced and is still live, a ``BlockStored``'s parent is live, and an instance serves
the longest chain of a request's block hashes it announced.  :class:`RouterStream` sits where
the eviction scheduler takes its KV cache manager's events and makes them so:

* **reference counts**: a content hash is announced when its first holder appears and removed
  when its last one goes.  Holders are the pool's cached blocks (two blocks may hold the same
  hash when two requests computed it at once: vLLM then stores it twice and removes it twice)
  and the kept sessions;
* **sessions are announced under their content hashes** (:mod:`hae_vllm.engine.sessions`): a
  conversation's kept cache is served to a follow-up whose block hashes equal the session's,
  which is exactly the chain a router computes for that follow-up.  A session's blocks are
  stored in chain order when it is kept (``session_id`` = ``"hae-session:<request id>"``, the
  stream's mark of the request context that caused a store), and removed when it can no longer
  be served: one of its blocks was handed out again (the pool then removes the block's session
  key, which was never announced and never leaves this class), or the session index let it go;
* a stored block whose parent is not live is not announced (nor are its children), so no
  router sees an orphan chain.

Reuse reports (``kv_cache_report_mode: "full"``: vLLM re-announces a request's prefix hit)
pass unchanged and hold nothing.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from hae_vllm.engine.sessions import SESSION_GROUP, SessionGone, SessionKept

if TYPE_CHECKING:
    from hae_vllm.engine.sessions import Session, SessionCache

SESSION_MARK = "hae-session:"


class RouterStream:
    """Turns the pool's events (and the session markers queued among them) into the stream a
    router can replay.  One per scheduler; :meth:`take` wraps ``KVCacheManager.take_events``."""

    def __init__(self, pool, sessions: "SessionCache", spec_kind: tuple | None = None) -> None:
        self.pool = pool
        self.sessions = sessions
        self.spec_kind = spec_kind  # (kv_cache_spec_kind, sliding_window) of group 0
        self.live: set = set()  # what a router replaying the published stream holds
        self.pool_refs: Counter = Counter()
        self.session_refs: Counter = Counter()
        self._reports: set[int] = set()  # ids of reuse-report events (they hold nothing)
        emit = getattr(pool, "emit_cached_block_events", None)
        if emit is not None:
            def emit_cached_block_events(*args, **kwargs):
                before = len(pool.kv_event_queue)
                out = emit(*args, **kwargs)
                self._reports.update(id(e) for e in pool.kv_event_queue[before:])
                return out

            pool.emit_cached_block_events = emit_cached_block_events

    # ------------------------------------------------------------------ helpers
    def _held(self, h) -> bool:
        return self.pool_refs[h] > 0 or self.session_refs[h] > 0

    def _stores(self, hashes, parent, token_ids, extra_keys, template, out: list) -> None:
        """Announce the not-yet-live ``hashes`` (a chain after ``parent``) whose parent is live,
        as runs of consecutive blocks."""
        from vllm.distributed.kv_events import BlockStored

        n = len(hashes)
        per = len(token_ids) // n if n else 0
        run: list[int] = []

        def flush():
            if not run:
                return
            i0 = run[0]
            ev = BlockStored(
                block_hashes=[hashes[i] for i in run],
                parent_block_hash=hashes[i0 - 1] if i0 > 0 else parent,
                token_ids=[t for i in run for t in token_ids[i * per:(i + 1) * per]],
                block_size=template["block_size"], lora_id=template.get("lora_id"), medium=template.get("medium"),
                lora_name=template.get("lora_name"),
                extra_keys=[extra_keys[i] for i in run] if extra_keys else None,
                group_idx=template.get("group_idx"), kv_cache_spec_kind=template.get("kv_cache_spec_kind"),
                kv_cache_spec_sliding_window=template.get("kv_cache_spec_sliding_window"),
                locality=template.get("locality"), ownership=template.get("ownership"),
                session_id=template.get("session_id"))
            out.append(ev)
            run.clear()

        for i, h in enumerate(hashes):
            prev = hashes[i - 1] if i > 0 else parent
            if h not in self.live and (prev is None or prev in self.live):
                self.live.add(h)
                run.append(i)
            else:
                flush()
        flush()

    def _removes(self, hashes, template, out: list) -> None:
        from vllm.distributed.kv_events import BlockRemoved

        gone = [h for h in hashes if h in self.live and not self._held(h)]
        if gone:
            self.live.difference_update(gone)
            out.append(BlockRemoved(block_hashes=gone, medium=template.get("medium"),
                                    group_idx=template.get("group_idx")))

    def _session_gone(self, sess: "Session", out: list) -> None:
        if not getattr(sess, "announced", False):
            return
        sess.announced = False
        hashes = sess.event_hashes
        for h in hashes:
            self.session_refs[h] -= 1
            if self.session_refs[h] <= 0:
                del self.session_refs[h]
        self._removes(hashes, {"medium": self.pool.medium, "group_idx": 0}, out)

    # ------------------------------------------------------------------ the stream
    def take(self, events: list) -> list:
        from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored

        out: list = []
        for e in events:
            if isinstance(e, SessionKept):
                sess = e.session
                sess.announced = True
                for h in sess.event_hashes:
                    self.session_refs[h] += 1
                kind, window = self.spec_kind or (None, None)
                self._stores(sess.event_hashes, None, e.token_ids, e.extra_keys,
                             {"block_size": self.sessions.block_size, "medium": self.pool.medium, "group_idx": 0,
                              "lora_id": e.lora_id, "lora_name": e.lora_name, "kv_cache_spec_kind": kind,
                              "kv_cache_spec_sliding_window": window,
                              "session_id": SESSION_MARK + str(sess.source)}, out)
            elif isinstance(e, SessionGone):
                self._session_gone(e.session, out)
            elif isinstance(e, BlockStored):
                if id(e) in self._reports:
                    self._reports.discard(id(e))
                    out.append(e)
                    continue
                for h in e.block_hashes:
                    self.pool_refs[h] += 1
                self._stores(list(e.block_hashes), e.parent_block_hash, list(e.token_ids), e.extra_keys,
                             {f: getattr(e, f) for f in ("block_size", "lora_id", "medium", "lora_name", "group_idx",
                                                         "kv_cache_spec_kind", "kv_cache_spec_sliding_window",
                                                         "locality", "ownership", "session_id")}, out)
            elif isinstance(e, BlockRemoved):
                if e.group_idx == SESSION_GROUP:
                    # A session key: its block was handed out again, the session is gone.
                    for h in e.block_hashes:
                        sess = self.sessions.forget_key(h)
                        if sess is not None:
                            self._session_gone(sess, out)
                    continue
                for h in e.block_hashes:
                    if self.pool_refs[h] > 1:
                        self.pool_refs[h] -= 1
                    else:
                        self.pool_refs.pop(h, None)  # no entry for what nothing holds (bounded state)
                self._removes(list(e.block_hashes), {"medium": e.medium, "group_idx": e.group_idx}, out)
            elif isinstance(e, AllBlocksCleared):
                self.live.clear()
                self.pool_refs.clear()
                self.session_refs.clear()
                self.sessions.clear()  # every session key went with the pool's hashes
                out.append(e)
            else:
                out.append(e)
        self._reports.clear()  # a report not seen in this batch is not coming
        return out
