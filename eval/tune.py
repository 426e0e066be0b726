"""Honest hyper-parameter choice: k-fold cross-validated selection over a grid of settings
(``contrastive-decoding tune``).

DoLa's authors pick their layer bucket by two-fold validation on TruthfulQA; tuning on the test
items instead reports the best of several noisy numbers. This module runs every cell of a grid as
an ordinary, resumable harness run (:func:`~contrastive_decoding.eval.runner.run_eval`; each cell
is a normal run folder under ``DIR/cells/``, the baseline under ``DIR/baseline``), splits the items
into ``k`` disjoint folds with a seeded permutation, and for each fold picks the cell with the best
mean metric on the other folds (the first cell in grid order wins ties) and takes that cell's
per-item values on the held-out fold. The held-out values of all folds, one per item, give the
cross-validated metric, with its percentile-bootstrap interval
(:func:`~contrastive_decoding.eval.stats.bootstrap_mean`) and its paired difference to the baseline
on the same items (:func:`~contrastive_decoding.eval.stats.paired_bootstrap`). The interval
resamples items with the choices held fixed, so it does not include the variability of the choice
itself.

Grid syntax (``--grid``): ``name=v1,v2,...;name2=...``. Values are read as JSON where they parse
(``0.1``, ``true``, ``[0,2,4]``), else as text (``low``); commas inside brackets belong to the
value. ``protocol`` is a grid name too (``protocol=paper,normalized``) for multiple-choice
benchmarks. Example::

    contrastive-decoding tune --benchmark tfqa-hf --strategy dola --limit 200 --folds 2 --seed 0 \\
        --grid "dola_layers=low,high,15" --protocol paper --out results/tune/tfqa-hf/smollm2/dola

Finished runs can seed cells (``--reuse RUN``): a run folder whose settings match a cell's gives
the cell its records for the cell's items (``run_eval`` then checks every setting, as on any
resume), so the committed 817-question runs serve a 200-question tuning without rescoring.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from contrastive_decoding.eval.errors import EvalError
from contrastive_decoding.eval.markdown import markdown_grid
from contrastive_decoding.eval.records import RecordWriter, item_files, read_records
from contrastive_decoding.eval.stats import DEFAULT_RESAMPLES, bootstrap_mean, paired_bootstrap

__all__ = [
    "Cell",
    "TuneConfig",
    "cross_validate",
    "make_folds",
    "parse_grid",
    "run_tune",
    "tune_markdown",
]

PROTOCOL_KEY = "protocol"


@dataclass(frozen=True)
class Cell:
    """One setting of the grid: strategy parameters and (multiple choice) a scoring protocol."""

    params: tuple[tuple[str, Any], ...]
    protocol: str | None = None

    @property
    def label(self) -> str:
        """``name=value`` pairs, e.g. ``dola_layers=high, protocol=paper``."""
        parts = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in self.params]
        if self.protocol is not None:
            parts.append(f"{PROTOCOL_KEY}={self.protocol}")
        return ", ".join(parts)

    @property
    def slug(self) -> str:
        """The cell's folder name under ``DIR/cells`` (the protocol always last, so that tunings of
        one grid under ``--protocol paper`` and ``--protocol normalized`` share their cells)."""
        parts = [f"{k}={_slug_value(v)}" for k, v in self.params]
        if self.protocol is not None:
            parts.append(f"{PROTOCOL_KEY}={self.protocol}")
        return "__".join(parts) or "default"

    def param_dict(self) -> dict[str, Any]:
        return dict(self.params)


def _slug_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    text = text.replace("[", "").replace("]", "").replace(",", "-")
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def _split_values(text: str) -> list[str]:
    """Split on commas outside brackets and quotes."""
    values, depth, quoted, current = [], 0, False, []
    for ch in text:
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in "[{":
            depth += 1
        elif not quoted and ch in "]}":
            depth -= 1
        if ch == "," and depth == 0 and not quoted:
            values.append("".join(current))
            current = []
        else:
            current.append(ch)
    values.append("".join(current))
    return [v.strip() for v in values]


def _parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


_GRID_EXAMPLE = 'e.g. --grid "dola_layers=low,high,[0,2,4];relative_top=0.1,0.05"'


def parse_grid(text: str) -> list[tuple[str, list[Any]]]:
    """``"a=1,2;b=x,[0,2]"`` into ``[("a", [1, 2]), ("b", ["x", [0, 2]])]``.

    Args:
        text: the ``--grid`` string.

    Raises:
        EvalError: an empty grid, a part without ``=``, an empty name or value, unbalanced
            brackets, or a name given twice; the message names ``--grid`` and shows the syntax.

    Example:
        >>> parse_grid("dola_layers=low,high,[0,2,4];relative_top=0.1,0.05")
        [('dola_layers', ['low', 'high', [0, 2, 4]]), ('relative_top', [0.1, 0.05])]
    """
    if not isinstance(text, str) or not text.strip():
        raise EvalError(f"--grid is empty; give NAME=V1,V2;NAME2=..., {_GRID_EXAMPLE}.")
    grid: list[tuple[str, list[Any]]] = []
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        name, sep, raw = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise EvalError(f"--grid {part!r}: write each part as NAME=V1,V2,..., {_GRID_EXAMPLE}.")
        if raw.count("[") != raw.count("]") or raw.count("{") != raw.count("}"):
            raise EvalError(f"--grid {part!r}: unbalanced brackets; write lists as [0,2,4], {_GRID_EXAMPLE}.")
        raws = _split_values(raw)
        if any(not r for r in raws):
            raise EvalError(
                f"--grid {part!r}: an empty value; separate values by single commas, {_GRID_EXAMPLE}."
            )
        if any(name == g for g, _ in grid):
            raise EvalError(f"--grid: {name!r} is given twice; list all its values in one part.")
        values = [_parse_value(r) for r in raws]
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise EvalError(f"--grid {part!r}: a value is listed twice.")
        grid.append((name, values))
    if not grid:
        raise EvalError(f"--grid is empty; give NAME=V1,V2;NAME2=..., {_GRID_EXAMPLE}.")
    return grid


def grid_cells(grid: Sequence[tuple[str, Sequence[Any]]], protocol: str | None) -> list[Cell]:
    """Every combination, in grid order (the last name varies fastest)."""
    names = [n for n, _ in grid]
    cells = []
    for combo in itertools.product(*(values for _, values in grid)):
        settings = dict(zip(names, combo, strict=True))
        cell_protocol = settings.pop(PROTOCOL_KEY, protocol)
        cells.append(Cell(tuple(settings.items()), cell_protocol))
    return cells


def make_folds(ids: Sequence[Any], folds: int, seed: int) -> list[list[Any]]:
    """``folds`` disjoint folds covering ``ids``, from a seeded permutation (sizes differ by at
    most one; each fold lists its ids in the order given).

    Raises:
        EvalError: fewer than 2 folds, or more folds than items.

    Example:
        >>> [len(f) for f in make_folds(list(range(7)), 2, seed=0)]
        [4, 3]
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise EvalError(f"--folds {folds}: must be an integer >= 2 (each fold is held out once).")
    if folds > len(ids):
        raise EvalError(f"--folds {folds}: more folds than the {len(ids)} items; use --folds <= {len(ids)}.")
    order = np.random.default_rng(seed).permutation(len(ids))
    assignment = np.empty(len(ids), dtype=np.int64)
    assignment[order] = np.arange(len(ids)) % folds
    return [[ids[i] for i in range(len(ids)) if assignment[i] == f] for f in range(folds)]


def cross_validate(
    values: Mapping[str, Mapping[Any, float]], folds: Sequence[Sequence[Any]]
) -> dict[str, Any]:
    """k-fold selection: per fold, the cell with the best mean on the other folds.

    Args:
        values: per cell (in grid order), per item id, the metric (e.g. 0/1 for mc1).
        folds: disjoint lists of item ids covering every item.

    Returns:
        ``{"folds": [{"fold", "n", "chosen", "train_mean", "heldout_mean", "train_means"}],
        "per_item": {id: held-out value}, "chosen": {id: cell}}``; means are fractions (not
        percent). Ties go to the first cell in ``values``' order.

    Example:
        >>> cv = cross_validate({"a": {0: 1, 1: 0}, "b": {0: 0, 1: 1}}, [[0], [1]])
        >>> [f["chosen"] for f in cv["folds"]], cv["per_item"]
        (['b', 'a'], {0: 0, 1: 0})
    """
    cells = list(values)
    if not cells:
        raise EvalError("tune: the grid has no cells.")
    everything = [i for fold in folds for i in fold]
    if len(set(map(_key, everything))) != len(everything):
        raise ValueError("folds overlap")
    out_folds, per_item, chosen_of = [], {}, {}
    for f, held in enumerate(folds):
        held_set = set(map(_key, held))
        train = [i for i in everything if _key(i) not in held_set]
        train_means = {c: float(np.mean([values[c][i] for i in train])) for c in cells}
        best = max(cells, key=lambda c: (train_means[c], -cells.index(c)))
        for i in held:
            per_item[i] = values[best][i]
            chosen_of[i] = best
        out_folds.append(
            {
                "fold": f,
                "n": len(held),
                "chosen": best,
                "train_mean": train_means[best],
                "heldout_mean": float(np.mean([values[best][i] for i in held])),
                "train_means": train_means,
            }
        )
    return {"folds": out_folds, "per_item": per_item, "chosen": chosen_of}


def _key(item_id: Any) -> str:
    return json.dumps(item_id)


@dataclass
class TuneConfig:
    """Everything ``contrastive-decoding tune`` takes.

    Attributes:
        benchmark: benchmark name.
        strategy: strategy or preset the grid's parameters belong to.
        grid: the ``--grid`` string (see :func:`parse_grid`).
        out: the tuning folder (cells under ``out/cells``, the baseline under ``out/baseline``).
        folds: number of folds (>= 2).
        seed: seed of the fold permutation and of the bootstrap.
        metric: the metric to select on (default: the benchmark's first).
        baseline: the strategy of the paired reference run.
        reuse: finished run folders that may seed cells (or the baseline) with their records.
        report: the stem of the report files (``out/<report>.json|.md|.png``).
        model, dtype, device, device_map, protocol, limit, data, data_dir, bootstrap, progress:
            as for ``contrastive-decoding eval``.
    """

    benchmark: str
    strategy: str
    grid: str
    out: str
    folds: int = 2
    seed: int = 0
    metric: str | None = None
    baseline: str = "baseline"
    reuse: list[str] = field(default_factory=list)
    report: str = "tune"
    model: str = "smollm2"
    dtype: str = "float32"
    device: str = "auto"
    device_map: str | None = None
    protocol: str | None = None
    limit: int | None = None
    data: str | None = None
    data_dir: str | None = None
    bootstrap: int = DEFAULT_RESAMPLES
    progress: bool = True


def _as_baseline(exc: EvalError) -> EvalError:
    """An error about the baseline strategy, naming ``--baseline`` (it is no ``--strategy`` here)."""
    message = str(exc)
    if message.startswith("--strategy"):
        message = "--baseline" + message[len("--strategy") :]
    return EvalError(message.replace("--param", "--baseline's parameter"))


def _check_settings(cfg: TuneConfig) -> None:
    """The settings that need neither data nor model, each naming its option."""
    from contrastive_decoding.eval.runner import (
        RunConfig,
        _check_int,
        _check_torch_settings,
        check_out_folder,
    )

    if isinstance(cfg.folds, bool) or not isinstance(cfg.folds, int) or cfg.folds < 2:
        raise EvalError(f"--folds {cfg.folds}: must be an integer >= 2 (each fold is held out once).")
    limit = cfg.limit
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise EvalError(f"--limit must be a positive integer, got {cfg.limit}.")
    _check_int("bootstrap", cfg.bootstrap, 100, "resamples")
    _check_int("seed", cfg.seed, 0, "")
    _check_torch_settings(
        RunConfig(benchmark="", out="", dtype=cfg.dtype, device=cfg.device, device_map=cfg.device_map)
    )
    check_out_folder(Path(cfg.out), probe=True)


def _check(cfg: TuneConfig, benchmark) -> tuple[list[Cell], str]:
    from contrastive_decoding.eval.runner import SCORING_PROTOCOLS
    from contrastive_decoding.eval.strategies import STRATEGIES, check_strategy, resolve_name

    if not re.fullmatch(r"[A-Za-z0-9._-]+", cfg.report or ""):
        raise EvalError(f"--report {cfg.report!r}: use letters, digits, '.', '_' or '-' (a file name stem).")
    grid = parse_grid(cfg.grid)
    base, _ = resolve_name(cfg.strategy, {})
    try:
        check_strategy(cfg.baseline, {})
    except EvalError as exc:
        raise _as_baseline(exc) from None
    valid = list(STRATEGIES[base].defaults)
    for name, values in grid:
        if name == PROTOCOL_KEY:
            if benchmark.task != "score":
                raise EvalError(
                    f"--grid protocol: {benchmark.name} generates text; protocols are for "
                    "multiple-choice benchmarks."
                )
            bad = [v for v in values if v not in SCORING_PROTOCOLS]
            if bad:
                raise EvalError(
                    f"--grid protocol={bad[0]!r}: unknown; valid: {', '.join(SCORING_PROTOCOLS)}."
                )
            if cfg.protocol is not None:
                raise EvalError("--protocol and a protocol in --grid both given; give one of them.")
        elif name not in valid:
            raise EvalError(
                f"--grid {name}: not a parameter of strategy {base!r}; valid: {', '.join(valid) or 'none'}"
                f" (or {PROTOCOL_KEY})."
            )
    protocol = cfg.protocol
    if benchmark.task == "score" and protocol is None:
        protocol = benchmark.default_protocol
    if benchmark.task != "score" and protocol is not None:
        raise EvalError(f"--protocol applies to multiple-choice benchmarks; {benchmark.name} generates text.")
    cells = grid_cells(grid, protocol)
    for cell in cells:
        try:
            check_strategy(cfg.strategy, cell.param_dict())
        except EvalError as exc:
            raise EvalError(f"--grid cell {cell.label}: {exc}") from None
    slugs = [c.slug for c in cells]
    if len(set(slugs)) != len(slugs):
        raise EvalError("--grid: two cells map to one folder name; write the values differently.")
    names = [m.name for m in benchmark.metrics]
    metric = cfg.metric or names[0]
    if metric not in names:
        raise EvalError(f"--metric {metric}: {benchmark.name} has {', '.join(names)}.")
    return cells, metric


def _check_on_model(cfg: TuneConfig, cells: Sequence[Cell], model: Any, tokenizer: Any) -> None:
    """Resolve the baseline and every cell against the loaded model (layer indices, streams,
    amateurs), as each cell's run would, so that a bad cell stops the tuning before anything runs.

    Raises:
        EvalError: naming ``--baseline``, or ``--grid cell <label>`` and the parameter.
    """
    from contrastive_decoding.eval.strategies import build_strategy, check_on_model, check_strategy

    def check(name: str, params: dict[str, Any]) -> None:
        base, full = check_strategy(name, params)
        run = build_strategy(model, base, full, tokenizer=tokenizer)
        check_on_model(run, model, tokenizer, given=full)

    try:
        check(cfg.baseline, {})
    except EvalError as exc:
        raise _as_baseline(exc) from None
    for cell in cells:
        try:
            check(cfg.strategy, cell.param_dict())
        except EvalError as exc:
            raise EvalError(f"--grid cell {cell.label}: {exc}") from None


def _reusable(
    run: Path, benchmark: str, strategy: str, params: Mapping[str, Any], protocol: str | None, sha: str | None
) -> bool:
    """Whether a finished run's settings match a cell on what can be known without the model (the
    full check is run_eval's own, on resuming)."""
    from contrastive_decoding.eval.strategies import STRATEGIES, resolve_name

    try:
        identity = json.loads((run / "run.json").read_text(encoding="utf-8"))["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    base, full = resolve_name(strategy, dict(params))
    expected = json.loads(json.dumps({**STRATEGIES[base].defaults, **full}))
    return (
        identity.get("benchmark") == benchmark
        and identity.get("strategy") == base
        and identity.get("strategy_params") == expected
        and identity.get("scoring_protocol") == protocol
        and identity.get("data_sha256") == sha
    )


def _seed_from(run: Path, folder: Path, ids: Sequence[Any]) -> int:
    """Copy ``run``'s settings file and its records of ``ids`` into an empty ``folder``."""
    records = read_records(item_files(run))
    folder.mkdir(parents=True, exist_ok=True)
    settings = json.loads((run / "run.json").read_text(encoding="utf-8"))
    settings["reused_from"] = str(run)
    (folder / "run.json").write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    n = 0
    with RecordWriter(folder / "items.jsonl") as writer:
        for i in ids:
            if i in records:
                writer.write(records[i])
                n += 1
    return n


def run_tune(cfg: TuneConfig, model: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """Run (or resume) every grid cell and the baseline, then cross-validate the choice.

    Args:
        cfg: the tuning settings.
        model: an already loaded model (tests, notebooks); ``cfg.model`` then only labels it.
        tokenizer: its tokenizer (required with ``model``).

    Returns:
        The report (also written as ``<out>/<report>.json``, ``.md`` and ``.png``): the cells
        with their metric on all items, the folds, the chosen cell per fold, the cross-validated
        metric with its interval, and its paired difference to the baseline.

    Raises:
        EvalError: bad grid or settings (naming the option and the fix), or any error of a run.

    Example::

        report = run_tune(TuneConfig(benchmark="tfqa-hf", strategy="dola", limit=200,
                                     grid="dola_layers=low,high,15", out="runs/tune-dola"))
        report["cv"]["mean"], [f["chosen"] for f in report["folds"]]
    """
    from contrastive_decoding.eval.benchmarks import get_benchmark
    from contrastive_decoding.eval.data import resolve_data
    from contrastive_decoding.eval.runner import RunConfig, _load_model, load_items, run_eval

    benchmark = get_benchmark(cfg.benchmark)
    cells, metric = _check(cfg, benchmark)
    _check_settings(cfg)
    reuse = [Path(r) for r in cfg.reuse]
    for r in reuse:
        if not (r / "run.json").is_file():
            raise EvalError(f"--reuse {r}: not a run folder (no run.json); give a finished run's folder.")
    if reuse and benchmark.task != "score":
        raise EvalError("--reuse seeds multiple-choice cells only; generation settings are not compared.")
    resolved = resolve_data(benchmark.source, benchmark.name, cfg.data, cfg.data_dir)
    items = load_items(benchmark, resolved)
    if cfg.limit is not None:
        items = items[: cfg.limit]
    ids = [it["id"] for it in items]
    folds = make_folds(ids, cfg.folds, cfg.seed)

    out = Path(cfg.out)
    if model is None:
        shell = RunConfig(
            benchmark=cfg.benchmark,
            out=str(out),
            model=cfg.model,
            dtype=cfg.dtype,
            device=cfg.device,
            device_map=cfg.device_map,
        )
        model, tokenizer = _load_model(shell, None)
    elif tokenizer is None:
        raise ValueError("`tokenizer` is required when `model` is given")
    _check_on_model(cfg, cells, model, tokenizer)  # layers vs the model's depth, before any run

    runs: list[tuple[str, Cell | None, Path, str, dict, str | None]] = [
        ("baseline", None, out / "baseline", cfg.baseline, {}, None)
    ]
    runs += [(c.label, c, out / "cells" / c.slug, cfg.strategy, c.param_dict(), c.protocol) for c in cells]
    results: dict[str, dict[str, Any]] = {}
    for label, _cell, folder, strategy, params, protocol in runs:
        reused_from = None
        if reuse and not read_records(item_files(folder)):
            scored = base_is_scored(strategy)
            scoring_label = (protocol or benchmark.default_protocol) if scored else "loglik"
            for r in reuse:
                if _reusable(r, benchmark.name, strategy, params, scoring_label, resolved.sha256):
                    _seed_from(r, folder, ids)
                    reused_from = str(r)
                    break
        run_cfg = RunConfig(
            benchmark=cfg.benchmark,
            out=str(folder),
            model=cfg.model,
            dtype=cfg.dtype,
            device=cfg.device,
            device_map=cfg.device_map,
            strategy=strategy,
            params=dict(params),
            protocol=protocol if base_is_scored(strategy) else None,
            limit=cfg.limit,
            data=cfg.data,
            data_dir=cfg.data_dir,
            bootstrap=cfg.bootstrap,
            seed=cfg.seed,
            progress=cfg.progress,
        )
        try:
            result = run_eval(run_cfg, model=model, tokenizer=tokenizer)
        except EvalError as exc:
            if reused_from is not None and "other settings" in str(exc):
                shutil.rmtree(folder, ignore_errors=True)
                raise EvalError(
                    f"--reuse {reused_from}: its settings differ from cell {label} ({exc})."
                ) from None
            raise
        if result.summary is None:  # cannot happen unsharded; kept so a NaN never becomes a metric
            raise EvalError(f"{folder}: the run did not finish; rerun the same tune command to resume it.")
        records = read_records(item_files(folder))
        results[label] = {
            "folder": str(folder),
            "reused_from": reused_from,
            "summary": result.summary,
            "values": {i: float(records[i]["metrics"][metric]) for i in ids},
        }

    report = _report(cfg, benchmark, metric, cells, folds, ids, results)
    try:
        _write_report(out, cfg.report, report)
    except OSError as exc:
        from contrastive_decoding.eval.records import write_error

        raise write_error(out / f"{cfg.report}.json", exc, "every cell's run is kept") from None
    return report


def base_is_scored(strategy: str) -> bool:
    """Whether ``--protocol`` may be passed for this strategy (the plain model takes none)."""
    from contrastive_decoding.eval.strategies import resolve_name

    return resolve_name(strategy, {})[0] != "baseline"


def _report(cfg, benchmark, metric, cells, folds, ids, results) -> dict[str, Any]:
    scale = next(m.scale for m in benchmark.metrics if m.name == metric)
    labels = [c.label for c in cells]
    values = {label: results[label]["values"] for label in labels}
    cv = cross_validate(values, folds)
    cv_values = [cv["per_item"][i] for i in ids]
    base_values = [results["baseline"]["values"][i] for i in ids]
    interval = bootstrap_mean(cv_values, cfg.bootstrap, cfg.seed).scaled(scale)
    diff = paired_bootstrap(base_values, cv_values, cfg.bootstrap, cfg.seed).scaled(scale)
    base = bootstrap_mean(base_values, cfg.bootstrap, cfg.seed).scaled(scale)
    cell_rows = []
    for cell in cells:
        vals = [values[cell.label][i] for i in ids]
        ci = bootstrap_mean(vals, cfg.bootstrap, cfg.seed).scaled(scale)
        d = paired_bootstrap(base_values, vals, cfg.bootstrap, cfg.seed).scaled(scale)
        cell_rows.append(
            {
                "cell": cell.label,
                "params": cell.param_dict(),
                "protocol": cell.protocol,
                "folder": results[cell.label]["folder"],
                "reused_from": results[cell.label]["reused_from"],
                "metric": ci.as_dict(),
                "diff_vs_baseline": d.as_dict(),
                "chosen_in_folds": [f["fold"] for f in cv["folds"] if f["chosen"] == cell.label],
            }
        )
    best_all = max(cell_rows, key=lambda r: (r["metric"]["mean"], -cell_rows.index(r)))
    return {
        "benchmark": benchmark.name,
        "model": cfg.model,
        "strategy": cfg.strategy,
        "grid": cfg.grid,
        "protocol": cfg.protocol,
        "metric": metric,
        "scale": scale,
        "n_items": len(ids),
        "limit": cfg.limit,
        "folds_k": len(folds),
        "seed": cfg.seed,
        "fold_ids": folds,
        "baseline": {
            "strategy": cfg.baseline,
            "folder": results["baseline"]["folder"],
            "reused_from": results["baseline"]["reused_from"],
            "metric": base.as_dict(),
        },
        "cells": cell_rows,
        "folds": [
            {
                **{k: v for k, v in f.items() if k != "train_means"},
                "train_mean": f["train_mean"] * scale,
                "heldout_mean": f["heldout_mean"] * scale,
                "train_means": {k: v * scale for k, v in f["train_means"].items()},
            }
            for f in cv["folds"]
        ],
        "cv": interval.as_dict(),
        "cv_diff_vs_baseline": {**diff.as_dict(), "significant": not (diff.low <= 0.0 <= diff.high)},
        "best_on_all_items": {
            "cell": best_all["cell"],
            "metric": best_all["metric"]["mean"],
            "note": "chosen on the evaluation items themselves (optimistic)",
        },
        "bootstrap": {
            "resamples": cfg.bootstrap,
            "seed": cfg.seed,
            "confidence": 0.95,
            "method": "percentile, items resampled, choices held fixed",
        },
    }


def _ci(d: Mapping[str, Any], signed: bool = False) -> str:
    fmt = "{:+.1f}" if signed else "{:.1f}"
    return f"{fmt.format(d['mean'])} [{fmt.format(d['ci_low'])}, {fmt.format(d['ci_high'])}]"


def tune_markdown(report: Mapping[str, Any]) -> str:
    """The report as Markdown: cells, folds, the cross-validated result."""
    m = report["metric"]
    lines = [
        f"# Cross-validated tuning: {report['strategy']} on {report['benchmark']} ({report['model']})",
        "",
        f"Grid `{report['grid']}`"
        + (f", protocol {report['protocol']}" if report["protocol"] else "")
        + f"; {report['n_items']} items, {report['folds_k']} folds (seed {report['seed']}); "
        f"selected on {m}; 95% bootstrap intervals.",
        "",
    ]
    head = ["cell", f"{m} (all items)", "vs baseline", "chosen in folds"]
    rows = [
        [
            r["cell"],
            _ci(r["metric"]),
            _ci(r["diff_vs_baseline"], True),
            ", ".join(str(f) for f in r["chosen_in_folds"]) or "-",
        ]
        for r in report["cells"]
    ]
    rows.append([f"baseline ({report['baseline']['strategy']})", _ci(report["baseline"]["metric"]), "-", "-"])
    lines.append(markdown_grid(head, rows))
    head = ["held-out fold", "n", "chosen on the other folds", f"{m} there", f"{m} held out"]
    rows = [
        [str(f["fold"]), str(f["n"]), f["chosen"], f"{f['train_mean']:.1f}", f"{f['heldout_mean']:.1f}"]
        for f in report["folds"]
    ]
    lines.append(markdown_grid(head, rows))
    d = report["cv_diff_vs_baseline"]
    lines += [
        f"Cross-validated {m}: **{_ci(report['cv'])}**; paired difference to the baseline on the same "
        f"items: {_ci(d, True)}" + (" (interval excludes 0)" if d["significant"] else "") + ".",
        f"Best cell on all items (tuned on the test items, optimistic): {report['best_on_all_items']['cell']}"
        f" at {report['best_on_all_items']['metric']:.1f}.",
        "",
    ]
    return "\n".join(lines)


def _write_report(out: Path, stem: str, report: dict[str, Any]) -> None:
    from contrastive_decoding.eval.summary import write_json_atomic, write_text_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{stem}.json", report)
    write_text_atomic(out / f"{stem}.md", tune_markdown(report))
    plot_tune(report, out / f"{stem}.png")


def plot_tune(report: Mapping[str, Any], path: Path) -> Path:
    """Bar chart of the metric by cell (95% intervals), with the baseline and the cross-validated
    metric as lines; cells chosen in some fold are labelled with their folds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = report["cells"]
    means = [c["metric"]["mean"] for c in cells]
    err = [
        [c["metric"]["mean"] - c["metric"]["ci_low"] for c in cells],
        [c["metric"]["ci_high"] - c["metric"]["mean"] for c in cells],
    ]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(cells) + 2.5), 4.2))
    colours = ["#dd8452" if c["chosen_in_folds"] else "#4c72b0" for c in cells]
    ax.bar(range(len(cells)), means, yerr=err, capsize=4, color=colours)
    for x, c in enumerate(cells):
        if c["chosen_in_folds"]:
            folds = ",".join(str(f) for f in c["chosen_in_folds"])
            ax.annotate(
                f"fold {folds}",
                (x, c["metric"]["ci_high"]),
                ha="center",
                va="bottom",
                fontsize=7,
                textcoords="offset points",
                xytext=(0, 2),
            )
    ax.axhline(
        report["baseline"]["metric"]["mean"],
        color="grey",
        linestyle="--",
        label=f"baseline {report['baseline']['metric']['mean']:.1f}",
    )
    ax.axhline(
        report["cv"]["mean"],
        color="#c44e52",
        linestyle="-",
        label=f"cross-validated {report['cv']['mean']:.1f}",
    )
    ax.set_xticks(range(len(cells)), [c["cell"].replace(", ", "\n") for c in cells], fontsize=7)
    ax.set_ylabel(report["metric"] + (" (%)" if report["scale"] == 100 else ""))
    ax.set_title(
        f"{report['strategy']} on {report['benchmark']}: {report['metric']} by cell "
        f"(n={report['n_items']}, {report['folds_k']} folds)",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
