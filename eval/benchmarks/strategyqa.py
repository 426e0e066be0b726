"""StrategyQA (2290 train questions, used as the test set by DoLa): 6-shot chain of thought.

Prompt: the 6 exemplars (Wei et al. 2022, as in DoLa's ``strqa_eval.py``) + "Q: {question}\\nA:";
greedy, at most 256 new tokens, stop at "Q:" or "\\n\\n##". Extraction: lower-case; "thus, yes."
-> yes; else the text after "answer is" up to the first "." must be "yes" or "no"; otherwise the
answer is invalid and counts as wrong. (DoLa's script instead guesses on an invalid answer and
compares "Thus, yes." after lower-casing, which never matches; the spec's rule is used here.)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from contrastive_decoding.eval.benchmarks.base import Benchmark, EvalContext, Metric, evaluate_few_shot_cot
from contrastive_decoding.eval.data import DataSource, numbered, read_json_records, require_keys
from contrastive_decoding.eval.errors import DataError
from contrastive_decoding.eval.prompts import STRATEGYQA_DEMO, STRATEGYQA_SOURCE, STRATEGYQA_STOP

__all__ = ["STRATEGYQA", "extract_answer"]

_HINT = "strategyqa_train.json (a JSON list of objects with question and answer: true/false)"


def extract_answer(completion: str) -> bool | None:
    """``True`` for yes, ``False`` for no, ``None`` when no valid answer is found."""
    text = completion.lower()
    if "thus, yes." in text:
        pred = "yes"
    elif "answer is" in text:
        pred = text.split("answer is")[1].split(".")[0].strip()
    else:
        return None
    if pred not in ("yes", "no"):
        return None
    return pred == "yes"


def read_strategyqa(path: Path) -> list[dict[str, Any]]:
    """Items of strategyqa_train.json."""
    return _items(read_json_records(path, _HINT), path)


def _items(records: list[Mapping[str, Any]], path: Any) -> list[dict[str, Any]]:
    items = []
    for i, rec in enumerate(records):
        require_keys(rec, ("question", "answer"), path, f"record {i + 1}", _HINT)
        if not isinstance(rec["answer"], bool):
            raise DataError(
                f"{path}: record {i + 1} answer is {rec['answer']!r}, not true/false; expected {_HINT}."
            )
        items.append({"question": rec["question"], "gold": rec["answer"], "qid": rec.get("qid")})
    return numbered(items)


def evaluate(ctx: EvalContext, items: list[dict]) -> list[dict]:
    return evaluate_few_shot_cot(ctx, items, STRATEGYQA_DEMO, STRATEGYQA_STOP, extract_answer)


STRATEGYQA = Benchmark(
    name="strategyqa",
    description="StrategyQA train (2290): 6-shot CoT, greedy, yes/no accuracy",
    task="generate",
    source=DataSource(
        local="strategyqa/strategyqa_train.json",
        hub="voidful/StrategyQA",
        hub_file="strategyqa_train.json",
        url="https://storage.googleapis.com/ai2i/strategyqa/data/strategyqa_dataset.zip",
    ),
    read_file=read_strategyqa,
    from_hub=None,
    evaluate=evaluate,
    metrics=(Metric("acc", description="extracted yes/no equals the gold answer (invalid = wrong)"),),
    prompt=f"{STRATEGYQA_SOURCE} + 'Q: {{question}}\\nA:'",
    default_protocol=None,
    batch_size=8,
    max_new_tokens=256,
    stop=STRATEGYQA_STOP,
)
