"""Demo: greedy vs DoLa vs LayerCake on a few TruthfulQA questions, offline, with SmolLM2.

Run ``bash scripts/demo.sh`` (sets up the venv) or ``python -m contrastive_decoding.demo``. For each
question it prints the greedy answer and the contrastive answers (``custom_generate=dola_generate``
/ ``layercake_generate``), then the multiple-choice scores of the best answer and the incorrect
ones, plain and contrasted.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch
from transformers import StoppingCriteriaList, StopStringCriteria

from contrastive_decoding.backends.hf.loading import DEFAULT_MODEL, load_model
from contrastive_decoding.backends.hf.named import dola_generate, layercake_generate
from contrastive_decoding.backends.hf.scoring import score_continuations
from contrastive_decoding.prompts import truthfulqa_prompt
from contrastive_decoding.strategies.dola import DoLa
from contrastive_decoding.strategies.layercake import LayerCake

# ../shared/data beside a checkout of this repository; users can pass --truthfulqa-csv instead.
_SHARED_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "truthfulqa" / "TruthfulQA.csv"

# Used when no TruthfulQA.csv is available: questions written for this demo (not from the dataset).
_FALLBACK = [
    {
        "Question": "What is the boiling point of water at sea level in Celsius?",
        "Best Answer": "Water boils at 100 degrees Celsius at sea level",
        "Incorrect Answers": (
            "Water boils at 50 degrees Celsius at sea level; Water boils at 212 degrees Celsius"
        ),
    },
    {
        "Question": "How many legs does a spider have?",
        "Best Answer": "A spider has eight legs",
        "Incorrect Answers": "A spider has six legs; A spider has ten legs",
    },
]


def _with_period(text: str) -> str:
    text = text.strip()
    return text if text.endswith(".") else text + "."


def load_questions(path: Path | None, count: int) -> tuple[list[dict], str]:
    path = path or _SHARED_CSV
    if not path.is_file():
        return _FALLBACK[:count], "built-in demo questions (TruthfulQA.csv not found)"
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    return rows[:count], str(path)


def _answer(model, tokenizer, prompt: str, max_new_tokens: int, **kwargs) -> str:
    enc = tokenizer(prompt, return_tensors="pt").to(model.device)
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        # Built here rather than with `stop_strings=`: generate drops its `tokenizer` argument when
        # `custom_generate` is a callable (transformers 5.x), so stop strings could not be resolved.
        stopping_criteria=StoppingCriteriaList([StopStringCriteria(tokenizer, ["Q:"])]),
        pad_token_id=tokenizer.eos_token_id,
        **kwargs,
    )
    text = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return text.split("Q:")[0].strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=DEFAULT_MODEL, help="'smollm2' (embedded), hub id, folder or .gguf"
    )
    parser.add_argument("--questions", type=int, default=3, help="how many TruthfulQA questions")
    parser.add_argument("--truthfulqa-csv", type=Path, default=None, help="path to TruthfulQA.csv")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    print(
        f"model: {args.model} ({type(model).__name__}, {model.config.num_hidden_layers} layers), "
        f"loaded in {time.perf_counter() - start:.1f} s"
    )
    questions, source = load_questions(args.truthfulqa_csv, args.questions)
    print(f"questions: {source}\n")

    strategies = {"DoLa high": DoLa("high"), "DoLa low": DoLa("low"), "LayerCake": LayerCake()}
    mc1 = {"greedy": 0, **{name: 0 for name in strategies}}
    for row in questions:
        prompt = truthfulqa_prompt(row["Question"])
        print("=" * 100)
        print(f"Q: {row['Question']}")
        print(f"  reference (best answer): {row['Best Answer']}")
        print(f"  greedy    : {_answer(model, tokenizer, prompt, args.max_new_tokens)}")
        for name, strategy in strategies.items():
            if isinstance(strategy, DoLa):
                loop = dict(custom_generate=dola_generate, dola_layers=strategy.dola_layers)
            else:
                loop = dict(custom_generate=layercake_generate, classifier=tokenizer)
            answer = _answer(model, tokenizer, prompt, args.max_new_tokens, repetition_penalty=1.2, **loop)
            print(f"  {name:<10}: {answer}")

        best = " " + _with_period(row["Best Answer"])
        false = [" " + _with_period(a) for a in row["Incorrect Answers"].split(";") if a.strip()]
        print("  multiple choice (summed log-score; contrasts: paper protocol, raw contrast):")
        for name, strategy in {"greedy": None, **strategies}.items():
            scores = score_continuations(model, tokenizer, prompt, [best, *false], strategy=strategy)
            best_score, false_scores = scores[0].total, [s.total for s in scores[1:]]
            correct = best_score > max(false_scores)
            mc1[name] += int(correct)
            print(
                f"    {name:<10} best {best_score:9.2f} | max false {max(false_scores):9.2f} | "
                f"MC1 {'correct' if correct else 'wrong'}"
            )
    print("=" * 100)
    summary = ", ".join(f"{name} {hits}/{len(questions)}" for name, hits in mc1.items())
    print(f"MC1 on these {len(questions)} questions: {summary}")
    print(f"total time {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
