"""The part of a prompt no eviction can touch, shared by the scheduler and the worker.

Tokens before a request's first eviction candidate (after its sinks) are never evicted, moved
by prefill compaction or parked by the decode stage, so the whole blocks they fill keep exactly
what their prefix-cache hash says: the scheduler registers them in vLLM's prefix cache as
usual (a system prompt, the text before the first image for visual-only methods), and the
worker protects them.  Both sides compute the boundary with :func:`untouched_prefix_tokens`
from the same inputs (the request's config and the positions of its multimodal tokens).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from hae_vllm.config import EvictionConfig


def visual_mask_from_features(mm_features, num_tokens: int) -> np.ndarray:
    """Positions of embedded multimodal tokens (is_embed honoured).  [num_tokens] bool."""
    mask = np.zeros(num_tokens, dtype=bool)
    for feat in mm_features or ():
        pos = feat.mm_position
        lo, hi = pos.offset, min(pos.offset + pos.length, num_tokens)
        if hi <= lo:
            continue
        if pos.is_embed is None:
            mask[lo:hi] = True
        else:
            emb = pos.is_embed.cpu().numpy().astype(bool)[: hi - lo]
            mask[lo:hi] |= emb
    return mask


def candidate_mask(cfg: "EvictionConfig", visual_mask: np.ndarray) -> np.ndarray:
    """Positions the method may ever evict: [len(visual_mask)] bool.  Sinks never are; the
    decode stage may park text and visual tokens alike."""
    import torch

    from hae_vllm.policies.registry import get_policy

    mask = np.asarray(visual_mask, dtype=bool)
    if cfg.decode_enabled:
        cand = np.ones_like(mask)
    else:
        cand = get_policy(cfg.method).candidates(torch.from_numpy(mask), cfg).numpy().copy()
    cand[: cfg.sink_tokens] = False
    return cand


def untouched_prefix_tokens(cfg: "EvictionConfig", visual_mask: np.ndarray, block_size: int) -> int:
    """Whole-block prefix (in tokens) before the first position the method may evict.

    ``visual_mask``: [num_prompt_tokens] bool.  A prompt with no candidate at all is untouched
    up to its last full block.  With a decode budget only the sinks are untouched."""
    if not cfg.enabled:
        return 0
    idx = np.flatnonzero(candidate_mask(cfg, visual_mask))
    first = int(idx[0]) if len(idx) else len(visual_mask)
    return first // block_size * block_size


def has_candidates_after(cfg: "EvictionConfig", visual_mask: np.ndarray, start: int) -> bool:
    """Whether the method may evict a position ``>= start`` (a request whose prefix-cache or
    conversation hit covers every candidate has nothing to decide).  Both the scheduler and
    the worker ask this with the same inputs."""
    if not cfg.enabled:
        return False
    if cfg.decode_enabled:
        return True
    return bool(candidate_mask(cfg, visual_mask)[start:].any())
