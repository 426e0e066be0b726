#!/usr/bin/env bash
# The results table: every benchmark x strategy for one model, each run resumable in its own
# folder (rerun this script after an interruption; finished runs are skipped in seconds).
#
#   bash scripts/run_eval_table.sh [MODEL] [OUT_ROOT] [extra `contrastive-decoding eval` args...]
#   e.g. bash scripts/run_eval_table.sh smollm2 runs --limit 100   (OUT_ROOT defaults to runs/)
#        BENCHMARKS="tfqa-hf gsm8k" STRATEGIES="baseline dola-low" bash scripts/run_eval_table.sh
#
# For several GPUs, wrap the eval command: LAUNCH="accelerate launch --num_processes 4 -m"
# (the default runs the installed `contrastive-decoding` entry point).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL="${1:-smollm2}"
OUT="${2:-runs}"   # the committed results/ only when named
shift $(( $# > 2 ? 2 : $# ))
BENCHMARKS="${BENCHMARKS:-tfqa-dola tfqa-hf tfqa-gen factor-news factor-expert strategyqa gsm8k halueval}"
STRATEGIES="${STRATEGIES:-baseline dola-high dola-low layercake}"
PY="${PYTHON:-.venv/bin/python}"
if [ -n "${LAUNCH:-}" ]; then
  CMD=($LAUNCH contrastive_decoding.eval.cli)
else
  CMD=("$PY" -m contrastive_decoding.eval.cli)
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
tag="$(basename "$MODEL" .gguf)"
for bench in $BENCHMARKS; do
  for strategy in $STRATEGIES; do
    "${CMD[@]}" eval --model "$MODEL" --benchmark "$bench" --strategy "$strategy" \
      --out "$OUT/$bench/$tag/$strategy" "$@"
  done
done
"$PY" -m contrastive_decoding.eval.cli table "$OUT"/*/"$tag"/* | tee "$OUT/table-$tag.md"
