"""The attention backends eviction supports, each made from its upstream class.

Eviction needs two things of a backend, and nothing else:

* its metadata builder drops null holes from every block-table row and shortens ``seq_lens``
  by them (:func:`~hae_vllm.attention.common.without_holes`), so attention never reads a hole,
  and leaves the step's host query starts on the metadata it builds
  (:func:`~hae_vllm.attention.common.with_query_starts`: FlashInfer's metadata has no
  ``query_start_loc`` at all, FlashAttention's only the device copy);
* its implementation runs layer-0 scoring after the layer's KV was written
  (:func:`~hae_vllm.attention.common.maybe_score`).

Every paged backend in vLLM 0.32 takes its block table and sequence lengths from
``CommonAttentionMetadata`` in ``build()``, so one subclass recipe fits them all.  The one
other path that builds metadata, ``update_block_table`` (FlashAttention's builder reuses a
previous build with a new block table across KV-cache groups of equal spec), would keep the
old ``seq_lens`` with a new table; eviction accepts a single full-attention group, where vLLM
never takes that path, and the subclass turns it off (``supports_update_block_table =
False``) so a build always runs.  Cascade attention, which computed a common prefix from raw
block tables, was removed from vLLM 0.32 (``GPUModelRunner.cascade_attn_enabled`` is always
False), so no path reads raw tables.

:data:`SUPPORTED` names the backends by vLLM's ``AttentionBackendEnum`` member.  The eviction
classes are built on first access (``hae_vllm.attention.backends.Eviction<upstream class>``),
which is what ``register_backend`` resolves, so a backend whose module cannot be imported
here (FlashInfer without the flashinfer package, CUDA backends on the CPU build) costs
nothing until vLLM asks for it.  Each keeps its upstream ``get_name()``.
"""

from __future__ import annotations

import importlib
from typing import Any

from hae_vllm.attention.common import maybe_score, with_query_starts, without_holes

# AttentionBackendEnum member -> upstream class path.
SUPPORTED: dict[str, str] = {
    "CPU_ATTN": "vllm.v1.attention.backends.cpu_attn.CPUAttentionBackend",
    "FLASH_ATTN": "vllm.v1.attention.backends.flash_attn.FlashAttentionBackend",
    "TRITON_ATTN": "vllm.v1.attention.backends.triton_attn.TritonAttentionBackend",
    "FLASHINFER": "vllm.v1.attention.backends.flashinfer.FlashInferBackend",
}

EVICTION_MARK = "hae_eviction"
"""Class attribute set on eviction backends, builders and implementations."""

_BUILT: dict[str, type] = {}


def eviction_class_name(upstream_path: str) -> str:
    return "Eviction" + upstream_path.rsplit(".", 1)[1]


def eviction_class_path(member: str) -> str:
    return f"{__name__}.{eviction_class_name(SUPPORTED[member])}"


def is_eviction_backend(backend: Any) -> bool:
    return bool(getattr(backend, EVICTION_MARK, False))


def make_eviction_backend(upstream: type) -> type:
    """Subclass ``upstream`` (an ``AttentionBackend``), its builder and its implementation."""
    builder_base = upstream.get_builder_cls()
    impl_base = upstream.get_impl_cls()
    name = eviction_class_name(f"{upstream.__module__}.{upstream.__name__}")

    class Builder(builder_base):  # type: ignore[misc, valid-type]
        supports_update_block_table = False

        def build(self, common_prefix_len, common_attn_metadata, fast_build: bool = False):
            cam = without_holes(common_attn_metadata, self.kv_cache_spec.block_size)
            return with_query_starts(super().build(common_prefix_len, cam, fast_build), cam)

    class Impl(impl_base):  # type: ignore[misc, valid-type]
        def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):
            out = super().forward(layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs)
            maybe_score(self, layer, query, key, kv_cache, attn_metadata)
            return out

    class Backend(upstream):  # type: ignore[misc, valid-type]
        @staticmethod
        def get_impl_cls():
            return Impl

        @staticmethod
        def get_builder_cls():
            return Builder

    for cls, suffix in ((Builder, "MetadataBuilder"), (Impl, "Impl"), (Backend, "")):
        cls.__name__ = cls.__qualname__ = name + suffix
        cls.__module__ = __name__
        setattr(cls, EVICTION_MARK, True)
    return Backend


_SUFFIXES = {"": "backend", "MetadataBuilder": "builder", "Impl": "impl"}


def __getattr__(name: str) -> type:
    """``Eviction<Upstream>`` classes (and their ``...Impl`` / ``...MetadataBuilder``), built once
    on first access: what the backend registry (and pickle) resolves."""
    for path in SUPPORTED.values():
        base = eviction_class_name(path)
        for suffix in _SUFFIXES:
            if name == base + suffix:
                if base not in _BUILT:
                    module, cls = path.rsplit(".", 1)
                    _BUILT[base] = make_eviction_backend(getattr(importlib.import_module(module), cls))
                backend = _BUILT[base]
                return {"": backend, "MetadataBuilder": backend.get_builder_cls(),
                        "Impl": backend.get_impl_cls()}[suffix]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_attention_backends(attn_groups, method: str) -> None:
    """Refuse to start eviction on a layer whose attention does not drop holes.

    ``attn_groups``: the model runner's ``[kv_cache_group][attn_group]`` list, after vLLM chose
    a backend per layer.  A plain backend would read the null block wherever eviction freed one
    (silent corruption), and one that splits blocks into smaller kernel blocks would see holes
    it cannot recognise; both are refused with what to do instead."""
    from hae_vllm.config import EvictionConfigError

    for groups in attn_groups:
        for ag in groups:
            backend = ag.backend
            name = backend.get_name() if hasattr(backend, "get_name") else backend.__name__
            if not is_eviction_backend(backend):
                raise EvictionConfigError(
                    f"--kv-eviction {method}: vLLM chose the attention backend {name} for "
                    f"{len(ag.layer_names)} layer(s) (e.g. {ag.layer_names[0]}), which eviction does not "
                    f"support: it would read freed KV blocks. Supported backends: {', '.join(SUPPORTED)}. "
                    "Pick one with --attention-backend (CUDA), or start without --kv-eviction."
                )
            if getattr(ag, "kernel_block_size", None) is not None:
                raise EvictionConfigError(
                    f"--kv-eviction {method}: attention backend {name} splits KV blocks into kernel "
                    f"blocks of {ag.kernel_block_size} tokens, which eviction does not support; "
                    "start without --kv-eviction."
                )


def platform_refusal(member: str, selector_config) -> str | None:
    """Why this machine's vLLM platform would not run the backend ``member`` (a key of
    :data:`SUPPORTED`) for layers described by ``selector_config`` (vLLM's
    ``AttentionSelectorConfig``), or None when it would.

    Asked exactly as vLLM asks when a user passes ``--attention-backend``: the platform's
    ``get_attn_backend_cls`` (on CUDA it validates the backend's head size, dtype, KV-cache
    dtype, block size and compute capability, and imports its kernels; vLLM's CPU build
    answers CPU_ATTN whatever is asked)."""
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if member not in SUPPORTED:
        return f"eviction does not support it (supported: {', '.join(SUPPORTED)})"
    try:
        path = current_platform.get_attn_backend_cls(AttentionBackendEnum[member], selector_config)
    except Exception as e:  # noqa: BLE001 - the platform's own refusal is the answer
        return f"{type(e).__name__}: {e}"
    if path not in (SUPPORTED[member], eviction_class_path(member)):
        given = [m for m in SUPPORTED if path in (SUPPORTED[m], eviction_class_path(m))]
        return f"vLLM's {current_platform.device_name} platform runs {(given or [path])[0]} in its place"
    return None
