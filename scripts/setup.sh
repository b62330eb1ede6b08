#!/usr/bin/env bash
# Creates .venv at the repository root and installs hae_vllm with vLLM's CPU build, the test
# tools, and the torch/torchvision pair that actually loads (see scripts/overrides-cpu.txt),
# then points .venv/bin/vllm at hae_vllm's launcher (see hae_vllm/launcher.py) and builds the
# tiny test models.
#   bash scripts/setup.sh                         CPU (default)
#   HAE_VLLM_TARGET=cuda bash scripts/setup.sh    CUDA vLLM 0.32.0, no overrides
set -euo pipefail
cd "$(dirname "$0")/.."
export SSL_CERT_FILE=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
# uv ignores PIP_FIND_LINKS anyway; unset it so nothing prefers the local torch+cpu wheel,
# which no torchvision wheel loads with.
unset PIP_FIND_LINKS
command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet "uv>=0.5"
[ -x .venv/bin/python ] || uv venv --python "$(command -v python3)" .venv
target=${HAE_VLLM_TARGET:-cpu}
if [ "$target" = cpu ]; then
  uv pip install --python .venv/bin/python --override scripts/overrides-cpu.txt -e ".[cpu,test,bench]"
else
  uv pip install --python .venv/bin/python -e ".[cuda,test,bench]"
fi
# The lab (hae_lab/: tiny-model builders, training, the test and benchmark harnesses) is not part
# of the installed package; this environment imports it from the checkout.
.venv/bin/python - "$PWD" <<'PY'
import pathlib, sys, sysconfig
pathlib.Path(sysconfig.get_paths()["purelib"], "hae_lab_checkout.pth").write_text(sys.argv[1] + "\n")
PY
.venv/bin/python -m hae_vllm.launcher --install-check
HF_HUB_OFFLINE=1 .venv/bin/python -m hae_lab.tiny_models --kind all
