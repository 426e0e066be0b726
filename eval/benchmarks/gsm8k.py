"""GSM8K (1319 test problems): 8-shot chain of thought, greedy, exact match of the final number.

Prompt: the 8 exemplars (Wei et al. 2022, as in DoLa's ``gsm8k_eval.py``) + "Q: {question}\\nA:";
at most 256 new tokens; stop at "Q:" (and "\\end{code}", as DoLa's script). Extraction (DoLa's
``clean_answer``): lower-case; if "the answer is" occurs take the first number after it, else the
last number in the text; commas removed; a trailing "." dropped; exact string match with the gold
number after "####".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from contrastive_decoding.eval.benchmarks.base import Benchmark, EvalContext, Metric, evaluate_few_shot_cot
from contrastive_decoding.eval.data import DataSource, numbered, read_json_records, require_keys
from contrastive_decoding.eval.errors import DataError
from contrastive_decoding.eval.prompts import GSM8K_ANSWER_TRIGGER, GSM8K_DEMO, GSM8K_SOURCE, GSM8K_STOP

__all__ = ["GSM8K", "extract_answer", "gold_answer"]

_HINT = "GSM8K test.jsonl (one JSON object per line with question and answer '... #### N')"
_GOLD = re.compile(r"#### (\-?[0-9\.\,]+)")
_NUMBER = re.compile(r"-?\d+\.?\d*")


def gold_answer(answer: str) -> str | None:
    """The number after "####", commas removed (``None`` if absent)."""
    match = _GOLD.search(answer)
    return match.group(1).strip().replace(",", "") if match else None


def extract_answer(completion: str) -> str | None:
    """The model's final number (``None`` when the text has no number)."""
    text = completion.lower()
    parts = text.split(GSM8K_ANSWER_TRIGGER.lower())
    triggered = len(parts) > 1
    pred = parts[1] if triggered else parts[-1]
    numbers = _NUMBER.findall(pred.replace(",", ""))
    if not numbers:
        return None
    value = numbers[0] if triggered else numbers[-1]
    return value[:-1] if value.endswith(".") else value


def read_gsm8k(path: Path) -> list[dict[str, Any]]:
    """Items of GSM8K test.jsonl."""
    return _items(read_json_records(path, _HINT), path)


def _items(records: list[Mapping[str, Any]], path: Any) -> list[dict[str, Any]]:
    items = []
    for i, rec in enumerate(records):
        require_keys(rec, ("question", "answer"), path, f"record {i + 1}", _HINT)
        gold = gold_answer(rec["answer"])
        if gold is None:
            raise DataError(f"{path}: record {i + 1} answer has no '#### N' final line; expected {_HINT}.")
        items.append({"question": rec["question"], "gold": gold})
    return numbered(items)


def from_hub(rows: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return _items(rows, "Hub openai/gsm8k")


def evaluate(ctx: EvalContext, items: list[dict]) -> list[dict]:
    return evaluate_few_shot_cot(ctx, items, GSM8K_DEMO, GSM8K_STOP, extract_answer)


GSM8K = Benchmark(
    name="gsm8k",
    description="GSM8K test (1319): 8-shot CoT, greedy, exact match of the final number",
    task="generate",
    source=DataSource(
        local="gsm8k/test.jsonl",
        hub="openai/gsm8k",
        hub_config="main",
        hub_split="test",
        url="https://github.com/openai/grade-school-math (grade_school_math/data/test.jsonl)",
    ),
    read_file=read_gsm8k,
    from_hub=from_hub,
    evaluate=evaluate,
    metrics=(Metric("acc", description="extracted number equals the gold number"),),
    prompt=f"{GSM8K_SOURCE} + 'Q: {{question}}\\nA:'",
    default_protocol=None,
    batch_size=8,
    max_new_tokens=256,
    stop=GSM8K_STOP,
)
