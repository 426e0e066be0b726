#!/usr/bin/env bash
# A second virtualenv with transformers 4.55, the last release with DoLa built into `generate`,
# used by tests/test_generation_reference.py as the independent reference for `dola_generate`.
# Prints its python path on the last line.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CD_REFERENCE_VENV:-.venv-tf455}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" >&2
fi
PY="$VENV/bin/python"
if ! "$PY" -c "import transformers, torch, gguf; assert transformers.__version__.startswith('4.55')" >/dev/null 2>&1; then
  "$PY" -m pip install -q --disable-pip-version-check --upgrade pip >&2
  "$PY" -c "import torch" >/dev/null 2>&1 || "$PY" -m pip install -q --disable-pip-version-check torch==2.13.0 >&2
  "$PY" -m pip install -q --disable-pip-version-check "transformers==4.55.4" "accelerate<2" "gguf" "numpy<3" >&2
fi
echo "$PY"
