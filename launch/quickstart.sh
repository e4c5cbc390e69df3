#!/usr/bin/env bash
# The offline quickstart end to end: environment, assets, a 2-round active-DPO run, report.
# Extra arguments are config overrides, e.g. `bash launch/quickstart.sh loop.rounds=3`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/apo-dist assets
exec .venv/bin/apo-dist run configs/quickstart.yaml --run-dir runs/quickstart "$@"
