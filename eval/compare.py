"""Paired comparison of finished runs on the same items: differences with bootstrap intervals."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from contrastive_decoding.eval.errors import EvalError
from contrastive_decoding.eval.labels import model_name, run_labels
from contrastive_decoding.eval.markdown import markdown_grid
from contrastive_decoding.eval.stats import DEFAULT_RESAMPLES, DEFAULT_SEED, paired_bootstrap
from contrastive_decoding.eval.summary import load_summary, run_records

__all__ = ["compare_runs", "comparison_table"]


def _run(folder: Path) -> tuple[dict[str, Any], dict[Any, dict[str, Any]]]:
    summary = load_summary(folder, folder_only=True)
    return summary, run_records(folder, summary)


def compare_runs(
    folders: Sequence[str | Path],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
) -> list[dict[str, Any]]:
    """Each run after the first against the first, metric by metric, on the items both hold.

    Args:
        folders: finished run folders; the first is the reference.
        resamples: bootstrap resamples.
        seed: bootstrap seed.

    Returns:
        One dict per (run, metric): ``reference``, ``run`` (their folders), ``reference_label``,
        ``run_label`` (:func:`~contrastive_decoding.eval.labels.run_labels` over all the runs: the
        strategy, its distinguishing parameters, the protocol and floor, and whatever else tells
        two runs apart), ``reference_model``, ``run_model`` (as the runs recorded them), ``metric``,
        ``n``, the two means and ``diff`` with ``ci_low``/``ci_high`` (run minus reference, in the
        metric's reporting scale), and ``significant`` (the interval excludes 0).

    Raises:
        EvalError: fewer than two runs, an unfinished run, different benchmarks, or no shared
            items.
    """
    if len(folders) < 2:
        raise EvalError("compare needs at least two run folders (the first is the reference).")
    runs = [(Path(f), *_run(Path(f))) for f in folders]
    ref_path, ref_summary, ref_records = runs[0]
    # Named together, so that two runs of one strategy (other protocol, floor, model...) differ.
    labels = run_labels([s for _, s, _ in runs], [p for p, _, _ in runs], shown=("benchmark", "model"))
    rows = []
    for (path, summary, records), label in zip(runs[1:], labels[1:], strict=True):
        if summary["benchmark"] != ref_summary["benchmark"]:
            raise EvalError(
                f"{path}: benchmark {summary['benchmark']} differs from the reference's "
                f"({ref_summary['benchmark']}); compare runs of one benchmark."
            )
        ref_sha = (ref_summary.get("data") or {}).get("sha256")
        sha = (summary.get("data") or {}).get("sha256")
        if ref_sha and sha and ref_sha != sha:
            raise EvalError(
                f"{path}: its data file differs from the reference's (sha256); items do not pair."
            )
        shared = sorted(set(ref_records) & set(records), key=str)
        if not shared:
            raise EvalError(f"{path}: no items in common with {ref_path}.")
        for metric, info in ref_summary["metrics"].items():
            if metric not in summary["metrics"]:
                continue
            scale = info.get("scale", 100.0)
            a = [ref_records[i]["metrics"][metric] for i in shared]
            b = [records[i]["metrics"][metric] for i in shared]
            diff = paired_bootstrap(a, b, resamples, seed).scaled(scale)
            rows.append(
                {
                    "reference": str(ref_path),
                    "reference_label": labels[0],
                    "reference_model": model_name(ref_summary),
                    "run": str(path),
                    "run_label": label,
                    "run_model": model_name(summary),
                    "benchmark": summary["benchmark"],
                    "metric": metric,
                    "n": len(shared),
                    "reference_mean": sum(a) / len(a) * scale,
                    "run_mean": sum(b) / len(b) * scale,
                    "diff": diff.mean,
                    "ci_low": diff.low,
                    "ci_high": diff.high,
                    "significant": not (diff.low <= 0.0 <= diff.high),
                }
            )
    return rows


def comparison_table(rows: Sequence[dict[str, Any]]) -> str:
    """The comparison as a Markdown table: the model column names the run's model, and the
    reference's too where it is another (``reference's vs run's``)."""
    head = ["benchmark", "model", "metric", "reference", "run", "n", "ref", "run", "diff [95% CI]"]
    cells = []
    for r in rows:
        mark = " *" if r["significant"] else ""
        ref_model, run_model = r.get("reference_model"), r.get("run_model")
        model = run_model if ref_model == run_model else f"{ref_model} vs {run_model}"
        cells.append(
            [
                r["benchmark"],
                str(model),
                r["metric"],
                r["reference_label"],
                r["run_label"],
                str(r["n"]),
                f"{r['reference_mean']:.2f}",
                f"{r['run_mean']:.2f}",
                f"{r['diff']:+.2f} [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]{mark}",
            ]
        )
    return markdown_grid(head, cells)
