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

from contrastive_decoding.eval.benchmarks import Benchmark
from contrastive_decoding.eval.errors import EvalError
from contrastive_decoding.eval.markdown import markdown_grid
from contrastive_decoding.eval.stats import DEFAULT_RESAMPLES, DEFAULT_SEED, bootstrap_mean

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
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, allow_nan=True) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename; on failure (a full
    disk) ``path`` is as it was and no temporary file is left."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise


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
    folders: Sequence[str | Path | None] | None = None,
) -> str:
    """A Markdown table, one row per summary, in the order given.

    Rows are named by :func:`~contrastive_decoding.eval.labels.run_labels` (strategy or preset and
    the parameters that differ from its defaults; the protocol, with its floor, in its own column),
    and the model by the name or path the run recorded.

    Args:
        summaries: loaded ``summary.json`` contents.
        metrics: the metric columns, in this order (default: the union of the summaries' metrics).
            A run without one of them shows ``-`` there.
        model_column: include the model's name (leave it out for a table of one model's runs).
        folders: the runs' folders (same order), appended to the labels of runs that nothing else
            tells apart.

    Raises:
        EvalError: a name in ``metrics`` that none of the summaries has.
    """
    from contrastive_decoding.eval.labels import model_name, protocol_name, run_labels

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
    shown = ("benchmark", *(["model"] if model_column else []), "protocol", "n")
    labels = run_labels(summaries, folders, protocol=False, shown=shown)
    rows = []
    for s, label in zip(summaries, labels, strict=True):
        cells = [
            s["benchmark"],
            *([model_name(s)] if model_column else []),
            label,
            protocol_name(s) or "-",
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


def run_records(folder: Path, summary: Mapping[str, Any]) -> dict[Any, dict[str, Any]]:
    """A finished run's records by item id, refused when any names another run than the summary's.

    Records written before records named their run (no ``run_id``) are taken as the run's own.

    Raises:
        EvalError: a records file holds another run's records.
    """
    from contrastive_decoding.eval.records import item_files, read_records, record_runs, run_id

    folder = Path(folder)
    identity = summary.get("identity")
    if isinstance(identity, Mapping):
        accepted = {run_id(identity)}
        try:  # the same settings as an earlier version may have recorded them
            with open(folder / "run.json", encoding="utf-8") as f:
                settings = json.load(f)
            if isinstance(settings, dict) and settings.get("identity") == json.loads(json.dumps(identity)):
                accepted.add(run_id(settings["identity"]))
        except (OSError, ValueError):
            pass
        for path, counts in record_runs(item_files(folder)).items():
            foreign = [k for k in counts if k is not None and k not in accepted]
            if foreign:
                raise EvalError(
                    f"{folder}: {path.name} holds records of another run (run_id {foreign[0]}; its "
                    f"summary's run is {run_id(identity)}); rerun that run's eval command into a fresh "
                    "--out folder."
                )
    return read_records(item_files(folder))


#: What ``table``, ``compare`` and ``plot`` read from every summary.
SUMMARY_KEYS = ("benchmark", "strategy_label", "n_items", "metrics")


def _summary_problem(summary: Any, needs: Sequence[str]) -> str | None:
    """What keeps ``summary`` from being a run's summary with the keys ``needs`` (``None``: nothing)."""
    if not isinstance(summary, dict):
        return f"holds a JSON {type(summary).__name__}, not a run's summary"
    missing = [k for k in ("benchmark", *needs) if k not in summary]
    if missing:
        return f"is not a complete run summary (no {missing[0]!r})"
    metrics = summary.get("metrics", {})
    if not isinstance(metrics, dict) or not all(
        isinstance(m, dict) and all(isinstance(m.get(k), (int, float)) for k in ("mean", "ci_low", "ci_high"))
        for m in metrics.values()
    ):
        return "is not a complete run summary (its metrics lack mean/ci_low/ci_high)"
    return None


def load_summary(
    folder: Path, folder_only: bool = False, needs: Sequence[str] = SUMMARY_KEYS
) -> dict[str, Any]:
    """The summary of a finished run folder (or of its ``summary.json`` given itself, unless
    ``folder_only``), holding at least the keys ``needs``.

    Raises:
        EvalError: no such folder, no summary there (the run is unfinished or the path is wrong), a
            file that is no run's summary, or a summary that is truncated or incomplete; naming the
            path and the fix.
    """
    folder = Path(folder)
    given_file = folder.is_file()
    if given_file and folder_only:
        raise EvalError(
            f"{folder}: is a file, not a run folder; give the folder that holds its {SUMMARY_JSON} and "
            "items files."
        )
    if not folder.exists():
        raise EvalError(f"{folder}: no such folder, so no {SUMMARY_JSON}; give a finished run's folder.")
    path = folder if given_file else folder / SUMMARY_JSON
    if not path.is_file():
        raise EvalError(f"{folder}: no {SUMMARY_JSON}; the run is unfinished or this is not a run folder.")
    not_a_run = (
        f"{folder}: is a file, not a run folder nor a run's {SUMMARY_JSON}; give a finished run's folder."
    )
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except (ValueError, UnicodeDecodeError) as exc:
        if given_file and path.name != SUMMARY_JSON:
            raise EvalError(not_a_run) from None
        raise EvalError(
            f"{path}: is not valid JSON ({str(exc).splitlines()[0][:120]}: truncated or corrupt); rerun "
            "the run's eval command to rewrite it (its records are kept)."
        ) from None
    except OSError as exc:
        raise EvalError(f"{path}: cannot read it ({exc.strerror or exc}).") from None
    problem = _summary_problem(summary, needs)
    if problem:
        if given_file and path.name != SUMMARY_JSON:
            raise EvalError(not_a_run)
        raise EvalError(
            f"{path}: {problem}; rerun the run's eval command to rewrite it (its records are kept)."
        )
    return summary
