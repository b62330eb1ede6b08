"""Growth-aware admission: the free blocks a waiting request must leave to the running ones.

vLLM admits a waiting request as soon as its prompt's blocks are free (its watermark is 0), and
preempts the newest running request when a running one cannot get its next block.  With
eviction, a request holds a fraction of its prompt's blocks after prefill but grows by as many
blocks as without eviction, so filling the pool as vLLM does commits more future growth per
block held, and a preempted request's compacted cache is rarely reusable
(docs/how-it-works.md, "Admission under memory pressure").

The reserve held back is what the running requests are expected to grow into, estimated as
SGLang's scheduler does for its admission (``new_token_ratio``; facts from sglang's
``Scheduler``, no code taken):

* each running request may still generate ``max_tokens - generated`` tokens (clipped at
  :data:`CLIP_NEW_TOKENS`, as SGLang clips its estimate); it is expected to generate ``ratio``
  of them, of which the free slots of its last block need no new block;
* ``ratio`` starts at :data:`INIT_RATIO`, decays linearly to ``INIT_RATIO * MIN_RATIO_FACTOR``
  over :data:`DECAY_STEPS` steps with running requests, and goes back to the start when the
  engine is idle;
* a preemption shows the estimate was too low: ``ratio`` is raised to the share of their
  ``max_tokens`` the running requests have actually generated, plus :data:`RETRACT_STEPS`
  tokens each (what they will need soon), so a workload whose requests run to ``max_tokens``
  keeps a high reserve and one whose requests stop early decays to a low one.

The reserve is applied through vLLM's own watermark (``KVCacheManager.watermark_blocks``,
the larger of vLLM's and ours; running requests may still use every block), at most half
the pool.  ``admission_reserve`` set to a number replaces it by that fixed share.
"""

from __future__ import annotations

import math

INIT_RATIO = 0.7
MIN_RATIO_FACTOR = 0.14
DECAY_STEPS = 600
RETRACT_STEPS = 20
CLIP_NEW_TOKENS = 4096
MAX_RESERVE_SHARE = 0.5


class GrowthReserve:
    """The reserve, in blocks, recomputed before every ``schedule()`` from the running requests
    (anything with ``num_tokens``, ``num_output_tokens`` and ``max_tokens``)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.min_ratio = INIT_RATIO * MIN_RATIO_FACTOR
        self.decay = (INIT_RATIO - self.min_ratio) / DECAY_STEPS
        self.ratio = INIT_RATIO
        self.preemptions = 0  # seen since start (the raises they caused)

    def expected_growth(self, request) -> int:
        """Blocks ``request`` is expected to need beyond those it holds."""
        remaining = min(max(0, request.max_tokens - request.num_output_tokens), CLIP_NEW_TOKENS)
        tokens = math.ceil(self.ratio * remaining) - (-request.num_tokens) % self.block_size
        return max(0, -(-tokens // self.block_size))

    def blocks(self, running) -> int:
        """The reserve for this step; decays the ratio (or resets it when nothing runs)."""
        if not running:
            self.ratio = INIT_RATIO
            return 0
        reserve = sum(self.expected_growth(r) for r in running)
        self.ratio = max(self.min_ratio, self.ratio - self.decay)
        return min(reserve, int(MAX_RESERVE_SHARE * self.num_blocks))

    def preempted(self, running) -> None:
        """A request was preempted: raise the ratio to what the running requests (the victim
        among them) have actually generated of their budgets."""
        self.preemptions += 1
        reqs = list(running)
        budget = sum(min(r.max_tokens, CLIP_NEW_TOKENS) for r in reqs)
        if budget:
            done = sum(min(r.num_output_tokens, CLIP_NEW_TOKENS) for r in reqs) + RETRACT_STEPS * len(reqs)
            self.ratio = min(1.0, max(self.ratio, done / budget))
