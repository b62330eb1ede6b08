"""Random eviction (seeded): the floor every method must beat.

The permutation depends only on ``seed`` and the prompt length, so it is the same on every
tensor-parallel rank and in every run."""

from __future__ import annotations

import torch

from hae_vllm.policies.base import Policy


class RandomPolicy(Policy):
    name = "random"
    description = "uniformly random candidates (seeded, deterministic across runs and ranks)"
    uses_attention = False

    def scores(self, stats, visual_mask, candidates, cfg):
        gen = torch.Generator().manual_seed(int(cfg.seed))
        return torch.rand(visual_mask.numel(), generator=gen)
