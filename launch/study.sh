#!/usr/bin/env bash
# The embedded sample-efficiency study (docs/results/README.md): the quickstart task with
# random, entropy, certainty and hybrid acquisition x seeds 0,1,2 at equal label budgets
# (2 rounds x 64 labels), one shared label store; ~1 h on 2 CPU cores.
# The runs go to runs/study/; the table, csv and plot are copied to docs/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/apo-dist assets
.venv/bin/apo-dist sweep configs/quickstart.yaml \
  loop.rounds=2 acquisition.labels_per_round=64 acquisition.prompt_factor=4 acquisition.pair_factor=2 \
  scoring.entropy_samples=4 scoring.entropy_from_generation=true \
  --acquisition random,entropy,certainty,hybrid --seeds 0,1,2 --root runs/study --no-progress "$@"
cp runs/study/results.md runs/study/results.csv runs/study/winrate.png docs/results/
