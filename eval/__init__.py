"""The evaluation harness of contrastive-decoding (installed as ``contrastive_decoding.eval``).

Benchmarks (TruthfulQA MC in the DoLa and lm-eval protocols, TruthfulQA generation, FACTOR,
StrategyQA, GSM8K, HaluEval) run with any registered decoding strategy, resumably, with bootstrap
intervals; see ``eval/README.md`` and ``contrastive-decoding --help``.

Names are imported on first use (as in :mod:`contrastive_decoding`), so that the command line's
``--help`` and ``list`` answer without importing torch or transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from contrastive_decoding._lazy import lazy_exports

if TYPE_CHECKING:  # the same names for type checkers and the docs' static analysis (griffe)
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

_BENCH = "contrastive_decoding.eval.benchmarks"
_STRAT = "contrastive_decoding.eval.strategies"

# Public name -> the module that defines it (tests/eval/test_cli_startup.py checks that it, the
# imports above and __all__ name the same things).
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["BENCHMARKS", "Benchmark", "EvalContext", "Metric", "get_benchmark"], _BENCH),
    **dict.fromkeys(["DataError", "EvalError"], "contrastive_decoding.eval.errors"),
    **dict.fromkeys(["RunConfig", "RunResult", "run_eval"], "contrastive_decoding.eval.runner"),
    **dict.fromkeys(
        ["PRESETS", "STRATEGIES", "StrategyEntry", "StrategyRun", "build_strategy", "register"], _STRAT
    ),
}

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


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS, __all__)
