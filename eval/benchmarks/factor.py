"""FACTOR (Muhlgay et al. 2023): news (1036) and expert (236); wiki is not available offline.

Context = ``full_prefix``; candidates " " + completion (true) and " " + contradiction_0..2. An
item is correct when the true completion scores at least as high as every contradiction
(DoLa's ``factor_eval.py``). DoLa scores FACTOR with the "normalized" convention (log-softmaxed
contrast, plausibility floor -1000), the default here. (DoLa's script reads
``turncated_prefixes`` instead for non-news files; this harness follows the spec: ``full_prefix``.)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from contrastive_decoding.eval.benchmarks.base import Benchmark, EvalContext, Metric, layer_histogram
from contrastive_decoding.eval.data import DataSource, numbered, read_csv_rows

__all__ = ["FACTOR_EXPERT", "FACTOR_NEWS"]

_COLUMNS = ("full_prefix", "completion", "contradiction_0", "contradiction_1", "contradiction_2")
_HINT = "a FACTOR csv (full_prefix, completion, contradiction_0..2)"
_URL = "https://github.com/AI21Labs/factor (data/{name}_factor.csv)"


def read_factor(path: Path) -> list[dict[str, Any]]:
    """Items of a FACTOR csv."""
    rows = read_csv_rows(path, _COLUMNS, _HINT)
    return numbered(_item(r) for r in rows)


def _item(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "prefix": row["full_prefix"],
        "completion": row["completion"],
        "contradictions": [row[f"contradiction_{i}"] for i in range(3)],
    }


def from_hub(rows: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return numbered(_item(r) for r in rows)


def evaluate(ctx: EvalContext, items: list[dict]) -> list[dict]:
    records = []
    for item in items:
        candidates = [" " + item["completion"]] + [" " + c for c in item["contradictions"]]
        scores = ctx.score(item["prefix"], candidates)
        true, false = scores[0].total, [s.total for s in scores[1:]]
        records.append(
            {
                "id": item["id"],
                "metrics": {"acc": float(all(true >= f for f in false))},
                "score_true": true,
                "scores_false": false,
                "premature_layers": layer_histogram(scores),
            }
        )
    return records


def _benchmark(name: str, size: int) -> Benchmark:
    return Benchmark(
        name=f"factor-{name}",
        description=f"FACTOR {name} ({size} items): true completion vs 3 contradictions",
        task="score",
        source=DataSource(local=f"factor/{name}_factor.csv", url=_URL.format(name=name)),
        read_file=read_factor,
        from_hub=from_hub,
        evaluate=evaluate,
        metrics=(Metric("acc", description="the true completion scores >= every contradiction"),),
        prompt="full_prefix; continuations ' ' + completion / contradiction_i",
        default_protocol="normalized",
    )


FACTOR_NEWS = _benchmark("news", 1036)
FACTOR_EXPERT = _benchmark("expert", 236)
