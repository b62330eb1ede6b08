"""Runs tests/kernel_cases.py in a fresh interpreter with TRITON_INTERPRET=1.

Isolation is needed because other tests import vLLM, whose CPU platform setup changes Triton's
global state ("Cannot call @triton.jit'd outside of the scope of a kernel" afterwards)."""

import os
import re
import subprocess
import sys
from pathlib import Path


def test_triton_kernels_match_torch_references():
    here = Path(__file__).parent
    # One process, no zygote: the cases start no engine.
    env = dict(os.environ, TRITON_INTERPRET="1", HAE_VLLM_TEST_NO_ZYGOTE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", str(here / "kernel_cases.py")],
        cwd=here.parent, env=env, capture_output=True, text=True, timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    m = re.search(r"(\d+) passed", out)
    assert m and int(m.group(1)) >= 100, out[-2000:]
