"""Demo: greedy vs DoLa vs LayerCake on a few TruthfulQA questions, offline, with SmolLM2.

Run ``bash scripts/demo.sh`` (sets up the venv) or ``python -m contrastive_decoding.demo``. It first
prints a paragraph on what it shows and how to read it; then, for each question, the greedy answer
and the contrastive answers (``custom_generate=dola_generate`` / ``layercake_generate``), then the
multiple-choice scores of the best answer and the incorrect ones, plain and contrasted.

Questions come from ``TruthfulQA.csv`` when it is found (``--truthfulqa-csv PATH``, else
``truthfulqa/TruthfulQA.csv`` in ``$CD_DATA_DIR`` / ``$CD_SHARED_DATA`` or in ``../shared/data``
beside the checkout, where the harness looks too); otherwise from three questions built in here.
"""

from __future__ import annotations

import argparse
import csv
import os
import textwrap
import time
from pathlib import Path

import torch
from transformers import StoppingCriteriaList, StopStringCriteria
from transformers.utils import logging as hf_logging

from contrastive_decoding.backends.hf.loading import DEFAULT_MODEL, load_model
from contrastive_decoding.backends.hf.named import dola_generate, layercake_generate
from contrastive_decoding.backends.hf.scoring import score_continuations
from contrastive_decoding.prompts import truthfulqa_prompt
from contrastive_decoding.strategies.dola import DoLa
from contrastive_decoding.strategies.layercake import LayerCake

#: Where the file sits inside a data folder (the harness's ``--data-dir`` layout).
CSV_IN_DATA_DIR = Path("truthfulqa") / "TruthfulQA.csv"
#: Upstream copy of the file (Apache-2.0, Lin et al.).
TRUTHFULQA_URL = "https://github.com/sylinrl/TruthfulQA/blob/main/TruthfulQA.csv"
# The harness's data folders: the first of these environment variables that is set, then
# ../shared/data beside a checkout of this repository. A copy of eval/data.py's
# default_data_dirs, because the library never imports its harness (tests/core/test_layering.py).
_DATA_DIR_ENV = ("CD_DATA_DIR", "CD_SHARED_DATA")
_CHECKOUT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Used when no TruthfulQA.csv is available: questions written for this demo (not from the dataset).
BUILTIN_QUESTIONS = [
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
    {
        "Question": "What is the capital of France?",
        "Best Answer": "The capital of France is Paris",
        "Incorrect Answers": "The capital of France is London; The capital of France is Lyon",
    },
]

_SMOLLM2 = "SmolLM2-135M-Instruct"


def _fill(text: str, indent: str = "") -> str:
    # Paths and commands stay whole (not broken at their hyphens), so they can be copied.
    return textwrap.fill(
        text,
        width=100,
        initial_indent=indent,
        subsequent_indent=indent + "  ",
        break_on_hyphens=False,
        break_long_words=False,
    )


def explanation(model_name: str = DEFAULT_MODEL) -> str:
    """The paragraph printed before the tables: what the demo shows and how to read it."""
    if model_name == DEFAULT_MODEL:
        who = _SMOLLM2
        size = (
            "At 135M parameters expect the contrastive answers to be worse than greedy's: in so "
            "small a model the gap between early and late layers carries little factual signal, "
            "so the contrast mostly adds noise (wrong numbers, rambling)."
        )
        exits = "are far from calibrated on this model, so DoLa's sums reach"
    else:
        who = model_name
        size = (
            "On a small model (well under 7B parameters) expect the contrastive answers to be no "
            "better than greedy's, often worse: there the gap between early and late layers "
            "carries little factual signal."
        )
        exits = "can be far from calibrated, and then DoLa's sums reach"
    lines = [
        f"What this demo shows. Answers: {who}'s greedy answer, then DoLa's (the final layer "
        "contrasted with an early exit from the upper or lower half of the layers, chosen per "
        "token) and LayerCake's (the model contrasted with a copy of itself whose attention to "
        "punctuation and concept words is suppressed), with DoLa's repetition penalty 1.2.",
        f"{size} The DoLa paper reports its gains on LLaMA models of 7B to 65B parameters; "
        "LayerCake's layer settings were written for 7B and 13B models.",
        "Multiple choice: `best` is the score of the reference's best answer, `max false` the "
        "highest score of an incorrect one; MC1 is correct when best > max false. Compare the two "
        "numbers of a row, not rows with each other.",
        "Scales: greedy's scores are summed log-probabilities (negative; the nearer 0, the likelier). "
        "The other rows sum the raw contrast over the answer's tokens (DoLa's TruthfulQA-MC rule, "
        "'paper protocol'): for DoLa log q_final - log q_early, where the early exits, read "
        f"without the final norm as DoLa's code does, {exits} hundreds or thousands and grow "
        "with the answer's length. LayerCake's degraded copy stays close to "
        "the model, so its sums stay small.",
        "Next: real numbers with confidence intervals come from `contrastive-decoding eval` "
        "(docs/harness/eval.md); SmolLM2-135M's results on all 817 TruthfulQA questions are in "
        "docs/results.md; a 7B-class model: docs/guides/own-model.md.",
    ]
    return "\n".join(_fill(line) for line in lines)


def data_dirs() -> list[Path]:
    """The data folders searched for ``truthfulqa/TruthfulQA.csv``, in order."""
    dirs = [Path(os.environ[name]) for name in _DATA_DIR_ENV if os.environ.get(name)]
    return [*dirs, _CHECKOUT_DATA]


def find_csv() -> Path | None:
    """``truthfulqa/TruthfulQA.csv`` in the first data folder that has it, or ``None``."""
    return next((d / CSV_IN_DATA_DIR for d in data_dirs() if (d / CSV_IN_DATA_DIR).is_file()), None)


def missing_csv_hint() -> str:
    """Where TruthfulQA.csv would go and how to get it (printed when it is not found)."""
    target = data_dirs()[0]
    return "\n".join(
        [
            "  TruthfulQA.csv was not found. To ask TruthfulQA's own questions, put it at",
            f"    {target / CSV_IN_DATA_DIR}",
            "  (the data folder: $CD_DATA_DIR if set, else ../shared/data beside the checkout),",
            "  or pass --truthfulqa-csv PATH. Get it from",
            f"    {TRUTHFULQA_URL}",
            "  or with",
            f"    contrastive-decoding data get tfqa-dola --to {target}",
        ]
    )


def load_questions(path: Path | None, count: int, builtin: bool = False) -> tuple[list[dict], str]:
    """``count`` questions and a line saying where they come from.

    ``path`` (``--truthfulqa-csv``) must exist; without it the data folders are searched, and the
    built-in questions are used when no file is found (or ``builtin`` is set).
    """
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"--truthfulqa-csv {path}: no such file")
    found = None if builtin else (Path(path) if path is not None else find_csv())
    if found is None:
        rows = BUILTIN_QUESTIONS[:count]
        note = "" if count <= len(BUILTIN_QUESTIONS) else f"; asked for {count}"
        source = f"the {len(rows)} built-in demo questions (written for this demo{note})"
        if not builtin:
            source += "\n" + missing_csv_hint()
        return rows, source
    with open(found, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))[:count]
    return rows, f"the first {len(rows)} questions of {found}"


def _with_period(text: str) -> str:
    text = text.strip()
    return text if text.endswith(".") else text + "."


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
    parser.add_argument(
        "--questions",
        type=int,
        default=len(BUILTIN_QUESTIONS),
        help=f"how many questions (default {len(BUILTIN_QUESTIONS)}; {len(BUILTIN_QUESTIONS)} are built in)",
    )
    parser.add_argument(
        "--truthfulqa-csv",
        type=Path,
        default=None,
        help=f"path to TruthfulQA.csv (default: {CSV_IN_DATA_DIR} in $CD_DATA_DIR or ../shared/data)",
    )
    parser.add_argument(
        "--builtin", action="store_true", help="use the built-in questions even where TruthfulQA.csv is found"
    )
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args(argv)
    if args.questions < 1:
        parser.error("--questions must be at least 1")
    try:
        questions, source = load_questions(args.truthfulqa_csv, args.questions, args.builtin)
    except FileNotFoundError as error:
        parser.error(str(error))

    print(explanation(args.model) + "\n", flush=True)
    torch.manual_seed(0)
    hf_logging.disable_progress_bar()  # a weight-loading bar between the explanation and the answers
    start = time.perf_counter()
    model, tokenizer = load_model(args.model)
    print(
        f"model: {args.model} ({type(model).__name__}, {model.config.num_hidden_layers} layers), "
        f"loaded in {time.perf_counter() - start:.1f} s"
    )
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
        print("  multiple choice (summed; greedy: log-probabilities; others: paper protocol, raw contrast):")
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
    print(
        f"(a handful of questions says little: the harness runs all 817 with confidence intervals, "
        f"see docs/results.md)\ntotal time {time.perf_counter() - start:.1f} s"
    )


if __name__ == "__main__":
    main()
