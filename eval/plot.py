"""Plots of finished runs (matplotlib, Agg backend): a metric by strategy with its intervals, and
the premature layers each strategy used."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from contrastive_decoding.eval.errors import EvalError
from contrastive_decoding.eval.summary import load_summary

__all__ = ["plot_layers", "plot_metric"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(summary: dict[str, Any]) -> str:
    # The scoring protocol tells apart runs of one strategy scored under both conventions.
    protocol = summary.get("scoring_protocol")
    name = summary["strategy_label"] + (f" ({protocol})" if protocol not in (None, "loglik") else "")
    return f"{name}\n{summary['benchmark']}"


def plot_metric(folders: Sequence[str | Path], metric: str | None, out: str | Path) -> Path:
    """Bar chart of ``metric`` (default: each run's first metric) per run, with 95% intervals.

    Raises:
        EvalError: no runs, an unfinished run, or a run without the metric.
    """
    if not folders:
        raise EvalError("plot needs at least one run folder.")
    summaries = [load_summary(Path(f)) for f in folders]
    name = metric or next(iter(summaries[0]["metrics"]))
    for f, s in zip(folders, summaries, strict=True):
        if name not in s["metrics"]:
            raise EvalError(f"{f}: no metric {name!r}; it has {', '.join(s['metrics'])}.")
    plt = _pyplot()
    means = [s["metrics"][name]["mean"] for s in summaries]
    lows = [s["metrics"][name]["mean"] - s["metrics"][name]["ci_low"] for s in summaries]
    highs = [s["metrics"][name]["ci_high"] - s["metrics"][name]["mean"] for s in summaries]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(summaries) + 1.5), 4.0))
    ax.bar(range(len(summaries)), means, yerr=[lows, highs], capsize=5, color="#4c72b0")
    ax.set_xticks(range(len(summaries)), [_label(s) for s in summaries], fontsize=8)
    scale = summaries[0]["metrics"][name].get("scale", 100.0)
    ax.set_ylabel(f"{name}" + (" (%)" if scale == 100 else ""))
    ax.set_title(f"{name} by strategy (95% bootstrap intervals, n={summaries[0]['n_items']})")
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_layers(folders: Sequence[str | Path], out: str | Path) -> Path:
    """Grouped bars: for each run with a layer contrast, the share of tokens per premature layer.

    Raises:
        EvalError: none of the runs recorded premature layers.
    """
    summaries = [load_summary(Path(f)) for f in folders]
    usable = [s for s in summaries if s.get("premature_layers")]
    if not usable:
        raise EvalError("none of these runs recorded premature layers (baseline runs have none).")
    layers = sorted({int(k) for s in usable for k in s["premature_layers"]})
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(layers) * len(usable) + 2), 4.0))
    width = 0.8 / len(usable)
    for j, s in enumerate(usable):
        counts = {int(k): v for k, v in s["premature_layers"].items()}
        total = sum(counts.values())
        shares = [100.0 * counts.get(layer, 0) / total for layer in layers]
        xs = [i + (j - (len(usable) - 1) / 2) * width for i in range(len(layers))]
        ax.bar(xs, shares, width=width, label=s["strategy_label"] + f" ({s['benchmark']})")
    ax.set_xticks(range(len(layers)), [str(x) for x in layers])
    ax.set_xlabel("premature layer")
    ax.set_ylabel("share of tokens (%)")
    ax.set_title("premature-layer usage")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
