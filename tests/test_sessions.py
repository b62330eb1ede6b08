"""Conversation reuse (hae_vllm.engine.sessions) on vLLM's own BlockPool and Request objects:
which blocks a follow-up request is served, block id for block id, and when it is not."""

import pytest

pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.block_pool import BlockPool  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

from hae_vllm.config import EvictionConfig  # noqa: E402
from hae_vllm.engine.sessions import SessionCache, settings_signature  # noqa: E402

BS = 4
init_none_hash(sha256)
HASHER = get_request_block_hasher(BS, sha256)
SIG = settings_signature(EvictionConfig(method="hae", budget=0.5))


def request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=8), None, block_hasher=HASHER)


def finished(rid: str, prompt: list[int], output: list[int]) -> Request:
    r = request(rid, prompt)
    for t in output:
        r.append_output_token_ids(t)
    return r


@pytest.fixture
def pool():
    return BlockPool(num_gpu_blocks=32, enable_caching=True, hash_block_size=BS)


def evicted_turn(pool, prompt, output, holes):
    """A request's blocks as eviction left them (``holes``: indices now null), its KV computed
    for every token but the last output."""
    req = finished("a", prompt, output)
    n = -(-(req.num_tokens - 1) // BS)
    blocks = pool.get_new_blocks(n)
    for i in holes:
        pool.free_blocks([blocks[i]])
        blocks[i] = pool.null_block
    return req, blocks, req.num_tokens - 1


PROMPT = list(range(100, 122))  # 22 tokens: 5 full blocks and 2 tokens
OUTPUT = [7, 8, 9, 10, 11, 12]  # computed: 27 tokens -> 6 full blocks


def test_follow_up_is_served_the_kept_blocks(pool):
    cache = SessionCache(pool, BS)
    a, blocks, computed = evicted_turn(pool, PROMPT, OUTPUT, holes=[2, 3])
    sess = cache.register(a, blocks, computed, horizon=len(PROMPT), signature=SIG)
    assert sess is not None and len(sess.blocks) == 6
    pool.free_blocks(reversed([b for b in blocks if not b.is_null]))  # what vLLM does next
    free_before = pool.get_num_free_blocks()
    b = request("b", PROMPT + OUTPUT + [40, 41, 42, 43, 44])
    hit = cache.lookup(b, SIG, b.num_tokens - 1)
    assert hit is not None and hit.num_blocks == 6 and hit.source == "a"
    served = hit.session.blocks[: hit.num_blocks]
    assert [x.block_id for x in served] == [x.block_id for x in blocks[:6]]  # whole blocks only
    assert [x.is_null for x in served] == [False, False, True, True, False, False]
    # vLLM's bookkeeping of a hit: touch, then free when the request ends.
    pool.touch(served)
    assert pool.get_num_free_blocks() == free_before - 4
    pool.free_blocks(reversed(served))
    assert pool.get_num_free_blocks() == free_before
    assert all(x.ref_cnt == 0 for x in pool.blocks[1:])


def test_hit_stops_where_the_follow_up_diverges_but_not_before_the_horizon(pool):
    cache = SessionCache(pool, BS)
    a, blocks, computed = evicted_turn(pool, PROMPT, OUTPUT, holes=[2])
    cache.register(a, blocks, computed, horizon=len(PROMPT), signature=SIG)
    # The re-sent answer differs from the generated tokens at position 23: five whole blocks
    # agree, and the prompt's last two tokens (the horizon's tail) too.
    b = request("b", PROMPT + [7, 99, 98, 97, 96, 95])
    hit = cache.lookup(b, SIG, b.num_tokens - 1)
    assert hit is not None and hit.num_blocks == 5
    # Divergence inside the prompt's tail (before the horizon): the eviction decision saw
    # tokens this request does not have.
    c = request("c", PROMPT[:21] + [55] + OUTPUT)
    assert cache.lookup(c, SIG, c.num_tokens - 1) is None
    # Divergence in an earlier block: no hit.
    d = request("d", [1] + PROMPT[1:] + OUTPUT)
    assert cache.lookup(d, SIG, d.num_tokens - 1) is None


def test_other_settings_never_hit(pool):
    cache = SessionCache(pool, BS)
    a, blocks, computed = evicted_turn(pool, PROMPT, OUTPUT, holes=[2])
    cache.register(a, blocks, computed, horizon=len(PROMPT), signature=SIG)
    b = request("b", PROMPT + OUTPUT + [1, 2])
    other = settings_signature(EvictionConfig(method="hae", budget=0.6))
    assert cache.lookup(b, other, b.num_tokens - 1) is None
    # The engine-wide-only fields and the knob itself do not change what is kept.
    same = settings_signature(EvictionConfig(method="hae", budget=0.5, trace_path="/tmp/x", session_reuse=False))
    assert cache.lookup(b, same, b.num_tokens - 1) is not None


def test_a_reused_block_ends_the_session(pool):
    cache = SessionCache(pool, BS)
    a, blocks, computed = evicted_turn(pool, PROMPT, OUTPUT, holes=[2])
    cache.register(a, blocks, computed, horizon=len(PROMPT), signature=SIG)
    pool.free_blocks(reversed([b for b in blocks if not b.is_null]))
    b = request("b", PROMPT + OUTPUT + [1, 2])
    # Take every free block: the session's are handed out last (cached blocks are evicted
    # last) but they are handed out, and the pool drops their hashes.
    taken = pool.get_new_blocks(pool.get_num_free_blocks())
    assert {x.block_id for x in blocks if not x.is_null} <= {x.block_id for x in taken}
    assert cache.lookup(b, SIG, b.num_tokens - 1) is None
    assert cache.num_stale >= 1


def test_only_the_tail_block_reused_leaves_a_shorter_hit(pool):
    cache = SessionCache(pool, BS)
    a, blocks, computed = evicted_turn(pool, PROMPT, OUTPUT, holes=[2])
    cache.register(a, blocks, computed, horizon=len(PROMPT), signature=SIG)
    # Block 5 (the output's) is overwritten by someone else; blocks 0-4 are intact and
    # cover the horizon's whole blocks: a five-block hit remains.
    pool._maybe_evict_cached_block(blocks[5])
    b = request("b", PROMPT + OUTPUT + [1, 2])
    hit = cache.lookup(b, SIG, b.num_tokens - 1)
    assert hit is not None and hit.num_blocks == 5


def test_nothing_kept_before_the_horizon_is_covered(pool):
    cache = SessionCache(pool, BS)
    a, blocks, computed = evicted_turn(pool, PROMPT, [7], holes=[2])  # computed 22 < 24
    assert cache.register(a, blocks, computed, horizon=len(PROMPT) + 4, signature=SIG) is None
