#!/usr/bin/env bash
# Set up the project venv and run the demo: greedy vs DoLa on TruthfulQA questions, offline, with
# the embedded SmolLM2-135M-Instruct model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash scripts/setup_env.sh | tail -n 1)"
HF_HUB_OFFLINE=1 "$PY" -m contrastive_decoding.demo "$@"
