"""Run one benchmark with one model and strategy: resumable, shardable, summarised when complete.

The output folder holds ``run.json`` (the settings that shape results; a rerun with other
settings is refused), per-item records ``items*.jsonl`` (one file per shard, appended and synced
as items complete), and, only once every item of every shard is recorded, ``summary.json`` and
``summary.md``. Rerunning the same command resumes: items already recorded in any shard file are
skipped (a batch only partly recorded is recomputed whole, so batching is the same as in an
uninterrupted run).

Sharding: ``shard=(i, n)`` runs items ``i, i+n, i+2n, ...``; under ``accelerate launch`` (or
``torchrun``) the process rank and world size are used. Shards write separate files; the shard
that finds every item recorded when it finishes merges them into the summary.

Validation comes first: settings, parameters and the output folder before the data and the model
load, a folder holding a run with other settings (its ``run.json`` or its records) before the model
loads, then the parameters that depend on the model's depth (layers, streams, amateur) before
``run.json`` or a records file is written. A failure before the first record takes back what the
call wrote, so the corrected command runs in the same folder. One process writes each records
file (:class:`~contrastive_decoding.eval.records.RunLock`). A record whose scores or metrics are
NaN or infinite stops the run (nothing of its batch is recorded): a NaN cannot be ranked, and an
``argmax`` over one silently picks the first answer.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from contrastive_decoding.eval.benchmarks import Benchmark, EvalContext, get_benchmark
from contrastive_decoding.eval.data import ResolvedData, load_hub_rows, resolve_data
from contrastive_decoding.eval.errors import DataError, EvalError, NonFiniteScoreError, RunInterrupted
from contrastive_decoding.eval.records import (
    RUN_ID_FIELD,
    RecordWriter,
    RunLock,
    item_files,
    lock_error,
    non_finite_values,
    read_records,
    record_runs,
    repair_tail,
    run_id,
    write_error,
)
from contrastive_decoding.eval.strategies import StrategyRun, build_strategy, check_on_model, check_strategy
from contrastive_decoding.eval.summary import (
    SUMMARY_JSON,
    SUMMARY_MD,
    build_summary,
    write_json_atomic,
    write_summary,
)

__all__ = ["RunConfig", "RunResult", "check_out_folder", "load_items", "run_eval"]

RUN_FILE = "run.json"
SCORING_PROTOCOLS = ("paper", "normalized")


@dataclass
class RunConfig:
    """Everything ``contrastive-decoding eval`` takes.

    Attributes:
        benchmark: benchmark name (see ``contrastive-decoding list``).
        out: output folder.
        model: ``"smollm2"`` (embedded), a Hub id, a model folder or a ``.gguf`` file.
        dtype: torch dtype name.
        device: ``"auto"`` (CUDA if available, else CPU), or a torch device.
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"`` to spread a big model over
            GPUs); overrides ``device``.
        strategy: strategy or preset name.
        params: strategy parameters.
        protocol: scoring convention for multiple-choice benchmarks (``"paper"`` or
            ``"normalized"``; default: the benchmark's).
        floor: under ``"normalized"``, the score of implausible tokens: ``"fixed"`` (DoLa's -1000)
            or ``"relative"`` (1000 below the position's lowest plausible score, see
            :class:`~contrastive_decoding.RelativeFloor`; labelled in the results).
        limit: run only the first ``limit`` items.
        shard: ``(index, count)`` to run one shard of the items.
        batch_size: prompts per generation batch (default: the benchmark's).
        max_new_tokens: generation budget (default: the benchmark's).
        repetition_penalty: generation penalty (default: the strategy's, 1.2 for DoLa).
        data: a data file, or ``"hub"``.
        data_dir: a folder laid out like ``../shared/data``.
        judge: judge model for TruthfulQA generation (truthfulness, and informativeness unless
            ``judge_info`` is given).
        judge_info: separate informativeness judge.
        bootstrap: bootstrap resamples for intervals.
        seed: bootstrap seed.
        progress: show a progress bar.
    """

    benchmark: str
    out: str
    model: str = "smollm2"
    dtype: str = "float32"
    device: str = "auto"
    device_map: str | None = None
    strategy: str = "baseline"
    params: dict[str, Any] = field(default_factory=dict)
    protocol: str | None = None
    floor: str = "fixed"
    limit: int | None = None
    shard: tuple[int, int] | None = None
    batch_size: int | None = None
    max_new_tokens: int | None = None
    repetition_penalty: float | None = None
    data: str | None = None
    data_dir: str | None = None
    judge: str | None = None
    judge_info: str | None = None
    bootstrap: int = 1000
    seed: int = 0
    progress: bool = True


@dataclass
class RunResult:
    """What a call to :func:`run_eval` did.

    Attributes:
        out: the output folder.
        done: items recorded (all shards).
        total: items in the run.
        summary: the summary, when this call completed the run (else ``None``).
    """

    out: Path
    done: int
    total: int
    summary: dict[str, Any] | None


def load_items(benchmark: Benchmark, resolved: ResolvedData) -> list[dict[str, Any]]:
    """The benchmark's items from the resolved source."""
    if resolved.kind == "file":
        return benchmark.read_file(Path(resolved.location))
    if benchmark.from_hub is None:
        return load_hub_rows(benchmark.source, benchmark.name, benchmark.read_file)
    return benchmark.from_hub(load_hub_rows(benchmark.source, benchmark.name, benchmark.read_file))


def _check_config(cfg: RunConfig, benchmark: Benchmark) -> None:
    if cfg.protocol is not None:
        if benchmark.task != "score":
            raise EvalError(
                f"--protocol applies to multiple-choice benchmarks; {benchmark.name} generates text."
            )
        if cfg.protocol not in SCORING_PROTOCOLS:
            raise EvalError(f"--protocol {cfg.protocol!r} is unknown; valid: {', '.join(SCORING_PROTOCOLS)}.")
    if cfg.floor not in ("fixed", "relative"):
        raise EvalError(f"--floor {cfg.floor!r} is unknown; valid: fixed (DoLa's -1000), relative.")
    if cfg.floor == "relative" and (cfg.protocol or benchmark.default_protocol) != "normalized":
        raise EvalError(
            "--floor relative applies to --protocol normalized (the floor is the score of implausible "
            f"tokens there); {benchmark.name} scores with {cfg.protocol or benchmark.default_protocol}."
        )
    if (cfg.judge or cfg.judge_info) and not benchmark.name.startswith("tfqa-gen"):
        raise EvalError(
            f"--judge applies to TruthfulQA generation (tfqa-gen, tfqa-gen-lmeval), not {benchmark.name}."
        )
    if cfg.judge_info and not cfg.judge:
        raise EvalError("--judge-info needs --judge (the truthfulness judge).")
    for name in ("limit", "batch_size", "max_new_tokens"):
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be a positive integer, got {value}.")
    if cfg.shard is not None:
        index, count = cfg.shard
        if count < 1 or not 0 <= index < count:
            raise EvalError(f"--shard {index}/{count}: write it as I/N with 0 <= I < N, e.g. --shard 0/4.")
    _check_int("bootstrap", cfg.bootstrap, 100, "resamples")
    _check_int("seed", cfg.seed, 0, "")
    rp = cfg.repetition_penalty
    if rp is not None and (isinstance(rp, bool) or not isinstance(rp, (int, float)) or not math.isfinite(rp)):
        raise EvalError(f"--repetition-penalty {rp}: must be a finite number > 0 (1.0 is no penalty).")
    if rp is not None and rp <= 0:
        raise EvalError(
            f"--repetition-penalty {rp}: must be > 0 (1.0 is no penalty; DoLa's authors use 1.2)."
        )
    _check_torch_settings(cfg)


def _check_int(name: str, value: Any, minimum: int, unit: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = f"an integer >= {minimum}" + (f" ({unit})" if unit else "")
        raise EvalError(f"--{name} {value}: must be {what}.")


def _check_torch_settings(cfg: RunConfig) -> None:
    """--dtype and --device, so that a typo is not reported as a model that cannot load."""
    import torch

    if not isinstance(getattr(torch, str(cfg.dtype), None), torch.dtype):
        raise EvalError(f"--dtype {cfg.dtype!r}: not a torch dtype; use float32, bfloat16 or float16.")
    if cfg.device_map is not None or cfg.device == "auto":
        return
    try:
        device = torch.device(cfg.device)
    except (RuntimeError, TypeError):
        raise EvalError(f"--device {cfg.device!r}: not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {cfg.device}: no CUDA device is available here; use --device cpu or auto.")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise EvalError(
            f"--device {cfg.device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
            f"numbered from 0."
        )


def check_out_folder(out: Path, probe: bool = False, option: str = "--out") -> None:
    """Refuse an ``--out`` that names a file, lies under a file, or cannot be written (before
    anything loads; nothing is left behind here).

    Args:
        out: the output folder.
        probe: also create and remove an empty folder in the nearest existing one, for places that
            refuse writes whatever the permission bits say (``os.access`` is always true for root).
        option: the option named in the message.

    Raises:
        EvalError: naming the option and the fix.
    """
    if out.exists() and not out.is_dir():
        raise EvalError(
            f"{option} {out}: is a file, not a folder; give a folder path (it is created if absent)."
        )
    existing = out
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise EvalError(
            f"{option} {out}: {existing} is a file, so no folder can be made under it; give a folder path."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EvalError(f"{option} {out}: {existing} is not writable; choose a folder you can write to.")
    if probe:
        import tempfile

        try:
            os.rmdir(tempfile.mkdtemp(prefix=".contrastive-decoding-probe-", dir=existing))
        except OSError as exc:
            raise EvalError(
                f"{option} {out}: {existing} is not writable ({exc.strerror or exc}); choose a folder you "
                "can write to."
            ) from None


def _rank_and_world(cfg: RunConfig) -> tuple[int, int, int | None]:
    """(shard index, shard count, local rank or None).

    ``accelerate launch`` and ``torchrun`` set RANK / WORLD_SIZE / LOCAL_RANK for every process;
    they are read from the environment rather than from accelerate's ``PartialState``, which
    reports a single process on CPU-only machines and would make every process run every item.
    """
    if cfg.shard is not None:
        return cfg.shard[0], cfg.shard[1], None
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        rank = int(os.environ.get("RANK", "0") or 0)
        local = os.environ.get("LOCAL_RANK")
        return rank, world, int(local) if local not in (None, "") else None
    return 0, 1, None


def _resolve_device(device: str, local_rank: int | None = None) -> str:
    if device == "auto":
        import torch

        if torch.cuda.is_available():
            # One GPU per process under a launcher.
            return f"cuda:{local_rank}" if local_rank is not None else "cuda"
        return "cpu"
    return device


def _items_file(out: Path, rank: int, world: int) -> Path:
    return out / ("items.jsonl" if world == 1 else f"items.shard{rank}-of-{world}.jsonl")


def _identity(
    cfg: RunConfig, benchmark: Benchmark, strategy: StrategyRun, resolved: ResolvedData, gen: Any
) -> dict:
    """The settings that shape results (resuming with other values would mix runs)."""
    return {
        "benchmark": benchmark.name,
        "model": cfg.model,
        "dtype": cfg.dtype,
        "strategy": strategy.name,
        "strategy_params": strategy.params,
        "scoring_protocol": _scoring_label(cfg, benchmark, strategy),
        "generation": gen,
        "judge": {"truth": cfg.judge, "info": cfg.judge_info or cfg.judge} if cfg.judge else None,
        "data_sha256": resolved.sha256,
        "data_location": resolved.location if resolved.kind == "hub" else None,
    }


# The keys of `_identity` (a planned identity holding all of them is the run's exact identity).
_IDENTITY_KEYS = frozenset(
    {
        "benchmark",
        "model",
        "dtype",
        "strategy",
        "strategy_params",
        "scoring_protocol",
        "generation",
        "judge",
        "data_sha256",
        "data_location",
    }
)


def _planned_identity(
    cfg: RunConfig, benchmark: Benchmark, base: str, params: dict, resolved: ResolvedData
) -> dict:
    """The run's identity as far as it is known before any model loads.

    The settings, the data and the strategy's name are known. The strategy's recorded parameters,
    scoring label and repetition penalty come from the strategy the harness builds on the loaded
    model; they are predicted only for the strategies whose entries the harness builds itself (the
    plain model, ``cd`` and the library's registered strategies: every parameter with its default
    filled in, :class:`~contrastive_decoding.eval.strategies.StrategyRun`), and left out for an
    entry added with ``register`` whose factory may record them otherwise. A test checks the
    prediction against the built strategy for every registered name.

    Args:
        cfg: the run's settings.
        benchmark: its benchmark.
        base: the registry name behind ``cfg.strategy`` (a preset resolved).
        params: the parameters (a preset's merged in).
        resolved: the data the run reads.

    Returns:
        A dict with some or all of :func:`_identity`'s keys, valued as ``_identity`` values them.
    """
    from contrastive_decoding.eval.strategies import STRATEGIES, _jsonable

    from contrastive_decoding.strategies import registered_strategies

    identity = {
        "benchmark": benchmark.name,
        "model": cfg.model,
        "dtype": cfg.dtype,
        "strategy": base,
        "judge": {"truth": cfg.judge, "info": cfg.judge_info or cfg.judge} if cfg.judge else None,
        "data_sha256": resolved.sha256,
        "data_location": resolved.location if resolved.kind == "hub" else None,
    }
    library = registered_strategies()
    if base != "baseline" and base not in library:
        return identity
    if base == "baseline":
        planned = StrategyRun(base, {}, scoring=None, repetition_penalty=1.0)
    else:  # any object stands for the strategy: only whether there is one matters to the label
        full = _jsonable({**STRATEGIES[base].defaults, **params})
        planned = StrategyRun(base, full, scoring=base, repetition_penalty=library[base].repetition_penalty)
    identity["strategy_params"] = planned.params
    identity["scoring_protocol"] = _scoring_label(cfg, benchmark, planned)
    identity["generation"] = _generation_settings(cfg, benchmark, planned)
    return identity


def _scoring_label(cfg: RunConfig, benchmark: Benchmark, strategy: StrategyRun) -> str | None:
    if benchmark.task != "score":
        return None
    if strategy.scoring is None:
        return "loglik"  # the plain model: --protocol has no effect
    protocol = cfg.protocol or benchmark.default_protocol
    # Only a relative floor is named, so that runs made before it existed keep their label.
    relative = protocol == "normalized" and cfg.floor == "relative"
    return f"{protocol} (relative floor)" if relative else protocol


def _floor(cfg: RunConfig):
    from contrastive_decoding import RelativeFloor

    return RelativeFloor() if cfg.floor == "relative" else -1000.0


def _generation_settings(cfg: RunConfig, benchmark: Benchmark, strategy: StrategyRun) -> dict | None:
    if benchmark.task != "generate":
        return None
    return {
        "greedy": True,
        "max_new_tokens": cfg.max_new_tokens or benchmark.max_new_tokens,
        "repetition_penalty": strategy.repetition_penalty
        if cfg.repetition_penalty is None
        else cfg.repetition_penalty,
        "stop": list(benchmark.stop),
    }


def _strategy_label(cfg: RunConfig) -> str:
    if not cfg.params:
        return cfg.strategy
    inner = ",".join(f"{k}={v}" for k, v in cfg.params.items())
    return f"{cfg.strategy}[{inner}]"


def _check_run_file(out: Path, identity: dict, replaceable: bool) -> tuple[bool, dict | None]:
    """Whether ``run.json`` is to be written (absent, or, ``replaceable``: no record depends on
    it and no other process shares the folder, left by a run that failed before its first item),
    and the identity it holds when it matches this run's (``None``: absent or replaced).

    Raises:
        EvalError: the folder holds records made with other settings, or an unreadable run.json.
    """
    path = out / RUN_FILE
    if not path.is_file():
        return True, None
    try:
        with open(path, encoding="utf-8") as f:
            previous = json.load(f).get("identity", {})
        if not isinstance(previous, dict):
            raise ValueError("identity is not an object")
    except (ValueError, AttributeError, UnicodeDecodeError):
        if replaceable:
            return True, None
        raise EvalError(
            f"--out {out}: {RUN_FILE} is not a run's settings file, yet the folder holds records; use "
            "another --out folder, or restore that file."
        ) from None
    except OSError as exc:
        raise EvalError(f"--out {out}: cannot read {RUN_FILE} ({exc.strerror or exc}).") from None
    diffs = [k for k in identity if previous.get(k) != json.loads(json.dumps(identity[k]))]
    if diffs and not replaceable:
        k = diffs[0]
        raise EvalError(
            f"--out {out}: holds a run with other settings ({k}: {previous.get(k)!r} there, "
            f"{identity[k]!r} now); use another --out folder or delete that one."
        )
    return bool(diffs), None if diffs else previous


def _check_records_are_ours(out: Path, identity: dict, vouched: dict | None) -> None:
    """Refuse records in ``out`` that another run wrote.

    A record names its run (``run_id``). Records without that field were written before records
    named their run: they are this run's when ``run.json`` (``vouched``: its identity, matching
    this run's) says so, and are refused without it.

    Raises:
        EvalError: naming the records file, and how to proceed.
    """
    accepted = {run_id(identity)}
    if vouched is not None:
        accepted.add(run_id(vouched))  # the same settings, as an earlier version recorded them
    for path, counts in record_runs(item_files(out)).items():
        foreign = {k: n for k, n in counts.items() if k is not None and k not in accepted}
        if foreign:
            other, n = next(iter(foreign.items()))
            raise EvalError(
                f"--out {out}: {path.name} holds {n} record(s) of another run (run_id {other}; this "
                f"run's is {run_id(identity)}), made with other settings; rerun that run's own command "
                "to finish it, or use another --out folder for this one."
            )
        if None in counts and vouched is None:
            raise EvalError(
                f"--out {out}: {path.name} holds {counts[None]} record(s) that do not name their run "
                f"(written before records carried a run_id) and no {RUN_FILE} says whose they are; "
                f"restore that run's {RUN_FILE} to resume it, or use another --out folder for this run."
            )


def _load_model(cfg: RunConfig, local_rank: int | None, argument: str = "--model"):
    from contrastive_decoding import load_model

    kwargs: dict[str, Any] = {}
    if cfg.device_map:
        kwargs["device_map"] = cfg.device_map
        device = None
    else:
        device = _resolve_device(cfg.device, local_rank)
    try:
        return load_model(cfg.model, dtype=cfg.dtype, device=device, **kwargs)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EvalError(
            f"{argument} {cfg.model}: cannot load it ({first[:300]}); pass 'smollm2', a Hub id, a model "
            "folder or a .gguf file."
        ) from None


def _load_judge(cfg: RunConfig, local_rank: int | None):
    if not cfg.judge:
        return None
    from contrastive_decoding.eval.judge import Judge

    truth_model, truth_tok = _load_model(
        RunConfig(
            benchmark="",
            out="",
            model=cfg.judge,
            dtype=cfg.dtype,
            device=cfg.device,
            device_map=cfg.device_map,
        ),
        local_rank,
        "--judge",
    )
    if cfg.judge_info:
        info_model, info_tok = _load_model(
            RunConfig(
                benchmark="",
                out="",
                model=cfg.judge_info,
                dtype=cfg.dtype,
                device=cfg.device,
                device_map=cfg.device_map,
            ),
            local_rank,
            "--judge-info",
        )
    else:
        info_model, info_tok = truth_model, truth_tok
    name = cfg.judge + (f" / {cfg.judge_info}" if cfg.judge_info else "")
    return Judge(truth_model, truth_tok, info_model, info_tok, name)


def _batches(items: Sequence[dict], size: int) -> list[list[dict]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def run_eval(cfg: RunConfig, model: Any = None, tokenizer: Any = None) -> RunResult:
    """Run (or resume) one evaluation.

    Args:
        cfg: the run's settings.
        model: an already loaded model (tests, notebooks); ``cfg.model`` then only labels it.
        tokenizer: its tokenizer (required with ``model``).

    Returns:
        A :class:`RunResult`; ``summary`` is set when every item of every shard is recorded.

    Raises:
        EvalError: bad settings, data or model (one line naming the argument and the fix), a run
            folder another process writes (:class:`~contrastive_decoding.eval.errors.RunLockedError`),
            records of another run in the folder, an item whose scores are not finite, or a full disk.
        RunInterrupted: Ctrl-C (a ``KeyboardInterrupt``); says how many items are recorded.
    """
    benchmark = get_benchmark(cfg.benchmark)
    _check_config(cfg, benchmark)
    base_name, params = check_strategy(cfg.strategy, cfg.params)  # names and values, before loading
    out = Path(cfg.out)
    check_out_folder(out)
    resolved = resolve_data(benchmark.source, benchmark.name, cfg.data, cfg.data_dir)
    items = load_items(benchmark, resolved)
    if cfg.limit is not None:
        items = items[: cfg.limit]
    if not items:
        raise DataError(f"benchmark {benchmark.name}: the data has no items.")
    if model is not None and tokenizer is None:
        raise ValueError("`tokenizer` is required when `model` is given")
    rank, world, local_rank = _rank_and_world(cfg)

    # The lock comes before the model loads, so that a second process stops at once.
    trace = _Trace(folder_created=not out.exists())
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out, rank, world)
    except OSError as exc:
        raise lock_error(out, exc) from None
    with lock:
        try:
            return _run_locked(
                cfg, benchmark, base_name, params, resolved, items, lock, trace, model, tokenizer
            )
        except BaseException as exc:
            _take_back(out, trace, lock)
            if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, RunInterrupted):
                raise _interrupted(out, [it["id"] for it in items]) from None
            raise


def _interrupted(out: Path, ids: list) -> RunInterrupted:
    """What a Ctrl-C left: the items recorded (every record is complete and synced) and how to go on."""
    records = read_records(item_files(out)) if out.is_dir() else {}
    done = sum(1 for i in ids if i in records)
    if not done:
        return RunInterrupted(f"no item was recorded in {out}; rerun the same command to start again.")
    return RunInterrupted(
        f"{done} of {len(ids)} items are recorded in {out}; rerun the same command to resume (recorded "
        "items are not redone)."
    )


@dataclass
class _Trace:
    """What one call created in the run folder (taken back if it fails before any record)."""

    folder_created: bool
    files: list[Path] = field(default_factory=list)


def _take_back(out: Path, trace: _Trace, lock: RunLock) -> None:
    """Remove what this call wrote when no item is recorded in the folder, so that the corrected
    command starts clean; with any record there (this or another process's), keep everything."""
    if read_records(item_files(out)):
        return
    for path in trace.files:
        path.unlink(missing_ok=True)
    if trace.folder_created:
        for path in lock.files:  # while still held: a process that opened one now is refused
            path.unlink(missing_ok=True)
        try:
            out.rmdir()
        except OSError:
            pass  # another process put something there meanwhile


def _run_locked(
    cfg, benchmark, base_name, params, resolved, items, lock, trace, model, tokenizer
) -> RunResult:
    out = lock.folder
    rank, world, local_rank = _rank_and_world(cfg)
    own_file = _items_file(out, rank, world)
    repair_tail(own_file)  # a kill mid-write leaves a cut last line in this shard's own file
    # A folder of another run is refused now, not after minutes of loading (checked again below
    # with the built strategy, which alone knows every setting for certain).
    planned = _planned_identity(cfg, benchmark, base_name, params, resolved)
    replaceable = lock.alone and not read_records(item_files(out))
    _, planned_vouched = _check_run_file(out, planned, replaceable)
    if planned.keys() == _IDENTITY_KEYS:  # a partial identity has no run_id to check records with
        _check_records_are_ours(out, planned, planned_vouched)
    if model is None:
        model, tokenizer = _load_model(cfg, local_rank)
    strategy = build_strategy(model, base_name, params, tokenizer=tokenizer)
    check_on_model(strategy, model, tokenizer, given=params)  # layers vs the model's depth
    judge = _load_judge(cfg, local_rank)
    gen = _generation_settings(cfg, benchmark, strategy)
    identity = _identity(cfg, benchmark, strategy, resolved, gen)
    settings = {
        "identity": identity,
        "run_id": run_id(identity),  # what each of its records carries
        "model": cfg.model,
        "dtype": cfg.dtype,
        "device": cfg.device_map and f"device_map={cfg.device_map}" or str(_resolve_device(cfg.device)),
        "strategy": strategy.name,
        "strategy_label": _strategy_label(cfg),
        "strategy_params": strategy.params,
        "scoring_protocol": identity["scoring_protocol"],
        "generation": gen if gen is None else {**gen, "batch_size": cfg.batch_size or benchmark.batch_size},
        "judge": identity["judge"],
        "data": resolved.as_dict(),
        "limit": cfg.limit,
        "shards": world,
    }

    # Everything is validated: from here on the folder is written.
    ids = [it["id"] for it in items]
    done = read_records(item_files(out))
    write_settings, vouched = _check_run_file(out, identity, replaceable=lock.alone and not done)
    _check_records_are_ours(out, identity, vouched)
    if write_settings:
        try:
            write_json_atomic(out / RUN_FILE, settings)
        except OSError as exc:
            kept = "the records already there are kept" if done else "nothing was recorded"
            raise write_error(out / RUN_FILE, exc, kept) from None
        trace.files.append(out / RUN_FILE)
    if not all(i in done for i in ids):
        # A summary from an earlier, smaller target must not describe this unfinished one.
        for name in (SUMMARY_JSON, SUMMARY_MD):
            (out / name).unlink(missing_ok=True)
    mine = items[rank::world]
    ctx = EvalContext(
        model,
        tokenizer,
        strategy,
        protocol=cfg.protocol or benchmark.default_protocol or "paper",
        floor=_floor(cfg),
        max_new_tokens=gen["max_new_tokens"] if gen else None,
        repetition_penalty=gen["repetition_penalty"] if gen else None,
        judge=judge,
    )
    size = (cfg.batch_size or benchmark.batch_size) if benchmark.task == "generate" else 1
    if not own_file.exists():
        trace.files.append(own_file)
    _run_shard(benchmark, ctx, mine, done, own_file, size, cfg.progress, rank, cfg.strategy, run_id(identity))

    # No barrier: whichever shard finds every item recorded writes the summary (atomically).
    return _finish(out, benchmark, ids, settings, cfg, vouched)


def _non_finite_error(strategy: str, benchmark: Benchmark, ids: list, detail: str) -> EvalError:
    which = f"item {ids[0]}" if len(ids) == 1 else "items " + ", ".join(map(str, ids))
    return EvalError(
        f"--strategy {strategy}: {which} ({benchmark.name}) got non-finite scores ({detail}); nothing "
        "was recorded for it and no summary is written. A NaN or infinite score cannot be ranked: "
        "check the strategy's --param values, or use --dtype float32/bfloat16 if float16 overflows."
    )


def _evaluate_checked(benchmark: Benchmark, ctx: EvalContext, batch: list[dict], strategy: str) -> list[dict]:
    """The batch's records, refused whole when any of them holds a NaN or infinite score."""
    try:
        records = benchmark.evaluate(ctx, batch)
    except NonFiniteScoreError as exc:  # raised inside generation, by batch row
        ids = [batch[row]["id"] for row in exc.rows if row < len(batch)] or [it["id"] for it in batch]
        raise _non_finite_error(strategy, benchmark, ids, exc.detail) from None
    bad = [(r["id"], found) for r in records if (found := non_finite_values(r))]
    if bad:
        raise _non_finite_error(strategy, benchmark, [i for i, _ in bad], ", ".join(bad[0][1][:3]))
    return records


def _run_shard(benchmark, ctx, mine, done, path, size, progress, rank, strategy="", rid=None) -> None:
    from tqdm.auto import tqdm

    todo = [b for b in _batches(mine, size) if not all(it["id"] in done for it in b)]
    n_done = len(mine) - sum(len(b) for b in todo)
    bar = tqdm(
        total=len(mine),
        initial=n_done,
        desc=f"{benchmark.name}" + (f" [shard {rank}]" if rank else ""),
        unit="item",
        disable=not progress,
        dynamic_ncols=True,
    )
    with RecordWriter(path) as writer:
        for batch in todo:
            start = time.perf_counter()
            below_floor = ctx.below_floor
            records = _evaluate_checked(benchmark, ctx, batch, strategy)
            seconds = (time.perf_counter() - start) / len(batch)
            below_floor = ctx.below_floor - below_floor
            for record in records:
                if record["id"] in done:
                    continue  # recorded before an interruption; the batch was recomputed whole
                if below_floor and len(records) == 1:  # scoring runs one item per batch
                    record["below_floor"] = below_floor
                record["seconds"] = seconds
                if rid is not None:  # which run wrote it, right after the item id
                    record = {"id": record["id"], RUN_ID_FIELD: rid, **record}
                try:
                    writer.write(record)
                except OSError as exc:
                    kept = sum(1 for it in mine if it["id"] in done)
                    raise write_error(
                        path, exc, f"the {kept} item(s) recorded before are kept, nothing else was written"
                    ) from None
                done[record["id"]] = record
                bar.update(1)
    bar.close()


def _finish(
    out: Path, benchmark: Benchmark, ids: list, settings: dict, cfg: RunConfig, vouched: dict | None = None
) -> RunResult:
    records = read_records(item_files(out))
    missing = [i for i in ids if i not in records]
    if missing:
        return RunResult(out, len(ids) - len(missing), len(ids), None)
    # Shards of other settings may have written beside this one meanwhile.
    _check_records_are_ours(out, settings["identity"], vouched or settings["identity"])
    for i in ids:  # records written before the harness checked scores can still hold a NaN
        found = non_finite_values(records[i])
        if found:
            for name in (SUMMARY_JSON, SUMMARY_MD):
                (out / name).unlink(missing_ok=True)
            files = ", ".join(p.name for p in item_files(out))
            raise EvalError(
                f"--out {out}: item {i} in {files} holds a non-finite value ({found[0]}), so no summary "
                "is written; delete that item's line to have it redone, or rerun into another --out."
            )
    summary = build_summary(benchmark, [records[i] for i in ids], settings, cfg.bootstrap, cfg.seed)
    try:
        write_summary(out, summary)
    except OSError as exc:
        raise write_error(out / SUMMARY_JSON, exc, f"all {len(ids)} items are recorded and kept") from None
    return RunResult(out, len(ids), len(ids), summary)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """A :class:`RunConfig` from a dict (unknown keys rejected)."""
    known = set(asdict(RunConfig(benchmark="", out="")))
    unknown = set(data) - known
    if unknown:
        raise EvalError(f"unknown run setting(s): {', '.join(sorted(unknown))}")
    return RunConfig(**data)
