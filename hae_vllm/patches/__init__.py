"""Every change to vLLM lives here: one small function per patched upstream symbol, named after
it, applied once by :func:`hae_vllm.plugin.register` in every vLLM process (API server,
EngineCore, workers).  Patched functions are marked with ``__hae_patched__`` so tests can
prove, per process, that the patch took effect.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

PATCH_MARK = "__hae_patched__"


def is_patched(fn: Any) -> bool:
    fn = getattr(fn, "__func__", fn)
    return bool(getattr(fn, PATCH_MARK, False))


def wraps_patch(original: Callable) -> Callable[[Callable], Callable]:
    """functools.wraps + the patch mark + a handle on the original."""

    def deco(fn: Callable) -> Callable:
        fn = functools.wraps(original)(fn)
        setattr(fn, PATCH_MARK, True)
        fn.__hae_original__ = original  # type: ignore[attr-defined]
        return fn

    return deco
