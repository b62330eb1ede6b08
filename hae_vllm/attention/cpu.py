"""CPU_ATTN with eviction: the builder drops null holes, the impl scores the first layer."""

from __future__ import annotations

from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
)

from hae_vllm.attention.common import maybe_score, without_holes


class EvictionCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
        cam = without_holes(common_attn_metadata, self.block_size)
        return super().build(common_prefix_len, cam, fast_build)


class EvictionCPUAttentionImpl(CPUAttentionBackendImpl):
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
        out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
        maybe_score(self, layer, query, key, kv_cache, attn_metadata)
        return out


class EvictionCPUAttentionBackend(CPUAttentionBackend):
    @staticmethod
    def get_impl_cls():
        return EvictionCPUAttentionImpl

    @staticmethod
    def get_builder_cls():
        return EvictionCPUAttentionMetadataBuilder
