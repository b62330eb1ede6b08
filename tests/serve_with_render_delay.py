"""``vllm serve`` with a test-only delay after rendering (run as the server's launcher).

A chat request whose ``vllm_xargs`` carry ``test_render_delay_s`` sleeps that long after its
prompt was rendered, before it is handed to the engine.  That holds open, deterministically,
the window in which a request rendered *before* validation has already marked its images as
sent in the API process's multimodal cache: a second request with the same image sent during
the window is rendered without the image's data (tests/test_serve.py).

A chat request whose ``vllm_xargs`` carry ``test_drop_engine_mm_cache`` empties the EngineCore's
multimodal cache (P1 only, not the API process's P0) right after it was rendered: an image P0
believed sent is then missing in the engine - vLLM's cache drift, deterministically.
"""

import asyncio
import sys


def _install_delay() -> None:
    from vllm.renderers.online_renderer import OnlineRenderer

    original = OnlineRenderer.render_chat

    async def render_chat(self, request, *args, **kwargs):
        result = await original(self, request, *args, **kwargs)
        delay = float((getattr(request, "vllm_xargs", None) or {}).get("test_render_delay_s", 0))
        if delay:
            await asyncio.sleep(delay)
        return result

    OnlineRenderer.render_chat = render_chat

    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat

    original_request = OpenAIServingChat.render_chat_request

    async def render_chat_request(self, request, *args, **kwargs):
        result = await original_request(self, request, *args, **kwargs)
        if (getattr(request, "vllm_xargs", None) or {}).get("test_drop_engine_mm_cache"):
            await self.engine_client.engine_core.reset_mm_cache_async()
        return result

    OpenAIServingChat.render_chat_request = render_chat_request


if __name__ == "__main__":
    from hae_vllm.launcher import main

    _install_delay()
    sys.argv = ["vllm"] + sys.argv[1:]
    sys.exit(main())
