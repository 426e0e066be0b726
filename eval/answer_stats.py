"""How a generation run's answers ended: their mean length, how many ran to the token limit and
how many held nothing the benchmark's answer rule could read.

Accuracy alone cannot tell a strategy that answers wrongly from one that stops answering (text
that rambles to the limit, or that never states "the answer is ..."); these counts can, and they
come from the run's own records, so they need no model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from contrastive_decoding.eval.errors import EvalError
from contrastive_decoding.eval.labels import model_name, run_label, run_labels
from contrastive_decoding.eval.markdown import markdown_grid
from contrastive_decoding.eval.summary import load_summary, run_records

__all__ = ["answer_stats", "answer_stats_table"]


def answer_stats(folder: str | Path) -> dict[str, Any]:
    """Answer counts of one finished generation run.

    Args:
        folder: the run's output folder (its ``summary.json`` and ``items*.jsonl``).

    Returns:
        ``benchmark``, ``model`` (as the run recorded it), ``label`` (the run's
        :func:`~contrastive_decoding.eval.labels.run_label`), ``strategy_label`` (as recorded),
        ``repetition_penalty``, ``n``, ``max_new_tokens``,
        ``mean_tokens``, ``at_limit`` (answers whose generated tokens reached ``max_new_tokens``)
        and ``no_answer`` (answers from which the benchmark extracted nothing; ``None`` for a
        benchmark without answer extraction, such as TruthfulQA generation).

    Raises:
        EvalError: the folder holds no finished run, a scoring run, or records without token counts.

    Example:
        >>> from contrastive_decoding.eval.answer_stats import answer_stats
        >>> answer_stats("results/strategyqa/smollm2/dola-low")["at_limit"]
        155
    """
    return _stats(Path(folder))[1]


def _stats(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the run's summary, its :func:`answer_stats`)."""
    summary = load_summary(folder, folder_only=True, needs=("strategy_label", "n_items"))
    generation = summary.get("generation")
    if summary.get("task") != "generate" or not generation:
        raise EvalError(
            f"{folder}: {summary['benchmark']} is scored, not generated, so its runs hold no answers; "
            "give generation runs (tfqa-gen, strategyqa, gsm8k)."
        )
    records = list(run_records(folder, summary).values())
    if len(records) != summary["n_items"] or any("n_tokens" not in r for r in records):
        raise EvalError(
            f"{folder}: its items files do not hold the {summary['n_items']} records with token counts "
            "that its summary counts; rerun its eval command into a fresh folder."
        )
    limit = int(generation["max_new_tokens"])
    extracts = all("pred" in r for r in records)
    return summary, {
        "benchmark": summary["benchmark"],
        "model": model_name(summary),
        "label": run_label(summary, protocol=False),
        "strategy_label": summary["strategy_label"],
        "repetition_penalty": generation.get("repetition_penalty"),
        "n": len(records),
        "max_new_tokens": limit,
        "mean_tokens": sum(r["n_tokens"] for r in records) / len(records),
        "at_limit": sum(r["n_tokens"] >= limit for r in records),
        "no_answer": sum(r["pred"] is None for r in records) if extracts else None,
    }


def answer_stats_table(folders: Sequence[str | Path]) -> str:
    """A Markdown table of :func:`answer_stats`, one row per run, in the order given, each named by
    :func:`~contrastive_decoding.eval.labels.run_labels` (runs of one label told apart)."""
    head = [
        "benchmark",
        "strategy",
        "repetition penalty",
        "n",
        "mean tokens",
        "at the token limit",
        "no answer read",
    ]
    found = [_stats(Path(folder)) for folder in folders]
    shown = ("benchmark", "repetition_penalty", "n", "max_new_tokens")
    labels = run_labels([summary for summary, _ in found], folders, protocol=False, shown=shown)
    rows = []
    for (_, s), label in zip(found, labels, strict=True):
        no_answer = "-" if s["no_answer"] is None else str(s["no_answer"])
        cells = [
            s["benchmark"],
            label,
            "-" if s["repetition_penalty"] is None else f"{s['repetition_penalty']:g}",
            str(s["n"]),
            f"{s['mean_tokens']:.1f}",
            f"{s['at_limit']} (limit {s['max_new_tokens']})",
            no_answer,
        ]
        rows.append(cells)
    return markdown_grid(head, rows)
