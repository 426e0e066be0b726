"""Run summaries: metrics with bootstrap intervals, every parameter, versions; JSON and Markdown.

A summary is built only from a complete set of records (the runner checks), and written
atomically (temporary file + rename), so a folder never holds a half-written or partial summary.
"""

from __future__ import annotations

import json
import os
import platform
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from .benchmarks import Benchmark
from .errors import EvalError
from .markdown import markdown_grid
from .stats import DEFAULT_RESAMPLES, DEFAULT_SEED, bootstrap_mean

__all__ = ["build_summary", "library_versions", "markdown_table", "write_json_atomic"]

SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries that shape results."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in (
        "contrastive-decoding",
        "transformers",
        "torch",
        "accelerate",
        "sacrebleu",
        "rouge-score",
        "numpy",
    ):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file and an atomic rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False, allow_nan=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def metric_names(benchmark: Benchmark, records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The benchmark's metrics, plus optional ones every record carries (e.g. a judge's)."""
    names = [m.name for m in benchmark.metrics]
    for m in benchmark.optional_metrics:
        if records and all(m.name in r["metrics"] for r in records):
            names.append(m.name)
    return names


def build_summary(
    benchmark: Benchmark,
    records: Sequence[Mapping[str, Any]],
    settings: Mapping[str, Any],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """The summary of a complete run.

    Args:
        benchmark: the benchmark run.
        records: one record per item (any order; sorted by id here).
        settings: the run's parameters (model, strategy, protocol, generation, data, ...).
        resamples: bootstrap resamples.
        seed: bootstrap seed.

    Returns:
        A JSON-serialisable dict; ``metrics[name]`` holds ``mean``, ``ci_low``, ``ci_high`` (in
        the metric's reporting scale: percent for fractions), ``n`` and ``scale``.
    """
    ordered = sorted(records, key=lambda r: r["id"])
    scales = {m.name: m.scale for m in benchmark.all_metrics()}
    metrics = {}
    for name in metric_names(benchmark, ordered):
        interval = bootstrap_mean([r["metrics"][name] for r in ordered], resamples, seed).scaled(scales[name])
        metrics[name] = {**interval.as_dict(), "scale": scales[name]}
    layers: Counter[int] = Counter()
    for r in ordered:
        for layer, count in (r.get("premature_layers") or {}).items():
            layers[int(layer)] += int(count)
    seconds = sum(float(r.get("seconds", 0.0)) for r in ordered)
    below = [r for r in ordered if r.get("below_floor")]
    return {
        "complete": True,
        "benchmark": benchmark.name,
        "benchmark_description": benchmark.description,
        "task": benchmark.task,
        "prompt": benchmark.prompt,
        **settings,
        "n_items": len(ordered),
        "metrics": metrics,
        "bootstrap": {"resamples": resamples, "seed": seed, "confidence": 0.95, "method": "percentile"},
        "premature_layers": {str(k): v for k, v in sorted(layers.items())} or None,
        # Plausible answer tokens that scored below the fixed floor of implausible ones
        # (protocol normalized): the scale problem that --floor relative avoids.
        "below_floor": {"tokens": sum(int(r["below_floor"]) for r in below), "items": len(below)}
        if below
        else None,
        "wall_time_s": seconds,
        "seconds_per_item": seconds / len(ordered) if ordered else None,
        "versions": library_versions(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _cell(m: Mapping[str, Any]) -> str:
    digits = 1 if m.get("scale", 100) == 100 else 2
    return f"{m['mean']:.{digits}f} [{m['ci_low']:.{digits}f}, {m['ci_high']:.{digits}f}]"


def markdown_table(
    summaries: Sequence[Mapping[str, Any]],
    metrics: Sequence[str] | None = None,
    model_column: bool = True,
) -> str:
    """A Markdown table, one row per summary, in the order given.

    Args:
        summaries: loaded ``summary.json`` contents.
        metrics: the metric columns, in this order (default: the union of the summaries' metrics).
            A run without one of them shows ``-`` there.
        model_column: include the model's name (leave it out for a table of one model's runs).

    Raises:
        EvalError: a name in ``metrics`` that none of the summaries has.
    """
    available: list[str] = []
    for s in summaries:
        available += [n for n in s["metrics"] if n not in available]
    names = list(metrics) if metrics is not None else available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise EvalError(
            f"--metrics: no run here has {', '.join(unknown)}; choose from {', '.join(available)}."
        )
    head = ["benchmark", *(["model"] if model_column else []), "strategy", "protocol", "n", *names, "s/item"]
    rows = []
    for s in summaries:
        cells = [
            s["benchmark"],
            *([Path(str(s["model"])).name or str(s["model"])] if model_column else []),
            s["strategy_label"],
            str(s.get("scoring_protocol") or "-"),
            str(s["n_items"]),
            *[_cell(s["metrics"][n]) if n in s["metrics"] else "-" for n in names],
            f"{s['seconds_per_item']:.2f}" if s.get("seconds_per_item") is not None else "-",
        ]
        rows.append(cells)
    return markdown_grid(head, rows)


def write_summary(out: Path, summary: Mapping[str, Any]) -> None:
    """``summary.json`` and ``summary.md`` (header + one row) in ``out``."""
    write_json_atomic(out / SUMMARY_JSON, summary)
    write_text_atomic(out / SUMMARY_MD, markdown_table([summary]))


def load_summary(folder: Path) -> dict[str, Any]:
    """The summary of a finished run folder.

    Raises:
        EvalError: no summary there (the run is unfinished or the path is wrong).
    """
    path = folder / SUMMARY_JSON if folder.is_dir() else folder
    if not path.is_file():
        raise EvalError(f"{folder}: no {SUMMARY_JSON}; the run is unfinished or this is not a run folder.")
    with open(path, encoding="utf-8") as f:
        return json.load(f)
