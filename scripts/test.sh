#!/usr/bin/env bash
# Set up everything the tests need (project venv, transformers-4.55 reference venv) and run them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash scripts/setup_env.sh | tail -n 1)"
CD_TF455_PYTHON="$(bash scripts/setup_reference_env.sh | tail -n 1)"
export CD_TF455_PYTHON HF_HUB_OFFLINE=1
"$PY" -m ruff check contrastive_decoding tests scripts eval
"$PY" -m pytest "$@"
