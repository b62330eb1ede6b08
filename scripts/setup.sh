#!/usr/bin/env bash
# Creates .venv at the repository root and installs hae_vllm with vLLM's CPU build, the test
# tools, and the torch/torchvision pair that actually loads (see scripts/overrides-cpu.txt).
# Usage: bash scripts/setup.sh            (CPU, default)
#        HAE_VLLM_TARGET=cuda bash scripts/setup.sh   (CUDA vLLM, no overrides)
set -euo pipefail
cd "$(dirname "$0")/.."
export SSL_CERT_FILE=${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}
# uv ignores PIP_FIND_LINKS, so torch==2.13.0 resolves to PyPI's build, the one torchvision needs.
unset PIP_FIND_LINKS
command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet uv
[ -x .venv/bin/python ] || uv venv --python "$(command -v python3)" .venv
target=${HAE_VLLM_TARGET:-cpu}
if [ "$target" = cpu ]; then
  uv pip install --python .venv/bin/python --override scripts/overrides-cpu.txt -e ".[cpu,test]"
else
  uv pip install --python .venv/bin/python -e ".[cuda,test]"
fi
.venv/bin/python -m hae_vllm.launcher --install-check
