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
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .benchmarks import Benchmark, EvalContext, get_benchmark
from .data import ResolvedData, load_hub_rows, resolve_data
from .errors import DataError, EvalError
from .records import RecordWriter, item_files, read_records, repair_tail
from .strategies import StrategyRun, build_strategy, check_strategy
from .summary import SUMMARY_JSON, SUMMARY_MD, build_summary, write_json_atomic, write_summary

__all__ = ["RunConfig", "RunResult", "load_items", "run_eval"]

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
    if cfg.bootstrap < 100:
        raise EvalError(f"--bootstrap must be at least 100 resamples, got {cfg.bootstrap}.")


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


def _scoring_label(cfg: RunConfig, benchmark: Benchmark, strategy: StrategyRun) -> str | None:
    if benchmark.task != "score":
        return None
    if strategy.scoring is None:
        return "loglik"  # the plain model: --protocol has no effect
    return cfg.protocol or benchmark.default_protocol


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


def _check_run_file(out: Path, identity: dict) -> None:
    path = out / RUN_FILE
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            previous = json.load(f).get("identity", {})
        diffs = [k for k in identity if previous.get(k) != json.loads(json.dumps(identity[k]))]
        if diffs:
            k = diffs[0]
            raise EvalError(
                f"--out {out}: holds a run with other settings ({k}: {previous.get(k)!r} there, "
                f"{identity[k]!r} now); use another --out folder or delete that one."
            )


def _load_model(cfg: RunConfig, local_rank: int | None):
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
            f"--model {cfg.model}: cannot load it ({first[:300]}); pass 'smollm2', a Hub id, a model "
            "folder or a .gguf file."
        ) from None


def _load_judge(cfg: RunConfig, local_rank: int | None):
    if not cfg.judge:
        return None
    from .judge import Judge

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
        EvalError: bad settings, data or model (one line naming the argument and the fix).
    """
    benchmark = get_benchmark(cfg.benchmark)
    _check_config(cfg, benchmark)
    base_name, params = check_strategy(cfg.strategy, cfg.params)  # fail before loading anything
    resolved = resolve_data(benchmark.source, benchmark.name, cfg.data, cfg.data_dir)
    items = load_items(benchmark, resolved)
    if cfg.limit is not None:
        items = items[: cfg.limit]
    if not items:
        raise DataError(f"benchmark {benchmark.name}: the data has no items.")
    rank, world, local_rank = _rank_and_world(cfg)
    out = Path(cfg.out)

    if model is None:
        model, tokenizer = _load_model(cfg, local_rank)
    elif tokenizer is None:
        raise ValueError("`tokenizer` is required when `model` is given")
    strategy = build_strategy(model, base_name, params, tokenizer=tokenizer)
    gen = _generation_settings(cfg, benchmark, strategy)
    identity = _identity(cfg, benchmark, strategy, resolved, gen)
    out.mkdir(parents=True, exist_ok=True)
    _check_run_file(out, identity)
    settings = {
        "identity": identity,
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
    if not (out / RUN_FILE).is_file():
        write_json_atomic(out / RUN_FILE, settings)

    ids = [it["id"] for it in items]
    own_file = _items_file(out, rank, world)
    repair_tail(own_file)  # a kill mid-write leaves a cut last line in this shard's own file
    done = read_records(item_files(out))
    if not all(i in done for i in ids):
        # A summary from an earlier, smaller target must not describe this unfinished one.
        for name in (SUMMARY_JSON, SUMMARY_MD):
            (out / name).unlink(missing_ok=True)
    mine = items[rank::world]
    judge = _load_judge(cfg, local_rank)
    ctx = EvalContext(
        model,
        tokenizer,
        strategy,
        protocol=identity["scoring_protocol"]
        if identity["scoring_protocol"] in SCORING_PROTOCOLS
        else "paper",
        max_new_tokens=gen["max_new_tokens"] if gen else None,
        repetition_penalty=gen["repetition_penalty"] if gen else None,
        judge=judge,
    )
    size = (cfg.batch_size or benchmark.batch_size) if benchmark.task == "generate" else 1
    _run_shard(benchmark, ctx, mine, done, own_file, size, cfg.progress, rank)

    # No barrier: whichever shard finds every item recorded writes the summary (atomically).
    return _finish(out, benchmark, ids, settings, cfg)


def _run_shard(benchmark, ctx, mine, done, path, size, progress, rank) -> None:
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
            records = benchmark.evaluate(ctx, batch)
            seconds = (time.perf_counter() - start) / len(batch)
            for record in records:
                if record["id"] in done:
                    continue  # recorded before an interruption; the batch was recomputed whole
                record["seconds"] = seconds
                writer.write(record)
                done[record["id"]] = record
                bar.update(1)
    bar.close()


def _finish(out: Path, benchmark: Benchmark, ids: list, settings: dict, cfg: RunConfig) -> RunResult:
    records = read_records(item_files(out))
    missing = [i for i in ids if i not in records]
    if missing:
        return RunResult(out, len(ids) - len(missing), len(ids), None)
    summary = build_summary(benchmark, [records[i] for i in ids], settings, cfg.bootstrap, cfg.seed)
    write_summary(out, summary)
    return RunResult(out, len(ids), len(ids), summary)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """A :class:`RunConfig` from a dict (unknown keys rejected)."""
    known = set(asdict(RunConfig(benchmark="", out="")))
    unknown = set(data) - known
    if unknown:
        raise EvalError(f"unknown run setting(s): {', '.join(sorted(unknown))}")
    return RunConfig(**data)
