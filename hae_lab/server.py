"""Start and stop ``vllm serve`` on loopback for tests and benchmarks (the command users type)."""

from __future__ import annotations

import base64
import io
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_data_url(seed: int, size: int = 224) -> str:
    from hae_lab.tiny_models import make_test_image

    buf = io.BytesIO()
    make_test_image(seed, size).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@contextmanager
def vllm_server(model: str, args: list[str], log_path: Path, timeout: float = 300,
                launcher: list[str] | None = None, kv_space_gib: int | None = 1,
                env: dict | None = None) -> Iterator[str]:
    """``vllm serve model --host 127.0.0.1 --port P *args``; yields the base URL once /health
    answers, terminates the server on exit.  Raises :class:`ServerError` with the log tail if it
    dies or does not start.  ``launcher`` replaces the ``vllm`` command (tests wrap it);
    ``kv_space_gib`` sets ``VLLM_CPU_KVCACHE_SPACE`` unless the environment has it, None unsets it
    (the command exactly as a user types it); ``env``: more environment for the server."""
    import requests

    port = free_port()
    launcher = launcher or [str(Path(sys.executable).parent / "vllm")]
    cmd = [*launcher, "serve", model, "--host", "127.0.0.1", "--port", str(port), *args]
    env = {**os.environ, **(env or {})}
    if kv_space_gib is None:
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    else:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_space_gib))
    with open(log_path, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise ServerError(f"server died:\n{log_path.read_text()[-4000:]}")
            try:
                if requests.get(base + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise ServerError(f"server did not start:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def is_alive(base: str) -> bool:
    import requests

    try:
        return requests.get(base + "/health", timeout=5).status_code == 200
    except requests.RequestException:
        return False
