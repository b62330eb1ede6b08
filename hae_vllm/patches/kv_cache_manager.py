"""The eviction scheduler's changes to its own KV cache manager (EngineCore process).

Unlike the other patches these change single objects, not classes: vLLM builds the KV cache
manager inside ``Scheduler.__init__`` and offers no way to choose its classes, and patching
``FullAttentionManager`` or ``KVCacheManager`` themselves would change every engine in the
process, with or without eviction.  :class:`hae_vllm.engine.scheduler.EvictionScheduler` calls
these on the objects it owns, right after ``Scheduler.__init__`` built them.
"""

from __future__ import annotations

from typing import Any, Callable

from hae_vllm.patches import is_patched, wraps_patch


def patch_full_attention_manager(mgr: Any) -> bool:
    """Re-class one ``FullAttentionManager`` instance as
    :class:`~hae_vllm.engine.kv_manager.EvictableFullAttentionManager` (a subclass with no
    state of its own, so the object stays valid).  Returns whether ``mgr`` was one."""
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager

    from hae_vllm.engine.kv_manager import EvictableFullAttentionManager

    if type(mgr) is not FullAttentionManager:
        return False
    mgr.__class__ = EvictableFullAttentionManager
    return True


def patch_get_computed_blocks(kv_cache_manager: Any, lookup: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Route this ``KVCacheManager``'s ``get_computed_blocks(request)`` to ``lookup``; return
    the original (bound) method, which ``lookup`` calls for vLLM's own content hit."""
    original = kv_cache_manager.get_computed_blocks
    if is_patched(original):
        return original.__hae_original__

    @wraps_patch(original)
    def get_computed_blocks(request):
        return lookup(request)

    kv_cache_manager.get_computed_blocks = get_computed_blocks
    return original
