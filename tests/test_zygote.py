"""The suite's process launcher (hae_lab/zygote.py): a forked child behaves as a fresh
``python`` process, and a command whose environment changes an import-time variable is not
forked at all."""

import json
import os
import sys

import pytest

CHILD = r"""
import json, os, sys
print(json.dumps({"hae_vllm_loaded": any(m == "hae_vllm" or m.startswith("hae_vllm.") for m in sys.modules),
                  "argv": sys.argv, "cwd": os.getcwd(), "knob": os.environ.get("HAE_VLLM_CHECK_DECODE"),
                  "name": __name__, "pid": os.getpid(), "ppid": os.getppid()}))
sys.exit(7)
"""


def test_a_forked_child_is_a_fresh_process(python_run, tmp_path):
    zygote = getattr(python_run, "__self__", None)
    if zygote is None:
        pytest.skip("HAE_VLLM_TEST_NO_ZYGOTE=1")
    forked = zygote.forked
    env = {**os.environ, "HAE_VLLM_CHECK_DECODE": "0"}
    out = python_run([sys.executable, "-c", CHILD, "x", "y"], env=env, cwd=str(tmp_path), capture_output=True,
                     text=True, timeout=120)
    assert zygote.forked == forked + 1, f"not forked: the environment differs in {zygote.last_refusal}"
    assert out.returncode == 7, out.stderr[-2000:]
    seen = json.loads(out.stdout)
    assert seen == {**seen, "hae_vllm_loaded": False, "argv": ["-c", "x", "y"], "cwd": str(tmp_path), "knob": "0",
                    "name": "__main__"}
    assert seen["pid"] != os.getpid() and seen["ppid"] != os.getpid()


def test_an_import_time_variable_runs_a_plain_process(python_run):
    zygote = getattr(python_run, "__self__", None)
    if zygote is None:
        pytest.skip("HAE_VLLM_TEST_NO_ZYGOTE=1")
    plain = zygote.plain
    out = python_run([sys.executable, "-c", "import os; print(os.getppid())"],
                     env={**os.environ, "TRITON_INTERPRET": "0" if os.environ.get("TRITON_INTERPRET") == "1" else "1"}, capture_output=True, text=True, timeout=120)
    assert zygote.plain == plain + 1
    assert int(out.stdout) == os.getpid()  # a child of this process, not of the zygote
