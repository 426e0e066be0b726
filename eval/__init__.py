"""The evaluation harness of contrastive-decoding (installed as ``contrastive_decoding.eval``).

Benchmarks (TruthfulQA MC in the DoLa and lm-eval protocols, TruthfulQA generation, FACTOR,
StrategyQA, GSM8K, HaluEval) run with any registered decoding strategy, resumably, with bootstrap
intervals; see ``eval/README.md`` and ``contrastive-decoding --help``.
"""

from __future__ import annotations

from contrastive_decoding.eval.benchmarks import (
    BENCHMARKS,
    Benchmark,
    EvalContext,
    Metric,
    get_benchmark,
)
from contrastive_decoding.eval.errors import DataError, EvalError
from contrastive_decoding.eval.runner import RunConfig, RunResult, run_eval
from contrastive_decoding.eval.strategies import (
    PRESETS,
    STRATEGIES,
    StrategyEntry,
    StrategyRun,
    build_strategy,
    register,
)

__all__ = [
    "BENCHMARKS",
    "PRESETS",
    "STRATEGIES",
    "Benchmark",
    "DataError",
    "EvalContext",
    "EvalError",
    "Metric",
    "RunConfig",
    "RunResult",
    "StrategyEntry",
    "StrategyRun",
    "build_strategy",
    "get_benchmark",
    "register",
    "run_eval",
]
