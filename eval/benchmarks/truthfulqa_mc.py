"""TruthfulQA multiple choice (817 questions), in both published protocols.

- ``tfqa-dola`` (the DoLa authors' ``tfqa_mc_eval.py``): TruthfulQA.csv; true answers = "Correct
  Answers" split on ";" (stripped, "." added), false = "Incorrect Answers" likewise, best = "Best
  Answer" (+"."); prompt = the primer WITH its instruction line + "Q: {question}\\nA:",
  continuation " {answer}"; MC1/MC2/MC3 as ``MC_calcs`` (underflow halving included).
- ``tfqa-hf`` (lm-eval ``truthfulqa_mc1``/``truthfulqa_mc2``; Hub ``truthful_qa``
  multiple_choice): mc1_targets (true choice first) and mc2_targets; prompt = the same six Q/A
  pairs WITHOUT the instruction line; mc1 = argmax, mc2 = normalised true mass.

Every answer of a question is scored in one ``score_continuations`` call.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from contrastive_decoding.eval.benchmarks.base import Benchmark, EvalContext, Metric, layer_histogram
from contrastive_decoding.eval.data import (
    DataSource,
    numbered,
    read_csv_rows,
    read_json_records,
    require_keys,
)
from contrastive_decoding.eval.errors import DataError
from contrastive_decoding.eval.metrics import tfqa_mc_dola, tfqa_mc_hf
from contrastive_decoding.eval.prompts import (
    TRUTHFULQA_PRIMER,
    TRUTHFULQA_PRIMER_SOURCE,
    TRUTHFULQA_QA_PAIRS,
    TRUTHFULQA_QA_PAIRS_SOURCE,
)

__all__ = ["TFQA_DOLA", "TFQA_HF", "format_best", "split_multi_answer"]

_CSV_COLUMNS = ("Question", "Best Answer", "Correct Answers", "Incorrect Answers")
_CSV_HINT = (
    "TruthfulQA.csv (columns Type, Category, Question, Best Answer, Correct Answers, Incorrect Answers)"
)
_MC_HINT = "TruthfulQA mc_task.json / multiple_choice jsonl (question, mc1_targets, mc2_targets)"

CSV_SOURCE = DataSource(
    local="truthfulqa/TruthfulQA.csv",
    hub="truthfulqa/truthful_qa",
    hub_config="generation",
    hub_split="validation",
    url="https://github.com/sylinrl/TruthfulQA (TruthfulQA.csv)",
)
MC_SOURCE = DataSource(
    local="truthfulqa/v0/mc_task.json",
    hub="truthfulqa/truthful_qa",
    hub_config="multiple_choice",
    hub_split="validation",
    url="https://github.com/sylinrl/TruthfulQA (data/v0/mc_task.json)",
)


def split_multi_answer(answers: str, sep: str = ";") -> list[str]:
    """Reference answers from a ";"-joined string: each stripped, "." appended if missing."""
    out = []
    for a in answers.strip().split(sep):
        a = a.strip()
        if a:
            out.append(a if a.endswith(".") else a + ".")
    return out


def format_best(best: str) -> str:
    """The best answer, stripped, with a final "."."""
    best = best.strip()
    return best if best.endswith(".") else best + "."


def _csv_item(row: Mapping[str, Any], path: Any, where: str) -> dict[str, Any]:
    true = split_multi_answer(row["Correct Answers"])
    false = split_multi_answer(row["Incorrect Answers"])
    best = format_best(row["Best Answer"]) if row["Best Answer"].strip() else ""
    if not true or not false or not best:
        raise DataError(f"{path}: {where} has no best, true or false answer; expected {_CSV_HINT}.")
    return {"question": row["Question"], "best": best, "true": true, "false": false}


def read_csv(path: Path) -> list[dict[str, Any]]:
    """Items of TruthfulQA.csv (DoLa protocol)."""
    rows = read_csv_rows(path, _CSV_COLUMNS, _CSV_HINT)
    return numbered(_csv_item(row, path, f"row {i + 2}") for i, row in enumerate(rows))


def csv_from_hub(rows: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Items from the Hub ``truthful_qa`` generation split (answers are lists there)."""
    converted = [
        {
            "Question": r["question"],
            "Best Answer": r["best_answer"],
            "Correct Answers": ";".join(r["correct_answers"]),
            "Incorrect Answers": ";".join(r["incorrect_answers"]),
        }
        for r in rows
    ]
    return numbered(_csv_item(row, "Hub truthful_qa", f"row {i}") for i, row in enumerate(converted))


def _targets(value: Any, path: Any, where: str) -> tuple[list[str], list[int]]:
    """Choices and labels from either the mc_task.json form ({choice: label}) or the Hub /
    jsonl form ({"choices": [...], "labels": [...]})."""
    if isinstance(value, Mapping) and "choices" in value and "labels" in value:
        choices, labels = list(value["choices"]), [int(x) for x in value["labels"]]
    elif isinstance(value, Mapping):
        choices, labels = list(value), [int(x) for x in value.values()]
    else:
        raise DataError(f"{path}: {where} targets are not a mapping; expected {_MC_HINT}.")
    if not choices or len(choices) != len(labels) or 0 not in labels or 1 not in labels:
        raise DataError(
            f"{path}: {where} needs true and false choices with matching labels; expected {_MC_HINT}."
        )
    return choices, labels


def _mc_items(records: list[Mapping[str, Any]], path: Any) -> list[dict[str, Any]]:
    items = []
    for i, rec in enumerate(records):
        where = f"record {i + 1}"
        require_keys(rec, ("question", "mc1_targets", "mc2_targets"), path, where, _MC_HINT)
        mc1, mc1_labels = _targets(rec["mc1_targets"], path, where)
        mc2, mc2_labels = _targets(rec["mc2_targets"], path, where)
        if mc1_labels[0] != 1 or sum(mc1_labels) != 1:
            raise DataError(
                f"{path}: {where} mc1_targets must have one true choice, listed first; expected {_MC_HINT}."
            )
        items.append({"question": rec["question"], "mc1": mc1, "mc2": mc2, "mc2_labels": mc2_labels})
    return numbered(items)


def read_mc(path: Path) -> list[dict[str, Any]]:
    """Items of mc_task.json or the multiple_choice JSON-lines file (HF protocol)."""
    return _mc_items(read_json_records(path, _MC_HINT), path)


def mc_from_hub(rows: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return _mc_items(rows, "Hub truthful_qa")


def dola_prompt(question: str) -> str:
    """Primer with instruction line + the question (voidism/DoLa tfqa_mc_eval.py)."""
    from contrastive_decoding.prompts import truthfulqa_prompt

    return truthfulqa_prompt(question)


def hf_prompt(question: str) -> str:
    """Six Q/A pairs without instruction line + the question (lm-eval truthfulqa_mc1.yaml)."""
    return TRUTHFULQA_QA_PAIRS + "Q: " + question + "\nA:"


def evaluate_dola(ctx: EvalContext, items: list[dict]) -> list[dict]:
    records = []
    for item in items:
        true = list(item["true"])
        if item["best"] in true:
            best_index = true.index(item["best"])
        else:  # never in the published file; score the best answer as one more true answer
            true.append(item["best"])
            best_index = len(true) - 1
        answers = true + list(item["false"])
        scores = ctx.score(dola_prompt(item["question"]), [" " + a for a in answers], TRUTHFULQA_PRIMER)
        totals = [s.total for s in scores]
        s_true, s_false = totals[: len(true)], totals[len(true) :]
        records.append(
            {
                "id": item["id"],
                "metrics": tfqa_mc_dola(s_true, s_false, best_index),
                "scores_true": s_true,
                "scores_false": s_false,
                "premature_layers": layer_histogram(scores),
            }
        )
    return records


def evaluate_hf(ctx: EvalContext, items: list[dict]) -> list[dict]:
    records = []
    for item in items:
        # mc1's choices are mostly among mc2's: score each distinct text once.
        unique = list(dict.fromkeys(item["mc1"] + item["mc2"]))
        scores = ctx.score(hf_prompt(item["question"]), [" " + c for c in unique], TRUTHFULQA_QA_PAIRS)
        by_text = {c: s.total for c, s in zip(unique, scores, strict=True)}
        mc1 = [by_text[c] for c in item["mc1"]]
        mc2 = [by_text[c] for c in item["mc2"]]
        records.append(
            {
                "id": item["id"],
                "metrics": tfqa_mc_hf(mc1, mc2, item["mc2_labels"]),
                "scores_mc1": mc1,
                "scores_mc2": mc2,
                "premature_layers": layer_histogram(scores),
            }
        )
    return records


TFQA_DOLA = Benchmark(
    name="tfqa-dola",
    description="TruthfulQA MC, DoLa authors' protocol (TruthfulQA.csv, MC1/MC2/MC3)",
    task="score",
    source=CSV_SOURCE,
    read_file=read_csv,
    from_hub=csv_from_hub,
    evaluate=evaluate_dola,
    metrics=(
        Metric("mc1", description="best answer scores above every false answer"),
        Metric("mc2", description="normalised probability mass of the true answers"),
        Metric("mc3", description="share of true answers scoring above the best false answer"),
    ),
    prompt=f"{TRUTHFULQA_PRIMER_SOURCE} + 'Q: {{question}}\\nA:'; continuations ' {{answer}}'",
    default_protocol="paper",
)

TFQA_HF = Benchmark(
    name="tfqa-hf",
    description="TruthfulQA MC, lm-eval protocol (Hub truthful_qa multiple_choice, mc1/mc2)",
    task="score",
    source=MC_SOURCE,
    read_file=read_mc,
    from_hub=mc_from_hub,
    evaluate=evaluate_hf,
    metrics=(
        Metric("mc1", description="the true mc1 choice has the highest log-likelihood"),
        Metric("mc2", description="normalised probability mass of the true mc2 choices"),
    ),
    prompt=f"{TRUTHFULQA_QA_PAIRS_SOURCE} + 'Q: {{question}}\\nA:'; continuations ' {{choice}}'",
    default_protocol="paper",
)
