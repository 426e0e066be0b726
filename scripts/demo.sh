#!/usr/bin/env bash
# Set up the project venv and run the demo, offline, with the embedded SmolLM2-135M-Instruct model:
# a short explanation of what it shows, then greedy vs DoLa vs LayerCake answers and multiple-choice
# scores on three questions (TruthfulQA's own when TruthfulQA.csv is found: see --help).
# Arguments go to `python -m contrastive_decoding.demo` (--questions N, --truthfulqa-csv PATH,
# --builtin, --model ID, --max-new-tokens N).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash scripts/setup_env.sh | tail -n 1)"
HF_HUB_OFFLINE=1 "$PY" -m contrastive_decoding.demo "$@"
