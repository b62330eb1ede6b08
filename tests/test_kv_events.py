"""vLLM's KV-event stream (``--kv-events-config``: what llm-d's and Dynamo's prefix-aware
routers replay to learn what an instance caches) with eviction's sessions, on vLLM's own
BlockPool: replayed into a router's ledger, every removal names an announced, live block and
every stored block's parent is live."""

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
from hae_vllm.engine.sessions import SESSION_GROUP, SessionCache, announced_only, settings_signature  # noqa: E402

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


def _conversation_then_reuse(pool, take):
    """A turn whose first two blocks are cached by content (before its first eviction
    candidate) and whose blocks 2 and 3 became holes, kept as a session; a follow-up served
    from it; then every block handed out again.  ``take``: how events leave the pool."""
    ledger = Ledger()
    cache = SessionCache(pool, BS)
    a = Request("a", list(PROMPT), SamplingParams(max_tokens=8), None, block_hasher=HASHER)
    for t in OUTPUT:
        a.append_output_token_ids(t)
    blocks = pool.get_new_blocks(7)
    pool.cache_full_blocks(a, blocks, 0, 2, BS, 0)  # the untouched prefix, announced
    ledger.apply(take())
    for i in (2, 3):
        pool.free_blocks([blocks[i]])
        blocks[i] = pool.null_block
    sess = cache.register(a, blocks, a.num_tokens - 1, horizon=len(PROMPT), signature=SIG)
    assert sess is not None and all(get_group_id(k) == SESSION_GROUP for k in sess.keys if k is not None)
    pool.free_blocks(reversed([b for b in blocks if not b.is_null]))
    ledger.apply(take())
    b = Request("b", PROMPT + OUTPUT + [40, 41, 42], SamplingParams(max_tokens=8), None, block_hasher=HASHER)
    hit = cache.lookup(b, SIG, b.num_tokens - 1)
    assert hit is not None and hit.num_blocks == 6
    served = hit.session.blocks[: hit.num_blocks]
    pool.touch(served)
    pool.free_blocks(reversed(served))
    ledger.apply(take())
    assert ledger.live == _content_hashes(pool)
    pool.get_new_blocks(pool.get_num_free_blocks())  # other requests take every block
    ledger.apply(take())
    assert ledger.live == _content_hashes(pool) == set()
    assert cache.lookup(b, SIG, b.num_tokens - 1) is None, "the overwritten session is not served"
    return ledger


def test_the_stream_a_router_replays_is_faithful():
    pool = BlockPool(num_gpu_blocks=16, enable_caching=True, hash_block_size=BS, enable_kv_cache_events=True)
    ledger = _conversation_then_reuse(pool, lambda: announced_only(pool.take_events()))
    assert not ledger.problems, ledger.problems


def test_without_the_filter_session_keys_leak_as_unannounced_removals():
    """The same run read straight from the pool: the removals of the session's four keys name
    blocks no router was told of (what announced_only exists for)."""
    pool = BlockPool(num_gpu_blocks=16, enable_caching=True, hash_block_size=BS, enable_kv_cache_events=True)
    ledger = _conversation_then_reuse(pool, pool.take_events)
    assert len(ledger.problems) == 4 and all("never announced" in p[0] for p in ledger.problems), ledger.problems
