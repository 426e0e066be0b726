"""The ``contrastive-decoding`` command: ``eval``, ``compare``, ``table``, ``list``, ``data``, ``serve``...

``contrastive-decoding --help`` lists every command.

Examples::

    contrastive-decoding eval --benchmark tfqa-hf --strategy dola --param dola_layers=high \\
        --limit 20 --out runs/tfqa-hf-dola-high
    contrastive-decoding compare runs/tfqa-hf-baseline runs/tfqa-hf-dola-high
    contrastive-decoding plot runs/tfqa-hf-* --metric mc1 --out plots
    accelerate launch -m contrastive_decoding.eval.cli eval --benchmark gsm8k ...

User errors print one line (``error: ...``) and exit with status 2, having written nothing; Ctrl-C
prints one line (``interrupted: ...``, with how to resume a run) and exits with status 130.

``--help``, ``list`` and every ``COMMAND --help`` import neither torch nor transformers (each
command imports what it needs when it runs; ``list`` reads a generated catalog of the library's
strategies, see :mod:`contrastive_decoding.eval.listing`), so they answer in about a second.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from contrastive_decoding.eval.data_command import add_data_parser, run_data_command  # torch-free
from contrastive_decoding.eval.errors import EvalError, RunInterrupted

__all__ = ["build_parser", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and raises instead of exiting."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise EvalError(f"{self.prog}: {message} (see --help)")


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard {text!r}: write it as I/N, e.g. 0/4") from None
    return index, count


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = _Parser(
        prog="contrastive-decoding", description="Evaluate layer-contrastive decoding strategies."
    )
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        metavar="MODULE",
        help="a module name or .py file that registers strategies (register_strategy); repeatable, "
        "before the command: its strategies become --strategy names (and lm-eval strategy= names)",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    ev = sub.add_parser("eval", help="run (or resume) one benchmark with one model and strategy")
    ev.add_argument(
        "--benchmark", "-b", required=True, help="benchmark name (see `contrastive-decoding list`)"
    )
    ev.add_argument("--model", "-m", default="smollm2", help="'smollm2' (embedded), Hub id, folder or .gguf")
    ev.add_argument("--dtype", default="float32", help="torch dtype, e.g. float32, bfloat16")
    ev.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda:0', ...")
    ev.add_argument(
        "--device-map", default=None, help="from_pretrained device_map, e.g. 'auto' for big models"
    )
    ev.add_argument("--strategy", "-s", default="baseline", help="strategy or preset (see `list`)")
    ev.add_argument(
        "--param",
        "-p",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="strategy parameter (repeatable)",
    )
    ev.add_argument("--protocol", default=None, help="MC scoring convention: paper | normalized")
    ev.add_argument(
        "--floor",
        default="fixed",
        choices=("fixed", "relative"),
        help="normalized protocol: implausible tokens score -1000 (fixed, DoLa's) or 1000 below the "
        "position's lowest plausible score (relative)",
    )
    ev.add_argument("--limit", type=int, default=None, help="only the first N items")
    ev.add_argument("--shard", type=_shard, default=None, metavar="I/N", help="run shard I of N (0-based)")
    ev.add_argument(
        "--out",
        "-o",
        default=None,
        help="output folder (default: runs/<benchmark>/<model>/<strategy>, the strategy followed by the "
        "--param values and the options given that shape results, e.g. runs/tfqa-hf/smollm2/"
        "dola_dola_layers-high_protocol-normalized); a folder holding a run with other settings is "
        "refused before the model loads",
    )
    ev.add_argument("--batch-size", type=int, default=None, help="prompts per generation batch")
    ev.add_argument(
        "--max-new-tokens", type=int, default=None, help="generation budget (default: the benchmark's)"
    )
    ev.add_argument(
        "--repetition-penalty", type=float, default=None, help="default: 1.2 with DoLa, 1.0 baseline"
    )
    ev.add_argument("--data", default=None, help="data file, or 'hub' to load the Hub copy")
    ev.add_argument("--data-dir", default=None, help="folder laid out like ../shared/data")
    ev.add_argument("--judge", default=None, help="judge model for TruthfulQA generation (true/info)")
    ev.add_argument("--judge-info", default=None, help="separate informativeness judge")
    ev.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    ev.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    ev.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")

    cmp_ = sub.add_parser("compare", help="paired differences between finished runs on the same items")
    cmp_.add_argument("runs", nargs="+", help="run folders; the first is the reference")
    cmp_.add_argument("--json", default=None, help="also write the rows to this JSON file")
    cmp_.add_argument("--bootstrap", type=int, default=1000)
    cmp_.add_argument("--seed", type=int, default=0)

    pl = sub.add_parser("plot", help="PNG plots: a metric by strategy, and premature-layer usage")
    pl.add_argument("runs", nargs="+", help="finished run folders")
    pl.add_argument("--metric", default=None, help="metric to plot (default: the first)")
    pl.add_argument("--out", "-o", default="plots", help="folder for the PNG files")

    tb = sub.add_parser("table", help="Markdown table of finished runs")
    tb.add_argument("runs", nargs="+", help="run folders (unfinished runs are left out, with a note)")
    tb.add_argument("--metrics", default=None, help="metric columns, comma-separated, e.g. mc1,mc2,mc3")
    tb.add_argument("--no-model", action="store_true", help="leave out the model column")

    an = sub.add_parser(
        "answers", help="generation runs: mean answer length, answers at the token limit, answers not read"
    )
    an.add_argument(
        "runs", nargs="+", help="generation run folders (unfinished runs are left out, with a note)"
    )
    _add_research_parsers(sub)
    add_data_parser(sub)
    sub.add_parser("list", help="benchmarks, strategies and presets")
    sub.add_parser(
        "serve",
        add_help=False,
        help="serve a model over vLLM's OpenAI API with a strategy (needs the [vllm] extra; "
        "`serve --help` for its options)",
    )
    # Never parsed here: main() hands every argument after `lm-eval` to lm-eval's own command line.
    sub.add_parser(
        "lm-eval",
        add_help=False,
        help="run lm-evaluation-harness with the `contrastive` model (needs the [lm-eval] extra; "
        "`lm-eval --help` for its options)",
    )
    lt = sub.add_parser(
        "lm-eval-tasks", help="write lm-eval's truthfulqa_mc2_stable task (mc2 without overflow) into DIR"
    )
    lt.add_argument("folder", metavar="DIR", help="task folder to pass to lm-eval's --include_path")
    lt.add_argument(
        "--data", default=None, help="local TruthfulQA multiple_choice jsonl (offline); default: the Hub"
    )
    return parser


#: Where ``eval`` writes without ``--out`` (gitignored; ``results/`` holds the committed runs).
DEFAULT_RUNS_DIR = "runs"


def _default_out(args: argparse.Namespace) -> str:
    """The folder ``eval`` writes to without ``--out``.

    The label is the strategy, its ``--param`` values and every option given that changes
    results, so that two different commands get two folders (and never one under the committed
    ``results/``). ``--limit`` is left out on purpose: a larger limit resumes the same run, its
    recorded items kept. Characters that would make sub-folders or that some file systems refuse
    become ``-``.

    Args:
        args: the parsed ``eval`` arguments.

    Returns:
        ``runs/<benchmark>/<model>/<label>``, e.g. ``runs/tfqa-hf/smollm2/dola_dola_layers-high``.
    """
    model = Path(args.model).name.removesuffix(".gguf") or "model"
    parts = [args.strategy, *(p.replace("=", "-", 1) for p in args.param)]
    options = (
        ("protocol", args.protocol, None),
        ("floor", args.floor, "fixed"),
        ("dtype", args.dtype, "float32"),
        ("max-new-tokens", args.max_new_tokens, None),
        ("repetition-penalty", args.repetition_penalty, None),
        ("judge", args.judge and Path(args.judge).name, None),
        ("judge-info", args.judge_info and Path(args.judge_info).name, None),
    )
    parts += [f"{name}-{value}" for name, value, default in options if value not in (None, default)]
    label = re.sub(r'[\\/:*?"<>|\s]+', "-", "_".join(parts))
    return str(Path(DEFAULT_RUNS_DIR) / args.benchmark / model / label)


def _cmd_eval(args) -> int:
    from contrastive_decoding.eval.runner import RunConfig, run_eval
    from contrastive_decoding.eval.strategies import parse_params
    from contrastive_decoding.eval.summary import markdown_table

    if args.threads is not None:
        if args.threads < 1:
            raise EvalError(f"--threads {args.threads}: must be a positive integer (CPU threads for torch).")
        import torch

        torch.set_num_threads(args.threads)
    cfg = RunConfig(
        benchmark=args.benchmark,
        out=args.out or _default_out(args),
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        device_map=args.device_map,
        strategy=args.strategy,
        params=parse_params(args.param),
        protocol=args.protocol,
        floor=args.floor,
        limit=args.limit,
        shard=args.shard,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        repetition_penalty=args.repetition_penalty,
        data=args.data,
        data_dir=args.data_dir,
        judge=args.judge,
        judge_info=args.judge_info,
        bootstrap=args.bootstrap,
        seed=args.seed,
        progress=not args.no_progress,
    )
    result = run_eval(cfg)
    if result.summary is None:
        print(
            f"this shard is done; {result.done}/{result.total} items recorded in {result.out}; the shard "
            "that finishes last writes the summary."
        )
        return 0
    print(markdown_table([result.summary]), end="")
    below = result.summary.get("below_floor")
    if below:
        print(
            f"warning: in {below['items']} item(s), {below['tokens']} plausible answer token(s) scored "
            "below the -1000 floor of implausible ones, so implausible tokens outranked them; rerun with "
            "--floor relative (into another --out) to compare.",
            file=sys.stderr,
        )
    print(f"summary: {result.out / 'summary.json'}")
    return 0


def _check_out_file(path: Path, option: str) -> None:
    """Refuse an output file path that is a folder, lies in no folder, or cannot be written (before
    anything is computed or written)."""
    if path.is_dir():
        raise EvalError(f"{option} {path}: is a folder; give a file path, e.g. {path / 'rows.json'}.")
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise EvalError(f"{option} {path}: {parent} is a file, not a folder; give another path.")
    if not parent.exists():
        raise EvalError(f"{option} {path}: its folder {parent} does not exist; create it or choose another.")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise EvalError(f"{option} {path}: not writable; choose a path you can write to.")
    import tempfile

    try:  # some places refuse writes whatever the permission bits say (os.access is true for root)
        fd, probe = tempfile.mkstemp(prefix=".contrastive-decoding-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise EvalError(
            f"{option} {path}: not writable ({exc.strerror or exc}); choose a path you can write to."
        ) from None


def _write_json_file(path: Path, rows, option: str) -> None:
    from contrastive_decoding.eval.records import write_error
    from contrastive_decoding.eval.summary import write_json_atomic

    try:
        write_json_atomic(path, rows)
    except OSError as exc:
        raise EvalError(f"{option} {write_error(path, exc, 'nothing was written')}") from None


def _check_stats_options(args) -> None:
    from contrastive_decoding.eval.runner import _check_int

    _check_int("bootstrap", args.bootstrap, 100, "resamples")
    _check_int("seed", args.seed, 0, "")


def _cmd_compare(args) -> int:
    from contrastive_decoding.eval.compare import compare_runs, comparison_table

    _check_stats_options(args)
    if args.json:
        _check_out_file(Path(args.json), "--json")
    rows = compare_runs(args.runs, args.bootstrap, args.seed)
    if args.json:
        _write_json_file(Path(args.json), rows, "--json")
    print(comparison_table(rows), end="")
    return 0


def _cmd_plot(args) -> int:
    from contrastive_decoding.eval.plot import plot_layers, plot_metric
    from contrastive_decoding.eval.runner import check_out_folder
    from contrastive_decoding.eval.summary import load_summary

    out = Path(args.out)
    check_out_folder(out, probe=True)
    summaries = [load_summary(Path(run)) for run in args.runs]  # every run is read before drawing
    metric = args.metric or next(iter(summaries[0]["metrics"]))
    for run, summary in zip(args.runs, summaries, strict=True):
        if metric not in summary["metrics"]:
            raise EvalError(
                f"--metric {metric}: {run} has no such metric; it has {', '.join(summary['metrics'])}."
            )
    try:
        print(plot_metric(args.runs, metric, out / f"{metric}.png"))
        try:
            print(plot_layers(args.runs, out / "premature_layers.png"))
        except EvalError as exc:
            print(f"no layer plot: {exc}")
    except OSError as exc:
        raise EvalError(f"--out {out}: cannot write the plots there ({exc.strerror or exc}).") from None
    return 0


def _finished_runs(runs: list[str]) -> list[Path]:
    """The run folders given, less those still in progress (or interrupted), each named on stderr:
    a table of a whole results tree leaves them out. A folder that is no run at all stays in, so
    that loading it reports the error."""
    from contrastive_decoding.eval.runner import RUN_FILE
    from contrastive_decoding.eval.summary import SUMMARY_JSON

    finished = []
    for run in map(Path, runs):
        if run.is_dir() and (run / RUN_FILE).is_file() and not (run / SUMMARY_JSON).is_file():
            print(f"{run}: unfinished, left out (rerun its eval command to finish it)", file=sys.stderr)
            continue
        finished.append(run)
    return finished


def _cmd_table(args) -> int:
    from contrastive_decoding.eval.summary import load_summary, markdown_table

    summaries = [load_summary(run) for run in _finished_runs(args.runs)]
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    print(markdown_table(summaries, metrics=metrics, model_column=not args.no_model), end="")
    return 0


def _cmd_answers(args) -> int:
    from contrastive_decoding.eval.answer_stats import answer_stats_table

    print(answer_stats_table(_finished_runs(args.runs)), end="")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    # The stored catalog unless strategies were registered beyond the library's (no torch import).
    from contrastive_decoding.eval.listing import listing_text

    print(listing_text(), end="")
    return 0


def _add_research_parsers(sub) -> None:
    """``inspect``, ``tune`` and ``analyze``: the research tools (see the README's "Research tools")."""
    ins = sub.add_parser(
        "inspect", help="layer map of a text: each layer's top token, divergence, DoLa's layer choice"
    )
    ins.add_argument("--model", "-m", default="smollm2", help="'smollm2' (embedded), Hub id, folder or .gguf")
    ins.add_argument("--text", "-t", required=True, help="the text to read, e.g. a question and its answer")
    ins.add_argument(
        "--prompt-len", type=int, default=0, help="leading tokens whose own predictions are not shown"
    )
    ins.add_argument("--layers", default=None, help="early-exit layers to show: 0,2,4 or 10-29 (default all)")
    ins.add_argument("--dola-layers", default="high", help="DoLa bucket: high, low, 15, 0,2,4")
    ins.add_argument("--divergence", default="reference", help="reference (DoLa's code) or jsd (textbook)")
    ins.add_argument("--final-norm", action="store_true", help="apply the final norm to early exits")
    ins.add_argument("--dtype", default="float32", help="torch dtype, e.g. float32, bfloat16")
    ins.add_argument("--device", default="cpu", help="'cpu', 'cuda', 'cuda:0', ...")
    ins.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ins.add_argument("--out", "-o", required=True, help="folder for layer_map.json/.csv and the PNG heatmaps")

    tu = sub.add_parser("tune", help="cross-validated choice of strategy settings over a grid")
    tu.add_argument("--benchmark", "-b", required=True, help="benchmark name (see `list`)")
    tu.add_argument("--strategy", "-s", required=True, help="strategy or preset of the grid's parameters")
    tu.add_argument(
        "--grid", required=True, help='e.g. "dola_layers=low,high,[0,2,4];relative_top=0.1,0.05" '
    )
    tu.add_argument("--folds", type=int, default=2, help="number of folds (>= 2; default 2)")
    tu.add_argument("--seed", type=int, default=0, help="seed of the folds and of the bootstrap")
    tu.add_argument("--metric", default=None, help="metric to select on (default: the benchmark's first)")
    tu.add_argument("--baseline", default="baseline", help="strategy of the paired reference run")
    tu.add_argument(
        "--reuse", action="append", default=[], metavar="RUN", help="finished run that may seed a cell"
    )
    tu.add_argument("--report", default="tune", help="stem of the report files in --out (default tune)")
    tu.add_argument("--out", "-o", required=True, help="tuning folder: cells/<cell>/, baseline/, reports")
    tu.add_argument("--model", "-m", default="smollm2", help="'smollm2' (embedded), Hub id, folder or .gguf")
    tu.add_argument("--dtype", default="float32", help="torch dtype")
    tu.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda:0', ...")
    tu.add_argument("--device-map", default=None, help="from_pretrained device_map")
    tu.add_argument("--protocol", default=None, help="MC scoring for every cell: paper | normalized")
    tu.add_argument("--limit", type=int, default=None, help="only the first N items")
    tu.add_argument("--data", default=None, help="data file, or 'hub'")
    tu.add_argument("--data-dir", default=None, help="folder laid out like ../shared/data")
    tu.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    tu.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    tu.add_argument("--no-progress", action="store_true", help="no progress bars")

    lb = sub.add_parser("analyze", help="length bias of finished multiple-choice runs")
    lb.add_argument("runs", nargs="+", help="finished multiple-choice run folders")
    lb.add_argument("--limit", type=int, default=None, help="only the first N items the runs share")
    lb.add_argument("--json", default=None, help="also write the rows to this JSON file")


def _set_threads(threads) -> None:
    if threads is not None:
        if threads < 1:
            raise EvalError(f"--threads {threads}: must be a positive integer (CPU threads for torch).")
        import torch

        torch.set_num_threads(threads)


def _layer_list(text: str | None, option: str) -> list[int] | str | int | None:
    """``0,2,4`` / ``10-29`` / ``high`` into layer indices (or the bucket name)."""
    if text is None:
        return None
    if text in ("high", "low"):
        return text
    layers: list[int] = []
    try:
        for part in text.split(","):
            a, sep, b = part.strip().partition("-")
            layers += list(range(int(a), int(b) + 1)) if sep else [int(a)]
    except ValueError:
        if option == "--dola-layers":
            raise EvalError(
                f"{option} {text!r}: give a bucket, high or low, one layer index (15) or layer indices "
                "0,2,4 or a range 10-29."
            ) from None
        raise EvalError(f"{option} {text!r}: write layer indices as 0,2,4 or a range 10-29.") from None
    return layers


def _max_positions(model) -> int | None:
    """The most positions the model reads (its position table or trained context), if it says."""
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _cmd_inspect(args) -> int:
    from contrastive_decoding.eval.runner import (
        RunConfig,
        _check_torch_settings,
        _resolve_device,
        check_out_folder,
    )

    from contrastive_decoding import layer_map, load_model

    _set_threads(args.threads)
    layers = _layer_list(args.layers, "--layers")
    if isinstance(layers, str):
        raise EvalError(f"--layers {layers}: give indices (0,2,4 or 10-29); a bucket goes to --dola-layers.")
    bucket = _layer_list(args.dola_layers, "--dola-layers")
    if isinstance(bucket, list) and len(bucket) == 1:
        bucket = bucket[0]
    _check_torch_settings(RunConfig(benchmark="", out="", dtype=args.dtype, device=args.device))
    out = Path(args.out)
    check_out_folder(out, probe=True)
    try:
        model, tokenizer = load_model(args.model, dtype=args.dtype, device=_resolve_device(args.device))
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise EvalError(f"--model {args.model}: cannot load it ({first[:300]}).") from None
    positions = _max_positions(model)
    n_tokens = len(tokenizer(args.text)["input_ids"]) if args.text else 0
    if positions is not None and n_tokens > positions:
        raise EvalError(
            f"--text: {n_tokens} tokens, more than the model's {positions} positions; shorten the text "
            f"to at most {positions} tokens."
        )
    try:
        result = layer_map(
            model,
            tokenizer,
            args.text,
            prompt_len=args.prompt_len,
            layers=layers,
            dola_layers=bucket,
            divergence=args.divergence,
            final_norm=args.final_norm,
        )
    except ValueError as exc:
        message = str(exc)
        for name, option in (("`prompt_len`", "--prompt-len"), ("`layers`", "--layers"),
                             ("`dola_layers`", "--dola-layers"), ("`divergence`", "--divergence"),
                             ("`text`", "--text")):
            message = message.replace(name, option)
        raise EvalError(message) from None
    try:
        written = result.write(out)
    except OSError as exc:
        raise EvalError(f"--out {out}: cannot write the map there ({exc.strerror or exc}).") from None
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0


def _cmd_tune(args) -> int:
    from contrastive_decoding.eval.tune import TuneConfig, run_tune, tune_markdown

    _set_threads(args.threads)
    cfg = TuneConfig(
        benchmark=args.benchmark,
        strategy=args.strategy,
        grid=args.grid,
        out=args.out,
        folds=args.folds,
        seed=args.seed,
        metric=args.metric,
        baseline=args.baseline,
        reuse=args.reuse,
        report=args.report,
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        device_map=args.device_map,
        protocol=args.protocol,
        limit=args.limit,
        data=args.data,
        data_dir=args.data_dir,
        bootstrap=args.bootstrap,
        progress=not args.no_progress,
    )
    report = run_tune(cfg)
    print(tune_markdown(report), end="")
    print(f"report: {Path(args.out) / (args.report + '.json')}")
    return 0


def _cmd_analyze(args) -> int:
    from contrastive_decoding.eval.length_bias import analyze_runs, length_bias_table

    if args.json:
        _check_out_file(Path(args.json), "--json")
    rows = analyze_runs(args.runs, limit=args.limit)
    if args.json:
        _write_json_file(Path(args.json), rows, "--json")
    print(length_bias_table(rows), end="")
    return 0


def _cmd_lm_eval_tasks(args) -> int:
    from contrastive_decoding.lm_eval import INSTALL_HINT, lm_eval_available

    if not lm_eval_available():
        raise EvalError(INSTALL_HINT)
    from contrastive_decoding.eval.runner import check_out_folder

    from contrastive_decoding.integrations.lm_eval_tasks import STABLE_MC2_TASK, write_stable_mc2_task

    check_out_folder(Path(args.folder), probe=True, option="DIR")
    if args.data is not None and not Path(args.data).is_file():
        raise EvalError(
            f"--data {args.data}: is not a file; give TruthfulQA's multiple_choice validation split as "
            "JSON lines (or leave --data out to read the Hub's copy)."
        )
    try:
        yaml = write_stable_mc2_task(args.folder, args.data)
    except ValueError as exc:  # the data file's fields
        raise EvalError(f"--data {args.data}: {exc}") from None
    except NotADirectoryError:
        raise EvalError(f"DIR {args.folder}: is a file; give a folder for lm-eval's tasks.") from None
    except FileNotFoundError as exc:
        raise EvalError(str(exc)) from None
    except OSError as exc:  # e.g. a folder that cannot be written
        raise EvalError(f"DIR {args.folder}: cannot write there ({exc.strerror or exc}).") from None
    print(f"wrote {yaml}; run lm-eval with --include_path {args.folder} --tasks {STABLE_MC2_TASK}")
    return 0


# Each takes the parsed arguments and returns the exit status; a command added with its own parser
# (e.g. `add_xxx_parser(sub)` in build_parser) needs one entry here.
_COMMANDS = {
    "data": run_data_command,
    "eval": _cmd_eval,
    "compare": _cmd_compare,
    "plot": _cmd_plot,
    "table": _cmd_table,
    "answers": _cmd_answers,
    "list": _cmd_list,
    "inspect": _cmd_inspect,
    "tune": _cmd_tune,
    "analyze": _cmd_analyze,
    "lm-eval-tasks": _cmd_lm_eval_tasks,
}


# The commands that load models (so import transformers anyway).
_LOADS_MODELS = frozenset({"eval", "inspect", "tune"})

_LM_EVAL_NOTE = """\
usage: contrastive-decoding [--import MODULE] lm-eval [lm-eval's own arguments ...]

Runs lm-evaluation-harness's own command line with this library's `contrastive` model registered;
every argument goes to lm-eval unchanged (needs the [lm-eval] extra). For example:

  contrastive-decoding lm-eval --model contrastive \\
      --model_args pretrained=smollm2,strategy=dola-high,dtype=float32 --tasks truthfulqa_mc2_stable

--model_args: everything lm-eval's `hf` model takes (pretrained= also takes smollm2 or a .gguf
path), plus strategy= (none, or a strategy or preset of `contrastive-decoding list`) with that
strategy's parameters, protocol=paper|normalized, repetition_penalty=, score_batch_size=.
The task truthfulqa_mc2_stable (mc2 without exp overflow) is written to a temporary folder unless
--include_path names one (see `lm-eval-tasks`). Guide: docs/harness/lm-eval.md.
"""


def _lm_eval_help(args: list[str]) -> int:
    """``lm-eval --help``: what this command adds, then lm-eval's own help.

    The `contrastive` model is not registered for it (lm-eval's help does not list models), so
    neither torch nor transformers is imported.
    """
    from contrastive_decoding.integrations import INSTALL_HINT, lm_eval_available

    print(_LM_EVAL_NOTE)
    if not lm_eval_available():
        print(INSTALL_HINT)
        return 0
    print("lm-eval's own help:\n")
    sys.stdout.flush()  # before lm-eval's argparse writes
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    except SystemExit as exc:  # argparse's --help, or a usage error in the other arguments
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return 0


def _quiet_transformers() -> None:
    """Leave transformers' progress bars and warnings out: weight-loading bars are noise next to the
    run's own progress bar. Only the commands that load models call it (it imports transformers)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _import_strategies(argv: list[str]) -> list[str]:
    """Import the modules named by leading ``--import`` options; the rest of ``argv``.

    They register their strategies in this process. Processes started otherwise (``lm_eval`` or
    ``accelerate launch`` workers) read the environment variable ``CONTRASTIVE_DECODING_STRATEGIES``
    instead (see :mod:`contrastive_decoding.strategies`).
    """
    imports = []
    while argv and (argv[0] == "--import" or argv[0].startswith("--import=")):
        if argv[0] == "--import":
            if len(argv) < 2:
                raise EvalError("--import needs a module name or a .py file that registers strategies.")
            imports.append(argv[1])
            argv = argv[2:]
        else:
            imports.append(argv[0].split("=", 1)[1])
            argv = argv[1:]
    if imports:
        from contrastive_decoding.strategies import ENVIRONMENT_VARIABLE, load_strategy_modules

        try:
            load_strategy_modules(imports)
        except ValueError as exc:
            raise EvalError(f"--import: {exc}") from None
        # Processes this command starts (`serve`'s vLLM server and its workers) import them too.
        named = [str(Path(m).resolve()) if m.endswith(".py") else m for m in imports]
        earlier = [m for m in os.environ.get(ENVIRONMENT_VARIABLE, "").split(",") if m.strip()]
        os.environ[ENVIRONMENT_VARIABLE] = ",".join(earlier + named)
    return argv


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 user error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        argv = _import_strategies(argv)
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if argv and argv[0] == "lm-eval":  # every later argument goes to lm-eval's own CLI, unchanged
        if "-h" in argv[1:] or "--help" in argv[1:]:
            return _lm_eval_help(argv[1:])
        from contrastive_decoding.lm_eval import main as lm_eval_main

        return lm_eval_main(argv[1:])
    if argv and argv[0] == "serve":  # our options, then vLLM's server's own, unchanged
        from contrastive_decoding.backends.vllm.serve import main as serve_main

        return serve_main(argv[1:])
    try:
        args = build_parser().parse_args(argv)  # --help exits here, before anything heavy loads
        if args.command in _LOADS_MODELS:
            _quiet_transformers()
        return _COMMANDS[args.command](args)
    except EvalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunInterrupted as exc:  # Ctrl-C in a run: what is recorded, and how to resume
        print(f"\ninterrupted: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted (Ctrl-C).", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `contrastive-decoding data | head`: the reader left; not an error
        # Python would print a second traceback flushing stdout at exit; point it at devnull.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
