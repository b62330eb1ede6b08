"""A process that imports torch, vLLM and transformers once and forks a fresh child for every
Python command the tests run (``python -m module ...``, ``python -c code ...``,
``python script.py ...``).

Importing vLLM takes about 20 s of one core on the 2-core reference machine; the engine tests
start a fresh Python process for every scenario (an engine wants a clean process), so most of
the suite's time went to those imports.  A forked child is a fresh process all the same: it
has its own engine, its own environment, working directory, ``sys.argv`` and standard streams,
and it exits through the normal interpreter shutdown.  Only the modules imported before the
fork are shared (copy-on-write), and nothing of hae_vllm is among them: the plugin registers
itself in the child, as in any new process.

A command is forked only when its environment differs from the zygote's in variables that
are read when used, never at import (:data:`LAZY_ENV`), or in those the preloaded modules set
when imported (vLLM sets a few; the test process that imported vLLM has them, and the child
gets them as a fresh process importing vLLM would); any other difference (``TRITON_INTERPRET``,
say, which Triton reads when imported) runs it as a plain subprocess.  The zygote never starts
a thread, so forking it is safe.

Usage (``tests/conftest.py``)::

    z = Zygote.start()
    z.run([sys.executable, "-m", "hae_vllm.testing.scenario", spec, out], env=..., timeout=...)
    z.close()
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

PRELOAD = ("torch", "numpy", "PIL.Image", "transformers", "vllm", "vllm.entrypoints.llm", "vllm.v1.engine.llm_engine",
           "vllm.v1.engine.core", "vllm.model_executor.models.llava", "vllm.model_executor.models.qwen2_vl")

# Read by vLLM, hae_vllm and the scenario runner when used, never at import.
LAZY_ENV = frozenset({
    "VLLM_PLUGINS", "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND",
    "VLLM_ALLOW_INSECURE_SERIALIZATION", "HAE_VLLM_DEFER_SCORING_BYTES", "HAE_VLLM_CHECK_HOLES",
    "HAE_VLLM_CHECK_DECODE", "HAE_VLLM_TEST_UNREGISTERED_BACKENDS",
    "PYTEST_CURRENT_TEST",  # pytest's note of the running test: informational, changes every test
})


class Zygote:
    def __init__(self, proc: subprocess.Popen, sock_path: str, env: dict[str, str], tmp: str,
                 import_env: dict[str, str]) -> None:
        self.proc = proc
        self.sock_path = sock_path
        self.env = env
        self.import_env = import_env  # what importing the preloaded modules set
        self._tmp = tmp
        self.forked = 0
        self.plain = 0
        self.last_refusal: list[str] = []  # the variables that sent the last command to a plain process

    @classmethod
    def start(cls, timeout: float = 300) -> "Zygote":
        tmp = tempfile.mkdtemp(prefix="hae_zygote_")
        sock_path = os.path.join(tmp, "sock")
        env = dict(os.environ)
        proc = subprocess.Popen([sys.executable, "-m", "hae_lab.zygote", sock_path], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=open(os.path.join(tmp, "zygote.log"), "w"),
                                env=env, text=True)
        deadline = time.time() + timeout
        line = ""
        while time.time() < deadline and proc.poll() is None:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                line = proc.stdout.readline()
                break
        if not line.startswith("ready"):
            proc.kill()
            raise RuntimeError(f"zygote did not start: {Path(tmp, 'zygote.log').read_text()[-3000:]}")
        return cls(proc, sock_path, env, tmp, json.loads(line[len("ready"):]))

    def eligible(self, argv: Sequence[str], env: dict[str, str] | None, stdin: Any = None) -> bool:
        if self.proc.poll() is not None or stdin is not None or len(argv) < 2 or argv[0] != sys.executable:
            return False
        env = self.env if env is None else env
        changed = {k for k in set(env) | set(self.env) if env.get(k) != self.env.get(k)}
        self.last_refusal = sorted(changed - LAZY_ENV - set(self.import_env))
        return not self.last_refusal

    def run(self, argv: Sequence[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
            timeout: float | None = None, capture_output: bool = False, text: bool = False,
            check: bool = False, **kwargs: Any) -> subprocess.CompletedProcess:
        """``subprocess.run``'s answer for ``argv`` (a Python command), from a forked child when
        the environment allows it, else from a plain subprocess."""
        if not self.eligible(argv, env, kwargs.get("stdin")) or not capture_output or kwargs:
            self.plain += 1
            return subprocess.run(list(argv), env=env, cwd=cwd, timeout=timeout, capture_output=capture_output,
                                  text=text, check=check, **kwargs)
        self.forked += 1
        with tempfile.TemporaryDirectory(prefix="hae_zchild_") as d:
            out, err = os.path.join(d, "out"), os.path.join(d, "err")
            req = {"argv": list(argv[1:]), "env": self.env if env is None else env, "cwd": cwd or os.getcwd(),
                   "stdout": out, "stderr": err}
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(self.sock_path)
                s.sendall((json.dumps(req) + "\n").encode())
                f = s.makefile("r")
                pid = int(f.readline())
                s.settimeout(timeout)
                try:
                    line = f.readline()
                except (socket.timeout, TimeoutError):
                    _kill_group(pid)
                    raise subprocess.TimeoutExpired(list(argv), timeout) from None
            rc = int(line) if line.strip() else -1
            mode = "r" if text else "rb"
            stdout = open(out, mode).read() if os.path.exists(out) else ("" if text else b"")
            stderr = open(err, mode).read() if os.path.exists(err) else ("" if text else b"")
        proc = subprocess.CompletedProcess(list(argv), rc, stdout, stderr)
        if check:
            proc.check_returncode()
        return proc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


# ---------------------------------------------------------------------- the zygote process
def _serve(sock_path: str) -> dict | None:
    """Accept commands until told to stop; returns (in a forked child) the command to run."""
    import importlib
    import threading

    before = dict(os.environ)
    for name in PRELOAD:
        importlib.import_module(name)
    assert threading.active_count() == 1, "a preloaded module started a thread: forking is unsafe"
    import_env = {k: v for k, v in os.environ.items() if before.get(k) != v}
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(16)
    print("ready" + json.dumps(import_env), flush=True)
    waiting: dict[int, socket.socket] = {}  # child pid -> the connection that waits for its exit
    while True:
        ready, _, _ = select.select([srv], [], [], 0.2)
        if ready:
            conn, _ = srv.accept()
            req = json.loads(conn.makefile("r").readline())
            pid = os.fork()
            if pid == 0:
                srv.close()
                conn.close()
                for c in waiting.values():
                    c.close()
                req["import_env"] = import_env
                return req
            conn.sendall(f"{pid}\n".encode())
            waiting[pid] = conn
        while waiting:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            conn = waiting.pop(pid, None)
            if conn is not None:
                try:
                    conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
                except OSError:
                    pass
                conn.close()


def _become(req: dict) -> None:
    """Turn this forked child into ``python *req['argv']`` and run it as ``__main__``."""
    import runpy

    os.setsid()  # its own process group: a timeout kills it and whatever it started
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    for k, v in req["import_env"].items():  # as importing the preloaded modules would set them
        os.environ.setdefault(k, v)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(out, fd)
        os.close(out)
    argv = req["argv"]
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        sys.path[0] = os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[0] == "-c":
        sys.argv = ["-c", *argv[2:]]
        sys.path[0] = ""
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    else:
        sys.argv = list(argv)
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    job = _serve(sys.argv[1])
    if job is not None:
        _become(job)  # a SystemExit or an exception ends this child as it would end `python ...`
