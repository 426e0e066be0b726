#!/usr/bin/env python
"""Time of the harness's few-shot generation with and without a cached primer, in one run.

Takes the first ``--questions`` GSM8K test questions behind the 8-shot chain-of-thought primer
and generates them in batches of ``--batch-size`` (greedy, stop at "Q:"), per strategy, twice,
alternating: the whole left-padded prompts, and from a :class:`~contrastive_decoding.PromptCache`
of the primer (each row = primer, padding, its question). Prints the summed times, their ratio,
and how many rows' texts differ between the two.

Example:
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_generation.py --questions 16 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="'smollm2', a Hub id, a folder or a .gguf")
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/gsm8k/test.jsonl"))
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--strategies", nargs="+", default=["baseline", "dola-low"])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)

    import torch
    from contrastive_decoding.eval.benchmarks.gsm8k import read_gsm8k
    from contrastive_decoding.eval.generation import generate_batch
    from contrastive_decoding.eval.prompts import GSM8K_DEMO, GSM8K_STOP, few_shot_prompt
    from contrastive_decoding.eval.strategies import build_strategy

    from contrastive_decoding import PromptCache, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.data)
    if not path.exists():
        raise SystemExit(f"--data {path} not found: give GSM8K's test.jsonl (--data FILE).")
    items = read_gsm8k(path)[: args.questions]
    prompts = [few_shot_prompt(GSM8K_DEMO, it["question"]) for it in items]
    model, tokenizer = load_model(args.model)
    primer_tokens = len(tokenizer(GSM8K_DEMO)["input_ids"])
    prompt_tokens = sum(len(tokenizer(p)["input_ids"]) for p in prompts) / len(prompts)
    print(
        f"{args.model}: {len(prompts)} GSM8K questions, batch {args.batch_size}, {args.max_new_tokens} "
        f"new tokens at most; primer {primer_tokens} tokens of {prompt_tokens:.0f} per prompt on average"
    )
    print("| strategy | full prompts s | cached primer s | ratio | rows whose text differs |")
    print("|---|---:|---:|---:|---:|")
    for name in args.strategies:
        run = build_strategy(model, name, tokenizer=tokenizer)
        cache = PromptCache(GSM8K_DEMO)
        generate_batch(model, tokenizer, prompts[:1], run, 1, GSM8K_STOP, prompt_cache=cache)  # warm-up
        full = cached = 0.0
        differ, budget = 0, args.max_new_tokens
        for lo in range(0, len(prompts), args.batch_size):
            batch = prompts[lo : lo + args.batch_size]
            start = time.perf_counter()
            a = generate_batch(model, tokenizer, batch, run, budget, GSM8K_STOP)
            full += time.perf_counter() - start
            start = time.perf_counter()
            b = generate_batch(model, tokenizer, batch, run, budget, GSM8K_STOP, prompt_cache=cache)
            cached += time.perf_counter() - start
            differ += sum(x.text != y.text for x, y in zip(a, b, strict=True))
        print(f"| {name} | {full:.1f} | {cached:.1f} | {cached / full:.2f} | {differ} of {len(prompts)} |")


if __name__ == "__main__":
    main()
