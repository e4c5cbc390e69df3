#!/usr/bin/env bash
# Study v2: active vs random acquisition on both offline tasks at equal label budgets.
#   tasks      quickstart (configs/quickstart.yaml: movie-review prefixes, VADER sentiment) and
#              fortunes (configs/fortunes.yaml: fortune-cookie prefixes, Flesch reading ease)
#   budgets    4 rounds x 64 labels: every arm is evaluated at 64, 128, 192 and 256 labels
#   functions  every acquisition function: random, entropy, certainty, uncertainty, hybrid, epistemic,
#              thompson, diverse, diverse_certainty (f_p = 4, f_g = 4, f_d = 2, N = 4 entropy samples;
#              f_d < f_g, so that diverse_certainty designs among fewer pairs than diverse)
#   seeds      0-4: 2 tasks x 9 functions x 5 seeds = 90 runs, each task's 45 sharing one label store
# Wall time on 2 CPU cores (x86-64, vLLM CPU backend): about 22 h for all 90 runs, 11 h a task,
# 2.2 h a seed of a task. From a smoke run (2026-11-29, a quiet 2-core VM): the fortunes arm
# certainty, seed 0, for one round took 2.8 min, round 0 112 s (its plan: 95 s) plus 56 s once per
# run (prompts, eval references, engine start). `apo-dist run --dry-run` plans the nine functions'
# 4 rounds at 117 min a seed of a task (random 9, entropy 11, certainty and uncertainty 12, the four
# feature functions 13 each, hybrid 21); add ~1 min a run, and ~2 min more for entropy and hybrid,
# whose entropy sampling study v1 measured above its plan.
#
#   bash launch/study_v2.sh                    all of it, seed by seed, then the tables
#   bash launch/study_v2.sh fortunes 0-8       a part: arms 0-8 of one task (`list` names them)
#   bash launch/study_v2.sh quickstart 12      one arm
#   bash launch/study_v2.sh aggregate          the tables and plots of what has finished so far
#   bash launch/study_v2.sh list               the arms: task, number, function, seed
# Everything resumes: a finished arm does nothing, an interrupted one continues where it stopped.
# Runs go to runs/study_v2/<task>/; results.md, results.csv and the plots to docs/results/v2/<task>/.
# Extra key=value arguments after the part are config overrides for every run of it.
set -euo pipefail
cd "$(dirname "$0")/.."
TASKS=(quickstart fortunes)
FUNCTIONS=(random entropy certainty uncertainty hybrid epistemic thompson diverse diverse_certainty)
SEEDS=(0 1 2 3 4)
STUDY=(loop.rounds=4 acquisition.labels_per_round=64 acquisition.prompt_factor=4 acquisition.pair_factor=4
       acquisition.diversity_factor=2 scoring.entropy_samples=4 scoring.entropy_from_generation=true)
ARMS=$(( ${#FUNCTIONS[@]} * ${#SEEDS[@]} ))  # arm K: function K / seeds, seed K % seeds (apo-dist sweep's order)

usage() {
  echo "usage: $0 [all | quickstart K[-L] | fortunes K[-L] | aggregate | list] [key=value ...]; arms K are" \
       "0-$((ARMS - 1)) ($0 list names them)" >&2
  exit 2
}

list() {
  for task in "${TASKS[@]}"; do
    for ((k = 0; k < ARMS; k++)); do
      echo "$task $k ${FUNCTIONS[k / ${#SEEDS[@]}]} seed ${SEEDS[k % ${#SEEDS[@]}]}"
    done
  done
}

setup() {
  bash launch/setup_env.sh
  export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  .venv/bin/apo-dist assets
}

arm() {  # arm TASK K [overrides]: run or resume arm K of TASK's sweep
  local task=$1 k=$2
  shift 2
  local functions seeds
  functions=$(IFS=,; echo "${FUNCTIONS[*]}")
  seeds=$(IFS=,; echo "${SEEDS[*]}")
  .venv/bin/apo-dist sweep "configs/$task.yaml" "${STUDY[@]}" "$@" --acquisition "$functions" --seeds "$seeds" \
    --root "runs/study_v2/$task" --task "$k" --no-progress
}

aggregate() {  # the tables and plots of TASK's finished rounds, copied to docs/results/v2/TASK/
  local task=$1
  [ -d "runs/study_v2/$task" ] || return 0
  .venv/bin/apo-dist aggregate "runs/study_v2/$task"
  mkdir -p "docs/results/v2/$task"
  cp "runs/study_v2/$task/results.md" "runs/study_v2/$task/results.csv" runs/study_v2/"$task"/*.png \
    "docs/results/v2/$task/"
}

case "${1:-all}" in
  list)
    list
    ;;
  aggregate)
    setup
    for task in "${TASKS[@]}"; do aggregate "$task"; done
    ;;
  all)
    shift $(( $# > 0 ))
    setup
    for ((s = 0; s < ${#SEEDS[@]}; s++)); do  # seed by seed: a stopped study has whole seeds to compare
      for task in "${TASKS[@]}"; do
        for ((f = 0; f < ${#FUNCTIONS[@]}; f++)); do arm "$task" $(( f * ${#SEEDS[@]} + s )) "$@"; done
      done
    done
    for task in "${TASKS[@]}"; do aggregate "$task"; done
    ;;
  quickstart | fortunes)
    task=$1
    [[ ${2:-} =~ ^([0-9]+)(-([0-9]+))?$ ]] || usage
    first=${BASH_REMATCH[1]} last=${BASH_REMATCH[3]:-${BASH_REMATCH[1]}}
    (( first <= last && last < ARMS )) || usage
    shift 2
    setup
    for ((k = first; k <= last; k++)); do arm "$task" "$k" "$@"; done
    aggregate "$task"
    ;;
  *)
    usage
    ;;
esac
