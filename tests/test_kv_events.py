"""vLLM's KV-event stream (``--kv-events-config``: what llm-d's and Dynamo's prefix-aware
routers replay to learn what an instance caches) with eviction's sessions, on vLLM's own
BlockPool: replayed into a router's ledger, every removal names an announced, live block, every
stored block's parent is live, and what the ledger holds is what the instance serves (content
blocks and kept sessions, announced under their content hashes)."""

import pytest

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.block_pool import BlockPool  # noqa: E402
from vllm.v1.core.kv_cache_utils import (  # noqa: E402
    get_block_hash, get_group_id, get_request_block_hasher, init_none_hash, maybe_convert_block_hash,
)
from vllm.v1.request import Request  # noqa: E402

from hae_lab.conversation import kv_event_dict, replay_kv_events  # noqa: E402
from hae_vllm.config import EvictionConfig  # noqa: E402
from hae_vllm.engine.kv_events import SESSION_MARK, RouterStream  # noqa: E402
from hae_vllm.engine.sessions import SESSION_GROUP, SessionCache, settings_signature  # noqa: E402

BS = 4
init_none_hash(sha256)
HASHER = get_request_block_hasher(BS, sha256)
SIG = settings_signature(EvictionConfig(method="hae", budget=0.5))
PROMPT = list(range(100, 122))  # 22 tokens
OUTPUT = [7, 8, 9, 10, 11, 12]


class Ledger:
    """A router's view of one instance, built from the stream as llm-d and Dynamo build it."""

    def __init__(self) -> None:
        self.live: set = set()
        self.problems: list = []

    def apply(self, events) -> None:
        problems, _, self.live = replay_kv_events([kv_event_dict(e) for e in events], self.live)
        self.problems += problems


def _content_hashes(pool) -> set:
    """What the pool would serve by content: its hashes outside the session group."""
    return {maybe_convert_block_hash(get_block_hash(k)) for k in pool.cached_block_hash_to_block._cache
            if get_group_id(k) != SESSION_GROUP}


def _chain_match(ledger: Ledger, request) -> int:
    """Blocks a router matches for ``request``: the longest announced chain of its hashes."""
    n = 0
    for h in request.block_hashes:
        if maybe_convert_block_hash(h) not in ledger.live:
            break
        n += 1
    return n


def _turn(pool, cache, ledger, take, rid="a", holes=(2, 3)):
    """A turn whose first two blocks are cached by content (before its first eviction
    candidate) and whose blocks ``holes`` became holes, kept as a session when freed."""
    a = Request(rid, list(PROMPT), SamplingParams(max_tokens=8), None, block_hasher=HASHER)
    for t in OUTPUT:
        a.append_output_token_ids(t)
    blocks = pool.get_new_blocks(7)
    pool.cache_full_blocks(a, blocks, 0, 2, BS, 0)  # the untouched prefix, announced
    ledger.apply(take())
    for i in holes:
        pool.free_blocks([blocks[i]])
        blocks[i] = pool.null_block
    sess = cache.register(a, blocks, a.num_tokens - 1, horizon=len(PROMPT), signature=SIG)
    assert sess is not None and all(get_group_id(k) == SESSION_GROUP for k in sess.keys if k is not None)
    pool.free_blocks(reversed([b for b in blocks if not b.is_null]))
    ledger.apply(take())
    return sess


def _follow_up():
    return Request("b", PROMPT + OUTPUT + [40, 41, 42], SamplingParams(max_tokens=8), None, block_hasher=HASHER)


def _conversation_then_reuse(pool, take, cache=None):
    """A turn kept as a session; a follow-up served from it; then every block handed out
    again.  ``take``: how events leave the pool."""
    ledger = Ledger()
    cache = cache if cache is not None else SessionCache(pool, BS)
    _turn(pool, cache, ledger, take)
    b = _follow_up()
    hit = cache.lookup(b, SIG, b.num_tokens - 1)
    assert hit is not None and hit.num_blocks == 6
    served = hit.session.blocks[: hit.num_blocks]
    pool.touch(served)
    pool.free_blocks(reversed(served))
    ledger.apply(take())
    matched = _chain_match(ledger, b)
    pool.get_new_blocks(pool.get_num_free_blocks())  # other requests take every block
    ledger.apply(take())
    assert cache.lookup(b, SIG, b.num_tokens - 1) is None, "the overwritten session is not served"
    return ledger, matched, hit.num_blocks


def test_the_stream_a_router_replays_is_faithful_and_places_follow_ups():
    """Through RouterStream: no orphan, no unannounced removal; the router matches the
    follow-up on exactly the blocks the session serves (holes included), and once the blocks
    are handed out again it holds nothing."""
    pool = BlockPool(num_gpu_blocks=16, enable_caching=True, hash_block_size=BS, enable_kv_cache_events=True)
    cache = SessionCache(pool, BS)
    stream = RouterStream(pool, cache)
    ledger, matched, served = _conversation_then_reuse(pool, lambda: stream.take(pool.take_events()), cache)
    assert not ledger.problems, ledger.problems
    assert matched == served == 6
    assert ledger.live == _content_hashes(pool) == set()
    # Nothing is kept about hashes nothing holds any more (the stream's state stays bounded).
    assert not stream.live and not stream.pool_refs and not stream.session_refs and not cache._by_key


def test_session_stores_are_marked_and_chained():
    pool = BlockPool(num_gpu_blocks=16, enable_caching=True, hash_block_size=BS, enable_kv_cache_events=True)
    cache = SessionCache(pool, BS)
    stream = RouterStream(pool, cache)
    ledger = Ledger()
    sess = _turn(pool, cache, ledger, lambda: stream.take(pool.take_events()))
    # every block is live in the ledger: 2 by content, 4 by the session (one store, parent = block 1)
    assert ledger.live == set(sess.event_hashes)
    pool2 = BlockPool(num_gpu_blocks=16, enable_caching=True, hash_block_size=BS, enable_kv_cache_events=True)
    cache2 = SessionCache(pool2, BS)
    stream2 = RouterStream(pool2, cache2)
    events = []
    _turn(pool2, cache2, Ledger(), lambda: events.extend(stream2.take(pool2.take_events())) or [])
    stores = [e for e in events if type(e).__name__ == "BlockStored"]
    assert [len(e.block_hashes) for e in stores] == [2, 4]
    assert stores[0].session_id is None and stores[1].session_id == SESSION_MARK + "a"
    assert stores[1].parent_block_hash == stores[0].block_hashes[-1]
    assert stores[1].token_ids == (PROMPT + OUTPUT)[8:24]


def test_a_session_the_index_lets_go_leaves_the_stream():
    """Sessions beyond the index's capacity can no longer be hit: their blocks are removed from
    the router's view although the pool still holds them (else a router would over-promise)."""
    pool = BlockPool(num_gpu_blocks=32, enable_caching=True, hash_block_size=BS, enable_kv_cache_events=True)
    cache = SessionCache(pool, BS, max_sessions=1)
    stream = RouterStream(pool, cache)
    ledger = Ledger()
    take = lambda: stream.take(pool.take_events())  # noqa: E731
    a = _turn(pool, cache, ledger, take, rid="a")
    ledger_before = set(ledger.live)
    # A second conversation (other tokens) pushes the first out of the one-entry index.
    c = Request("c", [t + 1000 for t in PROMPT], SamplingParams(max_tokens=8), None, block_hasher=HASHER)
    for t in OUTPUT:
        c.append_output_token_ids(t)
    blocks = pool.get_new_blocks(7)
    sc = cache.register(c, blocks, c.num_tokens - 1, horizon=len(PROMPT), signature=SIG)
    pool.free_blocks(reversed(blocks))
    ledger.apply(take())
    assert not ledger.problems, ledger.problems
    assert cache.lookup(_follow_up(), SIG, 30) is None
    # a's content blocks (0, 1) are still served by content; its session blocks are not
    assert ledger.live == set(a.event_hashes[:2]) | set(sc.event_hashes)
    assert ledger_before == set(a.event_hashes)


def test_duplicate_blocks_are_removed_once():
    """Two blocks computed with the same content (two requests at once): vLLM stores the hash
    twice and removes it twice; a router's ledger sees the second removal as of a block it no
    longer holds.  Through RouterStream it is removed when its last holder goes."""
    for through in (False, True):
        pool = BlockPool(num_gpu_blocks=8, enable_caching=True, hash_block_size=BS, enable_kv_cache_events=True)
        stream = RouterStream(pool, SessionCache(pool, BS))
        take = (lambda: stream.take(pool.take_events())) if through else pool.take_events
        ledger = Ledger()
        for rid in ("x", "y"):
            r = Request(rid, list(PROMPT[:8]), SamplingParams(max_tokens=1), None, block_hasher=HASHER)
            blocks = pool.get_new_blocks(2)
            pool.cache_full_blocks(r, blocks, 0, 2, BS, 0)
            pool.free_blocks(reversed(blocks))
        ledger.apply(take())
        pool.get_new_blocks(pool.get_num_free_blocks())
        ledger.apply(take())
        assert ledger.live == set()
        assert bool(ledger.problems) is not through, ledger.problems


def test_without_the_stream_session_keys_leak_as_unannounced_removals():
    """The same run read straight from the pool: the removals of the session's four keys name
    blocks no router was told of, and the follow-up is matched on 2 blocks, not the 6 served."""
    pool = BlockPool(num_gpu_blocks=16, enable_caching=True, hash_block_size=BS, enable_kv_cache_events=True)
    ledger, matched, served = _conversation_then_reuse(pool, pool.take_events)
    assert len(ledger.problems) == 4 and all("never announced" in p[0] for p in ledger.problems), ledger.problems
    assert (matched, served) == (2, 6)


def test_a_cleared_prefix_cache_forgets_sessions():
    """``reset_prefix_cache`` drops every hash, session keys included: the stream says
    AllBlocksCleared, no session is served afterwards, and a new one is announced afresh."""
    pool = BlockPool(num_gpu_blocks=16, enable_caching=True, hash_block_size=BS, enable_kv_cache_events=True)
    cache = SessionCache(pool, BS)
    stream = RouterStream(pool, cache)
    ledger = Ledger()
    take = lambda: stream.take(pool.take_events())  # noqa: E731
    _turn(pool, cache, ledger, take)
    assert pool.reset_prefix_cache()
    ledger.apply(take())
    assert ledger.live == set() and len(cache) == 0
    assert cache.lookup(_follow_up(), SIG, 30) is None
    sess = _turn(pool, cache, ledger, take, rid="a2")
    assert not ledger.problems, ledger.problems
    assert ledger.live == set(sess.event_hashes)
