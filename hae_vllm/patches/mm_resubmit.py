"""A request that hits vLLM's multimodal-cache drift is re-rendered with its data and re-submitted
once, server-side, before any byte of its response body is sent.

The API process renders a request's images through its multimodal processor cache (P0): an
image P0 believes the EngineCore (P1) still holds is sent without its data.  When P1 evicted it
meanwhile, the EngineCore finishes the request with an error and no token (its admission found
no data for ``mm_hash``), ``AsyncLLM`` drops the hash from P0, and vLLM answers 500 (or a 200
stream carrying an error event): the client must retry.  Here the server does:

* ``OpenAIServingChat.render_chat_request`` / ``OpenAIServingCompletion.render_completion_request``
  (patched) leave, in a context variable of the handling task, how to render the request again
  with every multimodal item's data (``skip_mm_cache=True``: P0 is bypassed) and the inputs
  they returned;
* ``AsyncLLM.generate`` (patched, engines with eviction on): when the first output of a
  rendered multimodal input is a finished error with no token and one of its items is no longer
  in P0 (``AsyncLLM`` dropped it on the EngineCore's miss report), the request is rendered again
  with its data and submitted once more; the caller sees the second request's outputs.  The first
  output is the one any response waits for (the chat stream's role chunk included), so nothing
  of the body was sent.

``HAE_VLLM_MM_RESUBMIT=0`` turns it off (vLLM's behaviour).  Requests entering ``AsyncLLM``
directly (not through the OpenAI handlers) have no rendering to repeat and keep vLLM's behaviour.
"""

from __future__ import annotations

import contextvars
import logging
from typing import Any

from hae_vllm.patches import is_patched, wraps_patch

logger = logging.getLogger("vllm.hae_vllm")

# (render again with data: async () -> list of engine inputs, the inputs the first rendering returned)
_RENDERED: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("hae_rendered", default=None)


def _engine_inputs(result) -> list | None:
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], list):
        return result[1]  # chat: (conversation, engine inputs)
    return result if isinstance(result, list) else None


def patch_render_request(cls, name: str, renderer_method: str) -> None:
    original = getattr(cls, name)
    if is_patched(original):
        return

    @wraps_patch(original)
    async def render_request(self, request, *args, **kwargs):
        result = await original(self, request, *args, **kwargs)
        inputs = _engine_inputs(result)
        if inputs and any(isinstance(p, dict) and p.get("mm_hashes") for p in inputs):
            async def again():
                return _engine_inputs(await getattr(self.online_renderer, renderer_method)(request,
                                                                                           skip_mm_cache=True))

            _RENDERED.set((again, inputs))
        else:
            _RENDERED.set(None)
        return result

    setattr(cls, name, render_request)


def _hashes(prompt) -> list[str]:
    hashes = prompt.get("mm_hashes") if isinstance(prompt, dict) else None
    if not hashes:
        return []
    return [h for items in (hashes.values() if isinstance(hashes, dict) else [hashes]) for h in items or ()
            if isinstance(h, str)]


def _is_cache_miss(engine, prompt, out) -> bool:
    """``out`` (a request's first output) is the EngineCore's multimodal-cache miss."""
    if not out.finished or not out.outputs or any(o.finish_reason != "error" or o.token_ids for o in out.outputs):
        return False
    cache = getattr(getattr(engine, "renderer", None), "mm_processor_cache", None)
    hashes = _hashes(prompt)
    return cache is not None and bool(hashes) and any(not cache.is_cached_item(h) for h in hashes)


def _resubmit_enabled(engine) -> bool:
    cached = getattr(engine, "_hae_mm_resubmit", None)
    if cached is None:
        from hae_vllm import envs
        from hae_vllm.config import engine_config_from_additional

        try:
            on = engine_config_from_additional(engine.vllm_config.additional_config).enabled
        except Exception:  # noqa: BLE001 - no eviction config: vLLM's behaviour
            on = False
        cached = engine._hae_mm_resubmit = bool(on and envs.mm_resubmit())
    return cached


def patch_generate(cls) -> None:
    original = cls.generate
    if is_patched(original):
        return

    @wraps_patch(original)
    def generate(self, prompt, sampling_params, request_id, *args, **kwargs):
        rendered = _RENDERED.get()
        if (rendered is None or not _resubmit_enabled(self) or not isinstance(prompt, dict)
                or not any(prompt is p for p in rendered[1])):
            return original(self, prompt, sampling_params, request_id, *args, **kwargs)
        again, inputs = rendered
        index = next(i for i, p in enumerate(inputs) if p is prompt)

        async def with_resubmit():
            first = original(self, prompt, sampling_params, request_id, *args, **kwargs)
            try:
                out = await first.__anext__()
            except StopAsyncIteration:
                return
            if _is_cache_miss(self, prompt, out):
                await first.aclose()
                fresh = await again()
                if fresh is not None and index < len(fresh):
                    logger.warning("request %s: the engine's multimodal cache no longer held an image the "
                                   "API process sent without data; rendered again with its data and "
                                   "re-submitted", request_id)
                    async for o in original(self, fresh[index], sampling_params, request_id, *args, **kwargs):
                        yield o
                    return
            yield out
            async for o in first:
                yield o

        return with_resubmit()

    cls.generate = generate


def apply() -> None:
    from vllm.v1.engine.async_llm import AsyncLLM

    patch_generate(AsyncLLM)
    try:
        from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
        from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
    except ImportError:  # API server extras missing: offline use only
        return
    patch_render_request(OpenAIServingChat, "render_chat_request", "render_chat")
    patch_render_request(OpenAIServingCompletion, "render_completion_request", "render_completion")
