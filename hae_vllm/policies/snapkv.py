"""SnapKV (Li et al., arXiv 2404.14469): observation window + pooling.

The last ``window`` prompt tokens are the observation window (always kept); a key's score is
the attention it receives from the window (head-averaged), smoothed by 1-D pooling of width
``pool_kernel`` so that neighbours of important tokens survive too."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hae_vllm.policies.base import Policy, ScoringRequest, window_mask


class SnapKVPolicy(Policy):
    name = "snapkv"
    description = "observation window (last prompt tokens) attention, pooled over neighbouring positions"

    def scoring(self, num_tokens, visual_mask, cfg):
        return ScoringRequest(layers=(0,), query_mask=window_mask(num_tokens, cfg.window))

    def protected(self, num_tokens, cfg):
        return torch.from_numpy(window_mask(num_tokens, cfg.window))

    def scores(self, stats, visual_mask, candidates, cfg):
        g = stats.first().g[None, None, :]
        k = max(1, cfg.pool_kernel) | 1  # odd, so the output keeps its length
        if cfg.pooling == "avg":
            pooled = F.avg_pool1d(g, k, stride=1, padding=k // 2, count_include_pad=False)
        else:
            pooled = F.max_pool1d(g, k, stride=1, padding=k // 2)
        return pooled[0, 0]
