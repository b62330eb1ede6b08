"""``vllm serve`` with a test-only delay after rendering (run as the server's launcher).

A chat request whose ``vllm_xargs`` carry ``test_render_delay_s`` sleeps that long after its
prompt was rendered, before it is handed to the engine.  That holds open, deterministically,
the window in which a request rendered *before* validation has already marked its images as
sent in the API process's multimodal cache: a second request with the same image sent during
the window is rendered without the image's data (tests/test_serve.py).
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


if __name__ == "__main__":
    from hae_vllm.launcher import main

    _install_delay()
    sys.argv = ["vllm"] + sys.argv[1:]
    sys.exit(main())
