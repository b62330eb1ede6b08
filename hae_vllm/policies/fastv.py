"""FastV (Chen et al., arXiv 2403.06764): visual tokens ranked by attention at layer K.

At decoder layer ``fastv_layer`` (the paper's K=2), each visual token's score is the average
attention it receives from the prompt tokens that can see it.  Visual tokens only."""

from __future__ import annotations

import numpy as np

from hae_vllm.policies.base import Policy, ScoringRequest


class FastVPolicy(Policy):
    name = "fastv"
    description = "visual tokens ranked by the average attention they receive at decoder layer K (default 2)"

    def scoring(self, num_tokens, visual_mask, cfg):
        return ScoringRequest(layers=(cfg.fastv_layer,), query_mask=np.ones(num_tokens, dtype=bool),
                              needs_max=False)

    def candidates(self, visual_mask, cfg):
        return visual_mask.clone()

    def scores(self, stats, visual_mask, candidates, cfg):
        st = stats.first()
        return st.g / st.count.clamp(min=1)
