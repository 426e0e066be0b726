#!/usr/bin/env python
"""Time of multiple-choice scoring with and without a cached few-shot primer, in one run.

For the first ``--questions`` TruthfulQA-MC questions (lm-eval's protocol: the six-pair primer,
every distinct mc1/mc2 answer), each question is scored twice per strategy, alternating: full
passes (``score_continuations`` as is) and with a :class:`~contrastive_decoding.PromptCache` of the
primer. Prints the summed times, their ratio, and the largest score difference between the two.

Example:
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_scoring.py --questions 12
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="'smollm2', a Hub id, a folder or a .gguf")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/truthfulqa/mc_task.json"))
    parser.add_argument("--questions", type=int, default=12)
    args = parser.parse_args(argv)

    from contrastive_decoding.eval.benchmarks.truthfulqa_mc import hf_prompt
    from contrastive_decoding.eval.prompts import TRUTHFULQA_QA_PAIRS

    from contrastive_decoding import DoLa, InducedContrast, PromptCache, load_model, score_continuations

    path = Path(args.data)
    if not path.exists():
        raise SystemExit(f"--data {path} not found: give TruthfulQA's mc_task.json (--data FILE).")
    records = json.loads(path.read_text(encoding="utf-8"))[: args.questions]
    model, tokenizer = load_model(args.model)
    print(f"{args.model}: {len(records)} TruthfulQA-MC questions, lm-eval primer")
    print("| strategy | full passes s | cached primer s | ratio | max abs score diff |")
    print("|---|---:|---:|---:|---:|")
    for name, strategy in (("plain", None), ("dola-high", DoLa("high")), ("icd", InducedContrast())):
        cache = PromptCache(TRUTHFULQA_QA_PAIRS)
        warm = hf_prompt(records[0]["question"])
        score_continuations(model, tokenizer, warm, [" a"], strategy=strategy, prompt_cache=cache)
        full = cached = diff = 0.0
        for record in records:
            prompt = hf_prompt(record["question"])
            answers = [" " + c for c in dict.fromkeys([*record["mc1_targets"], *record["mc2_targets"]])]
            start = time.perf_counter()
            a = score_continuations(model, tokenizer, prompt, answers, strategy=strategy)
            full += time.perf_counter() - start
            start = time.perf_counter()
            b = score_continuations(model, tokenizer, prompt, answers, strategy=strategy, prompt_cache=cache)
            cached += time.perf_counter() - start
            diff = max([diff] + [abs(x.total - y.total) for x, y in zip(a, b, strict=True)])
        print(f"| {name} | {full:.2f} | {cached:.2f} | {cached / full:.2f} | {diff:.2g} |")


if __name__ == "__main__":
    main()
