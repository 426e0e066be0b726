#!/usr/bin/env bash
# Set up everything the tests need (project venv, transformers-4.55 reference venv) and run them,
# then run them again on the oldest supported transformers (set CD_SKIP_MIN_TRANSFORMERS=1 to skip).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash scripts/setup_env.sh | tail -n 1)"
CD_TF455_PYTHON="$(bash scripts/setup_reference_env.sh | tail -n 1)"
export CD_TF455_PYTHON HF_HUB_OFFLINE=1
"$PY" -m ruff check contrastive_decoding tests scripts eval
"$PY" -m pytest "$@"
# The oldest supported transformers (4.57): the same suite, less the real-model and 4.55 checks.
if [ -z "${CD_SKIP_MIN_TRANSFORMERS:-}" ]; then
  MIN_PY="$(CD_VENV=.venv-tf457 CD_TRANSFORMERS="transformers==4.57.6" bash scripts/setup_env.sh | tail -n 1)"
  "$MIN_PY" -m pytest -q -m "not slow" --ignore=tests/test_generation_reference.py "$@"
fi
