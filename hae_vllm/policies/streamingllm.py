"""StreamingLLM (Xiao et al., arXiv 2309.17453): attention sinks + a recent window.

Position only: the oldest non-sink tokens go first, so what remains is the sinks and the most
recent tokens.  Modality-blind by default (preset ``evict_text: true``)."""

from __future__ import annotations

import torch

from hae_vllm.policies.base import Policy


class StreamingLLMPolicy(Policy):
    name = "streamingllm"
    description = "attention sinks + recent window: evicts the oldest non-sink tokens (no attention needed)"
    uses_attention = False
    decode_by_position = True

    def scores(self, stats, visual_mask, candidates, cfg):
        return torch.arange(visual_mask.numel(), dtype=torch.float32)
