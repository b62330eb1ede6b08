"""The HF oracle for an fp8 KV cache: keys and values rounded as vLLM stores them.

vLLM with ``--kv-cache-dtype fp8`` / ``fp8_e5m2`` writes every key (after RoPE) and value
through the backend's cache-update op, which stores ``x / scale`` in the fp8 format, and
attention reads ``byte * scale`` back, for the prompt's own tokens as well (the CPU backend
attends from the paged cache in prefill too).  The reference does the same to HuggingFace's
``DynamicCache``: every K and V entering it is rounded through the same format, scale and
rounding (:class:`~hae_vllm.kv_format.KVFormat`; the CPU op truncates toward zero, which the
layout probe measures and ``tests/test_fp8.py`` checks byte for byte), so the eager attention
that reads the cache back sees what vLLM's kernel sees.  Evictions are replayed as usual
(:class:`~hae_vllm.testing.oracle.MaskedReplay` works on this oracle unchanged).
"""

from __future__ import annotations

import torch

from hae_vllm.kv_format import KVFormat
from hae_vllm.testing.oracle import HFOracle, Tolerance

# vLLM's CPU op rounds fp8 toward zero (the layout probe finds it; tests/test_fp8.py pins it).
CPU_ROUNDING = "toward_zero"

# Rounding noise of a float32 model with an fp8 KV cache, engine against this oracle.  Both
# sides round the same keys and values the same way, but compute them in a different order
# (fused kernels and vLLM's RoPE against eager HF), and an element within float32 noise of an
# fp8 rounding boundary lands on either side of it: one fp8 step (e5m2: 25%) in one element
# now and then, which moves a tiny model's nearly flat log-probs.  Measured with the oracle
# following the engine's tokens, three requests per model (prefill eviction, decode parks and
# restores, 16-64 tokens): LLaVA fp8_e5m2 worst 0.003, Qwen2-VL fp8 0.010, Qwen2-VL fp8_e5m2
# 0.046 (and one near-tie, 0.007, that an oracle generating on its own takes the other way).
# Replaying the eviction set shifted by one, or on an oracle that does not round, differs by
# at least 1.07 in every request.  The level is 2x the worst correct case.
FP8_LOGPROB_NOISE = 0.1


def fp8_tolerance() -> Tolerance:
    """Log-prob and near-tie tolerance of an fp8 KV cache on a float32 model."""
    return Tolerance(logprob=FP8_LOGPROB_NOISE, near_tie=FP8_LOGPROB_NOISE)


def rounding_cache(fmt: KVFormat, config, k_scale: float = 1.0, v_scale: float = 1.0):
    """A ``DynamicCache`` that stores every key and value as the fp8 cache would hold them."""
    from transformers import DynamicCache

    class RoundingCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            key_states = fmt.round_trip(key_states, k_scale)
            value_states = fmt.round_trip(value_states, v_scale)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    return RoundingCache(config=config)


class RoundedKVOracle(HFOracle):
    """:class:`HFOracle` whose KV cache holds fp8-rounded keys and values.

    ``cache_dtype``: vLLM's ``--kv-cache-dtype`` (``fp8``, ``fp8_e4m3``, ``fp8_e5m2``);
    ``rounding``: the backend's (the CPU op truncates); scales as the engine's layers have
    them (1.0 for checkpoints without KV scales)."""

    def __init__(self, model_path: str, cache_dtype: str, dtype: torch.dtype | str = torch.float32,
                 rounding: str = CPU_ROUNDING, k_scale: float = 1.0, v_scale: float = 1.0,
                 device: str | torch.device = "cpu"):
        super().__init__(model_path, dtype=dtype, device=device)
        self.fmt = KVFormat.named(cache_dtype, self.dtype, rounding)
        if not self.fmt.quantized:
            raise ValueError(f"{cache_dtype!r} is not an fp8 KV cache dtype")
        self.scales = (k_scale, v_scale)

    def _prefill(self, inputs: dict, generated: list[int]):
        cache = rounding_cache(self.fmt, self.model.config, *self.scales)
        return super()._prefill({**inputs, "past_key_values": cache}, generated)
