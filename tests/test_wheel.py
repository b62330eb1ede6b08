"""The package as users install it: a wheel, installed non-editable into a fresh virtual
environment, away from the source checkout.

The fresh environment gets only the wheel (``--no-deps``); vLLM and torch come from the test
environment's site-packages through a path entry (no ``.pth`` processing there, so the checkout's
editable install of hae_vllm stays invisible).  Everything runs with the working directory
outside the checkout, and the first check is that ``hae_vllm`` was imported from the wheel."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CHECK = r"""
import json, sys, pathlib
import hae_vllm
where = pathlib.Path(hae_vllm.__file__).resolve()
assert str(where).startswith(sys.argv[1]), f"hae_vllm imported from {where}, not the wheel"

from vllm.engine.arg_utils import EngineArgs
from vllm.plugins import load_general_plugins
from vllm.utils.argparse_utils import FlexibleArgumentParser

from hae_vllm.config import EvictionConfigError, build_engine_config, engine_config_from_additional

load_general_plugins()  # the entry point of the installed wheel adds --kv-eviction
parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
out = {}
for argv in (["--kv-eviction", "snapkv"], ["--kv-eviction", "hae"],
             ["--kv-eviction", "hae", "--kv-eviction-config", "hae_thresholds_only"]):
    args = parser.parse_args(["--model", sys.argv[2], *argv])
    cfg = engine_config_from_additional(EngineArgs.from_cli_args(args).additional_config)
    out[" ".join(argv)] = {"method": cfg.method, "budget": cfg.budget, "window": cfg.window}
try:
    build_engine_config("hae", "no_such_preset")
except EvictionConfigError as e:
    out["unknown"] = str(e)
print("@@" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    uv = shutil.which("uv")
    if uv is None:  # scripts/setup.sh installs it
        pytest.fail("uv is not on PATH: run scripts/setup.sh")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # build from a copy: no build/ or egg-info left in the checkout
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".venv", ".git", ".cache", "build", "dist",
                                                             "*.egg-info", "__pycache__", "models", "benchmarks"))
    subprocess.run([uv, "build", "--wheel", "--out-dir", str(tmp / "dist"), str(src)], check=True,
                   capture_output=True, text=True)
    (wheel,) = (tmp / "dist").glob("hae_vllm-*.whl")
    venv = tmp / "venv"
    subprocess.run([uv, "venv", "--python", sys.executable, str(venv)], check=True, capture_output=True)
    py = venv / "bin" / "python"
    subprocess.run([uv, "pip", "install", "--python", str(py), "--no-deps", str(wheel)], check=True,
                   capture_output=True)
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # vLLM, torch and the rest from the test environment, as a plain path entry.
    (Path(site) / "zz_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return wheel, py, site, tmp


def _env() -> dict[str, str]:
    """The environment without anything that would put the checkout on the path."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_wheel_holds_the_runtime_and_its_presets_and_not_the_lab(wheel_env):
    wheel = wheel_env[0]
    names = zipfile.ZipFile(wheel).namelist()
    presets = {Path(n).stem for n in names if n.startswith("hae_vllm/presets/") and n.endswith(".yaml")}
    assert {"hae", "snapkv", "h2o", "madakv", "streamingllm", "fastv", "random"} <= presets
    assert not [n for n in names if n.startswith("hae_lab/") or "/accuracy/" in n or "tiny_models" in n]
    assert "hae_vllm/selfcheck.py" in names and "hae_vllm/testing/oracle.py" in names


def test_installed_wheel_lists_methods_and_applies_presets(wheel_env, llava_path):
    _, py, site, tmp = wheel_env
    listed = subprocess.run([str(py), "-m", "hae_vllm.policies"], cwd=tmp, capture_output=True, text=True,
                            timeout=300, env=_env())
    assert listed.returncode == 0, listed.stderr[-3000:]
    assert {ln.split()[0] for ln in listed.stdout.splitlines()} >= {"none", "hae", "snapkv", "h2o"}

    proc = subprocess.run([str(py), "-c", CHECK, str(Path(site).resolve()), llava_path], cwd=tmp, capture_output=True,
                          text=True, timeout=600, env=_env())
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    import json

    out = json.loads(lines[-1][2:])
    from hae_vllm.config import build_engine_config

    snap = build_engine_config("snapkv")  # the checkout's preset, the reference
    assert out["--kv-eviction snapkv"] == {"method": "snapkv", "budget": snap.budget, "window": snap.window}
    assert snap.budget is not None
    assert out["--kv-eviction hae"]["budget"] == 0.5
    assert out["--kv-eviction hae --kv-eviction-config hae_thresholds_only"]["budget"] is None
    assert "no_such_preset" in out["unknown"] and "hae_thresholds_only" in out["unknown"]
