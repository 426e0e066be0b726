"""Plots of finished runs (matplotlib, Agg backend): a metric by run with its intervals, and the
premature layers each run used.

Figures are 8 inches wide, saved at 150 dpi (1200 pixels), so that shown at a documentation page's
width (about 800 pixels) their text stays at 10-12 points. Runs are named by
:func:`~contrastive_decoding.eval.labels.run_labels`; what all of them share (benchmark, model,
number of items) goes into the title instead of every label.
"""

from __future__ import annotations

import textwrap
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from contrastive_decoding.eval.errors import EvalError
from contrastive_decoding.eval.labels import FACTS, model_name, run_labels
from contrastive_decoding.eval.summary import load_summary

__all__ = ["plot_layers", "plot_metric"]

#: Figure width (inches) and resolution: 1200 pixels, text legible when scaled to ~800.
WIDTH_IN = 8.0
DPI = 150
#: Characters per line of a bar's label before it wraps.
LABEL_CHARS = 40

#: The facts a figure states once in its title when every run shares them, else in each label.
_COMMON = ("benchmark", "model", "n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _wrap(label: str, width: int = LABEL_CHARS) -> str:
    """``label`` on lines of at most ``width`` characters, broken at spaces where it can be."""
    return "\n".join(textwrap.wrap(label, width, break_on_hyphens=False, break_long_words=True)) or label


def _names(
    summaries: Sequence[Mapping[str, Any]], folders: Sequence[str | Path]
) -> tuple[list[str], list[str]]:
    """(one label per run, the title's facts). A benchmark or model every run shares goes to the
    title, else into each label; the number of items most runs have goes to the title ("n=817
    unless marked") and any other into its run's label."""
    shared = {f for f in ("benchmark", "model") if len({str(FACTS[f](s)) for s in summaries}) == 1}
    labels = run_labels(summaries, folders, shown=_COMMON)  # each in the title or in labels below
    counts = Counter(s.get("n_items") for s in summaries)
    usual = counts.most_common(1)[0][0]
    out = []
    for label, s in zip(labels, summaries, strict=True):
        facts = [f"{f}={FACTS[f](s)}" for f in ("benchmark", "model") if f not in shared]
        if s.get("n_items") != usual:
            facts.append(f"n={s.get('n_items')}")
        out.append("; ".join([label, *facts]))
    first = summaries[0]
    title = [str(first["benchmark"])] if "benchmark" in shared else []
    if "model" in shared:
        title.append(model_name(first))
    title.append(f"n={usual}" + (" unless marked" if len(counts) > 1 else ""))
    return out, title


def _title(fig: Any, what: str, facts: Sequence[str]) -> None:
    """The title at the figure's left edge (long labels push the axes right), the facts every run
    shares on a second line, then the layout."""
    text = what + ("\n" + _wrap(", ".join(facts), 95) if facts else "")
    fig.suptitle(text, x=0.01, ha="left", fontsize=11)
    fig.tight_layout()


def _save(fig: Any, out: str | Path) -> Path:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    _pyplot().close(fig)
    return path


def plot_metric(folders: Sequence[str | Path], metric: str | None, out: str | Path) -> Path:
    """Horizontal bars of ``metric`` (default: the first run's first metric), one per run in the
    order given (top to bottom), with 95% bootstrap intervals and the value written beside each; a
    dashed line marks the plain model where exactly one run is it.

    Args:
        folders: finished run folders.
        metric: the metric's name.
        out: the PNG file to write.

    Returns:
        The path written.

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
    labels, title = _names(summaries, folders)
    wrapped = [_wrap(label) for label in labels]
    lines = sum(label.count("\n") + 1 for label in wrapped)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(WIDTH_IN, max(2.5, 0.26 * lines + 0.14 * len(labels) + 1.2)))
    values = [s["metrics"][name] for s in summaries]
    means = [v["mean"] for v in values]
    errors = [[v["mean"] - v["ci_low"] for v in values], [v["ci_high"] - v["mean"] for v in values]]
    ys = range(len(summaries))
    ax.barh(ys, means, xerr=errors, capsize=4, color="#4c72b0", height=0.65)
    ax.set_yticks(ys, wrapped, fontsize=10)
    ax.invert_yaxis()  # the first run on top, as listed
    top = max(v["ci_high"] for v in values)
    for y, v in zip(ys, values, strict=True):
        ax.text(v["ci_high"] + 0.01 * top, y, f"{v['mean']:.1f}", va="center", fontsize=10)
    plain = [v["mean"] for v, s in zip(values, summaries, strict=True) if s.get("strategy") == "baseline"]
    if len(plain) == 1:
        ax.axvline(plain[0], color="0.3", linestyle="--", linewidth=1, label="plain model (baseline)")
        ax.legend(loc="lower right", fontsize=9, framealpha=0.9)
    ax.set_xlim(0, top * 1.12 if top > 0 else 1)
    scale = summaries[0]["metrics"][name].get("scale", 100.0)
    ax.set_xlabel(f"{name}" + (" (%)" if scale == 100 else "") + ", 95% bootstrap interval", fontsize=11)
    ax.tick_params(axis="x", labelsize=10)
    _title(fig, f"{name} by run", title)
    return _save(fig, out)


def plot_layers(folders: Sequence[str | Path], out: str | Path) -> Path:
    """Grouped bars: for each run with a layer contrast, the share of tokens per premature layer.

    Args:
        folders: finished run folders (those without premature layers are left out).
        out: the PNG file to write.

    Returns:
        The path written.

    Raises:
        EvalError: none of the runs recorded premature layers.
    """
    pairs = [(f, load_summary(Path(f))) for f in folders]
    usable = [(f, s) for f, s in pairs if s.get("premature_layers")]
    if not usable:
        raise EvalError("none of these runs recorded premature layers (baseline runs have none).")
    summaries = [s for _, s in usable]
    labels, title = _names(summaries, [f for f, _ in usable])
    layers = sorted({int(k) for s in summaries for k in s["premature_layers"]})
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(WIDTH_IN, 4.0 + 0.3 * len(summaries)))
    width = 0.8 / len(summaries)
    for j, (s, label) in enumerate(zip(summaries, labels, strict=True)):
        counts = {int(k): v for k, v in s["premature_layers"].items()}
        total = sum(counts.values())
        shares = [100.0 * counts.get(layer, 0) / total for layer in layers]
        xs = [i + (j - (len(summaries) - 1) / 2) * width for i in range(len(layers))]
        ax.bar(xs, shares, width=width, label=_wrap(label, 60))
    ax.set_xticks(range(len(layers)), [str(x) for x in layers], fontsize=10)
    ax.tick_params(axis="y", labelsize=10)
    ax.set_xlabel("premature layer", fontsize=11)
    ax.set_ylabel("share of tokens (%)", fontsize=11)
    ax.legend(fontsize=9, loc="best", framealpha=0.9)
    _title(fig, "premature-layer usage", title)
    return _save(fig, out)
