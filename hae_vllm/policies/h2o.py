"""H2O (Zhang et al., arXiv 2306.14048): heavy hitters by accumulated attention + recent window.

Every prompt token is a query; a key's score is the attention it accumulated from all of them
(head-averaged) at the scoring layer.  The recent window (``recent_tokens``) is protected."""

from __future__ import annotations

import numpy as np

from hae_vllm.policies.base import Policy, ScoringRequest


class H2OPolicy(Policy):
    name = "h2o"
    description = "heavy hitters: accumulated attention from all prompt tokens, plus a protected recent window"

    def scoring(self, num_tokens, visual_mask, cfg):
        return ScoringRequest(layers=(0,), query_mask=np.ones(num_tokens, dtype=bool), needs_max=False)

    def scores(self, stats, visual_mask, candidates, cfg):
        return stats.first().g
