"""Conversation reuse: a follow-up request continues from the cache an evicting request left.

A chat client re-sends the whole conversation every turn.  vLLM serves the repeated part from
its prefix cache, by content: a block is reused when its chained token hash matches.  An
evicting request's blocks no longer hold what their content hash says (tokens were evicted,
survivors compacted), so they are never registered by content.  Instead, when such a request
is freed (finished or preempted), its blocks - holes, compacted blocks and all - are kept as a
:class:`Session`:

* every live block gets one more hash in vLLM's block pool, a *session key* that binds the
  session (a nonce) and the block's index (vLLM 0.32 keeps several hashes per block).  The
  blocks go back to the free queue like any cached block (LRU, evicted last), and the pool
  removes every hash of a block the moment it hands the block out again: a session whose
  keys are not all still registered on its blocks was (partly) overwritten and is dropped;
* a later request hits the session when its own chained content hashes equal the session's
  for the first ``k`` blocks, its eviction settings are the same (the settings are part of the
  index key) and it agrees with the session's tokens through the session's *horizon*: the
  prompt length every eviction decision in the session saw (its queries chose the victims).
  It then receives the first ``k`` blocks as they are, holes as null placeholders (the way
  vLLM's sliding-window manager returns hits), and computes only what follows.

Session keys are not content: vLLM's KV-event stream (``--kv-events-config``), which prefix-aware
routers replay, never announces them (the pool's ``_insert_block_hash`` emits nothing), so they
carry a reserved group id (:data:`SESSION_GROUP`) and never leave
:class:`hae_vllm.engine.kv_events.RouterStream`.  What a router is told instead is the session
under its *content* hashes (the chain a follow-up that extends the conversation computes), stored
when the session is kept and removed when it can no longer be served.

Semantics: the follow-up turn continues on the memory the conversation kept, as a stateful
chat session would; it never sees an evicted token again.  Tokens after the hit (the rest of
the previous turn's last, partial block and the new turn) are computed attending to the kept
cache.  Only requests without a decode budget keep sessions (the decode stage's per-token
state is not carried over).  ``session_reuse: false`` (engine-wide or per request) turns it off.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm.v1.core.block_pool import BlockPool

    from hae_vllm.config import EvictionConfig

_NONCE = itertools.count()

# Group id of session keys in the block pool (vLLM packs it into the key's last 4 bytes; KV cache
# groups count from 0, so no group of the model's can have it).
SESSION_GROUP = 0xFFFF_FFFF


def _event_key(key) -> object:
    """A block pool key (hash and group id) as vLLM's KV events write its hash."""
    from vllm.v1.core.kv_cache_utils import get_block_hash, maybe_convert_block_hash

    return maybe_convert_block_hash(get_block_hash(key))


def settings_signature(cfg: "EvictionConfig") -> bytes:
    """The settings a session is bound to: a request with other eviction settings must not
    continue from memory another method (or budget) chose."""
    data = {k: v for k, v in cfg.to_dict().items()
            if k not in ("trace_path", "measure_layer_overlap", "default_block_size", "session_reuse",
                         "admission_reserve")}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).digest()


@dataclass
class Session:
    source: str  # request id that left it
    blocks: list  # KVCacheBlock per logical block; the null block for holes
    keys: list  # session key (BlockHashWithGroupId) registered on each live block, None for holes
    hashes: list  # the source's chained content hashes of the same blocks
    horizon: int  # a hit must agree with the source's tokens through this many tokens
    tail: tuple  # the source's tokens from (horizon // block_size) * block_size to horizon
    tail_mm: tuple  # (identifier, offset) of multimodal items overlapping that tail
    signature: bytes
    event_hashes: list = field(default_factory=list)  # ``hashes`` as the KV-event stream writes them
    index_refs: int = 0  # index entries that lead to it (0: it can no longer be hit)
    announced: bool = False  # stored in the KV-event stream (RouterStream)


@dataclass
class SessionKept:
    """Queued in the pool's event list when a session is registered; never published:
    :class:`hae_vllm.engine.kv_events.RouterStream` turns it into stores."""

    session: Session
    token_ids: list  # per block
    extra_keys: list  # per block, as vLLM's events carry them
    lora_id: Any = None
    lora_name: Any = None


@dataclass
class SessionGone:
    """Queued when a session can no longer be served for a reason the pool does not see."""

    session: Session


@dataclass(frozen=True)
class SessionHit:
    session: Session
    num_blocks: int  # blocks served

    @property
    def source(self) -> str:
        return self.session.source

    @property
    def horizon(self) -> int:
        return self.session.horizon


class SessionCache:
    """The sessions of one scheduler, indexed by (chained content hash of a block, settings)."""

    def __init__(self, block_pool: "BlockPool", block_size: int, group_id: int = SESSION_GROUP,
                 max_sessions: int = 4096):
        self.pool = block_pool
        self.block_size = block_size
        self.group_id = group_id
        self.max_sessions = max_sessions
        self._index: OrderedDict[bytes, Session] = OrderedDict()
        self._by_key: dict = {}  # session key as the KV-event stream writes it -> its session
        self.num_registered = 0
        self.num_hits = 0
        self.num_stale = 0  # lookups that found a session whose blocks were reused

    def __len__(self) -> int:
        return len(self._index)

    # ------------------------------------------------------------------ registration
    def register(self, request, blocks: list, num_computed: int, horizon: int, signature: bytes) -> Session | None:
        """Keep ``blocks`` (the request's block list, holes as null blocks) as a session.

        ``num_computed``: tokens whose KV the blocks hold; only whole blocks are kept.
        ``horizon``: see :class:`Session`.  Called before vLLM frees the blocks."""
        from vllm.v1.core.kv_cache_utils import (BlockHash, make_block_hash_with_group_id,
                                                 maybe_convert_block_hash)

        bs = self.block_size
        n = min(num_computed // bs, len(blocks), len(request.block_hashes))
        first = max(horizon // bs, 1)  # fewest blocks a hit may have
        if n < first or horizon > num_computed:
            return None
        nonce = f"hae-session/{next(_NONCE)}/{id(self)}/".encode()
        keys = []
        for i, blk in enumerate(blocks[:n]):
            if blk.is_null:
                keys.append(None)
                continue
            key = make_block_hash_with_group_id(BlockHash(hashlib.sha256(nonce + str(i).encode()).digest()),
                                                self.group_id)
            self.pool._insert_block_hash(key, blk, num_tokens=None)
            keys.append(key)
        lo = (horizon // bs) * bs
        tail_mm = tuple(sorted((f.identifier, f.mm_position.offset) for f in request.mm_features or ()
                               if f.mm_position.offset < horizon and f.mm_position.offset + f.mm_position.length > lo))
        sess = Session(request.request_id, list(blocks[:n]), keys, list(request.block_hashes[:n]), horizon,
                       tuple(request.all_token_ids[lo:horizon]), tail_mm, signature,
                       event_hashes=[maybe_convert_block_hash(h) for h in request.block_hashes[:n]])
        for key in keys:
            if key is not None:
                self._by_key[_event_key(key)] = sess
        if getattr(self.pool, "enable_kv_cache_events", False):
            self.pool.kv_event_queue.append(self._kept_event(request, sess, n))
        for i in range(first - 1, n):
            k = self._key(sess.hashes[i], signature)
            self._unindex(k)
            self._index[k] = sess
            sess.index_refs += 1
        while len(self._index) > self.max_sessions:
            self._unindex(next(iter(self._index)))
        self.num_registered += 1
        return sess

    def _kept_event(self, request, sess: Session, n: int):
        """What the KV-event stream needs to announce ``sess`` (its blocks' tokens and extra
        keys, taken now: the request is gone when the events are published)."""
        from vllm.v1.core.kv_cache_utils import generate_block_hash_extra_keys, to_event_extra_keys

        bs = self.block_size
        tokens = request.all_token_ids
        extra, mm_idx = [], 0
        for i in range(n):
            keys, mm_idx = generate_block_hash_extra_keys(request, i * bs, (i + 1) * bs, mm_idx)
            extra.append(keys)
        lora = request.lora_request
        return SessionKept(sess, list(tokens[: n * bs]), to_event_extra_keys(extra) or [],
                           lora.adapter_id if lora else None, lora.name if lora else None)

    def _unindex(self, k: bytes) -> None:
        """Drop index entry ``k``; a session no entry leads to any more is gone (the stream
        removes what it announced of it)."""
        sess = self._index.pop(k, None)
        if sess is None:
            return
        sess.index_refs -= 1
        if sess.index_refs <= 0:
            self._gone(sess)

    def _gone(self, sess: Session) -> None:
        for key in sess.keys:
            if key is not None:
                self._by_key.pop(_event_key(key), None)
        if sess.announced and getattr(self.pool, "enable_kv_cache_events", False):
            self.pool.kv_event_queue.append(SessionGone(sess))

    def forget_key(self, event_hash) -> Session | None:
        """The pool removed session key ``event_hash`` (its block was handed out again): forget
        its session (no longer servable) and return it, or None when it was forgotten before."""
        sess = self._by_key.pop(event_hash, None)
        if sess is None:
            return None
        for i in range(len(sess.hashes)):
            k = self._key(sess.hashes[i], sess.signature)
            if self._index.get(k) is sess:
                self._index.pop(k)
        sess.index_refs = 0
        for key in sess.keys:
            if key is not None:
                self._by_key.pop(_event_key(key), None)
        return sess

    def clear(self) -> None:
        """The pool dropped every hash (``reset_prefix_cache``): no session can be served."""
        for sess in self._index.values():
            sess.announced = False
        self._index.clear()
        self._by_key.clear()

    def _key(self, block_hash: bytes, signature: bytes) -> bytes:
        return bytes(block_hash) + signature

    # ------------------------------------------------------------------ lookup
    def lookup(self, request, signature: bytes, max_tokens: int) -> SessionHit | None:
        """The longest session hit for ``request``, at most ``max_tokens`` tokens, or None."""
        bs = self.block_size
        hashes = request.block_hashes
        for j in range(min(len(hashes), max_tokens // bs) - 1, -1, -1):
            sess = self._index.get(self._key(hashes[j], signature))
            if sess is None:
                continue
            hit = self._check(sess, request, j + 1)
            if hit is not None:
                self._index.move_to_end(self._key(hashes[j], signature))
                self.num_hits += 1
                return hit
        return None

    def _check(self, sess: Session, request, k: int) -> SessionHit | None:
        """``sess`` serves ``k`` blocks of ``request`` when they are intact and the request
        agrees with it through its horizon."""
        bs = self.block_size
        k = min(k, len(sess.blocks))
        if k * bs < sess.horizon:
            lo = (sess.horizon // bs) * bs
            if k * bs != lo or request.num_tokens <= sess.horizon:
                return None
            if tuple(request.all_token_ids[lo:sess.horizon]) != sess.tail:
                return None
            mm = tuple(sorted((f.identifier, f.mm_position.offset) for f in request.mm_features or ()
                              if f.mm_position.offset < sess.horizon and f.mm_position.offset + f.mm_position.length > lo))
            if mm != sess.tail_mm:
                return None
        cached = self.pool.cached_block_hash_to_block
        for blk, key in zip(sess.blocks[:k], sess.keys[:k]):
            if key is not None and not cached.contain(key, blk.block_id):
                # Handed out again since: these k blocks are gone for good (a shorter hit of
                # the same session may still be intact).
                self.num_stale += 1
                self._unindex(self._key(sess.hashes[k - 1], sess.signature))
                return None
        return SessionHit(sess, k)
