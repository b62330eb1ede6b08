"""Growth-aware admission: the free blocks a waiting request must leave to the running ones.

vLLM admits a waiting request as soon as its prompt's blocks are free (its watermark is 0), and
preempts the newest running request when a running one cannot get its next block.  With
eviction, a request holds a fraction of its prompt's blocks after prefill but grows by as many
blocks as without eviction, so filling the pool as vLLM does commits more future growth per
block held, and a preempted request's compacted cache is rarely reusable
(docs/how-it-works.md, "Admission under memory pressure").

The reserve is the most blocks the running requests will need beyond those they hold, if each
generates what it is expected to and frees its blocks when it finishes, nothing admitted
meanwhile (:func:`peak_extra_blocks`): requests near their end free blocks that others grow
into, so the reserve is the peak of the running set's net growth, not the sum of its growth.

What a request is expected to generate follows SGLang's scheduler (its ``new_token_ratio``;
facts from sglang's ``Scheduler``, no code taken): its remaining ``max_tokens``, clipped at
:data:`CLIP_NEW_TOKENS`, times ``ratio``, which starts at :data:`INIT_RATIO` and decays linearly
to ``INIT_RATIO * MIN_RATIO_FACTOR`` over :data:`DECAY_STEPS` steps with running requests (the
engine grows bolder while nothing goes wrong) and starts again when the engine idles; a preemption shows it was too bold: the ratio is
raised to what the running requests have generated of their budgets plus
:data:`RETRACT_STEPS` tokens each.  So the reserve adapts to the workload and to the pool's size
rather than being a fixed share of it.

Applied through vLLM's own watermark (``KVCacheManager.watermark_blocks``, the larger of vLLM's
and ours; running requests may still use every block), at most half the pool.
``admission_reserve`` set to a number replaces it by that fixed share.
"""

from __future__ import annotations

import math

import numpy as np

CLIP_NEW_TOKENS = 4096
INIT_RATIO = 0.7
MIN_RATIO_FACTOR = 0.14
DECAY_STEPS = 600
RETRACT_STEPS = 20
MAX_RESERVE_SHARE = 0.5
MAX_EVAL_TIMES = 256  # finish times the peak is evaluated at (quantiles beyond that)


def peak_extra_blocks(num_tokens, remaining, block_size: int) -> int:
    """The most blocks requests holding ``num_tokens`` tokens will need beyond the blocks they
    hold, if request ``r`` writes ``remaining[r]`` more tokens (one per step, all in step) and
    frees all its blocks after its last, nothing else admitted.

    Between two finishes the need only grows, so its peak is reached just before a request
    finishes: it is evaluated at every finish time (at most :data:`MAX_EVAL_TIMES` of them,
    quantiles of the finish times beyond that)."""
    n = np.asarray(num_tokens, dtype=np.int64)
    rem = np.asarray(remaining, dtype=np.int64)
    if n.size == 0:
        return 0
    held = -(-n // block_size)
    first = held * block_size - n + 1  # the step that writes the first token of a new block
    new = np.where(rem >= first, (rem - first) // block_size + 1, 0)
    times = np.unique(rem)
    if times.size > MAX_EVAL_TIMES:
        times = np.unique(np.quantile(rem, np.linspace(0, 1, MAX_EVAL_TIMES), method="higher"))
    t = times[:, None]
    grown = np.clip((t - first[None, :]) // block_size + 1, 0, new[None, :])
    alive = rem[None, :] >= t  # finishing at t: still holds its blocks just before
    need = np.where(alive, grown, -held[None, :]).sum(axis=1)
    return int(max(0, need.max()))


class GrowthReserve:
    """The reserve, in blocks, recomputed before every ``schedule()`` from the running requests
    (anything with ``num_tokens``, ``num_output_tokens`` and ``max_tokens``)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ratio = INIT_RATIO
        self.preemptions = 0  # seen since start

    def expected_remaining(self, request) -> int:
        left = min(max(0, request.max_tokens - request.num_output_tokens), CLIP_NEW_TOKENS)
        return math.ceil(self.ratio * left)

    def blocks(self, running) -> int:
        """The reserve for this step; the ratio then decays by one step (back to its start
        when nothing runs, as SGLang resets it when idle)."""
        if not running:
            self.ratio = INIT_RATIO
            return 0
        need = peak_extra_blocks([r.num_tokens for r in running], [self.expected_remaining(r) for r in running],
                                 self.block_size)
        self.ratio = max(INIT_RATIO * MIN_RATIO_FACTOR, self.ratio - INIT_RATIO * (1 - MIN_RATIO_FACTOR) / DECAY_STEPS)
        return min(need, int(MAX_RESERVE_SHARE * self.num_blocks))

    def preempted(self, running) -> None:
        """A request was preempted: raise the ratio to what the running requests (the victim
        among them) have generated of their budgets, plus a few steps each."""
        self.preemptions += 1
        reqs = list(running)
        budget = sum(min(r.max_tokens, CLIP_NEW_TOKENS) for r in reqs)
        if budget:
            done = sum(min(r.num_output_tokens, CLIP_NEW_TOKENS) for r in reqs) + RETRACT_STEPS * len(reqs)
            self.ratio = min(1.0, max(self.ratio, done / budget))
