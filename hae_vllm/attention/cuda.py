"""FLASH_ATTN with eviction (CUDA builds).  Same mechanism as the CPU backend.

NOT verified end to end: no machine here runs vLLM's CUDA build (the lent GPU has torch and
Triton but no vLLM).  What is shared with the CPU path and tested there: hole dropping, the
layout probe (the FlashAttention cache ``[2, num_blocks, block_size, heads, dim]`` is handled by
the same code, checked on CPU tensors in tests/test_layout.py), and the Triton kernels this path
uses for layer-0 scoring and compaction (``hae_vllm.kernels``): the engine runs them on the CPU
cache through Triton's interpreter in tests/test_engine_kernels.py, against the torch path and
the HF oracle.  ``hae_vllm.patches.engine_args`` forces the V1 model runner and piecewise CUDA
graphs when eviction is on: attention (where holes are dropped and layer 0 is scored) then runs
eagerly between captured pieces.
"""

from __future__ import annotations

from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadataBuilder,
)

from hae_vllm.attention.common import maybe_score, without_holes


class EvictionFlashAttentionMetadataBuilder(FlashAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        cam = without_holes(common_attn_metadata, self.kv_cache_spec.block_size)
        return super().build(common_prefix_len, cam, fast_build)


class EvictionFlashAttentionImpl(FlashAttentionImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        maybe_score(self, layer, query, key, kv_cache, attn_metadata)
        return out


class EvictionFlashAttentionBackend(FlashAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return EvictionFlashAttentionImpl

    @staticmethod
    def get_builder_cls():
        return EvictionFlashAttentionMetadataBuilder
