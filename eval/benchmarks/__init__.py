"""The benchmark registry: ``BENCHMARKS[name]`` -> :class:`Benchmark`.

To add a benchmark, write a module here that builds a :class:`Benchmark` (data source, file
reader, evaluate function, metrics) and add it to the tuple below; see ``eval/README.md``.
"""

from __future__ import annotations

from contrastive_decoding.eval.benchmarks.base import Benchmark, EvalContext, Metric
from contrastive_decoding.eval.benchmarks.factor import FACTOR_EXPERT, FACTOR_NEWS
from contrastive_decoding.eval.benchmarks.gsm8k import GSM8K
from contrastive_decoding.eval.benchmarks.halueval import HALUEVAL, HALUEVAL_NOKNOWLEDGE
from contrastive_decoding.eval.benchmarks.strategyqa import STRATEGYQA
from contrastive_decoding.eval.benchmarks.truthfulqa_gen import TFQA_GEN, TFQA_GEN_LMEVAL
from contrastive_decoding.eval.benchmarks.truthfulqa_mc import TFQA_DOLA, TFQA_HF

__all__ = ["BENCHMARKS", "Benchmark", "EvalContext", "Metric", "get_benchmark"]

BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        TFQA_DOLA,
        TFQA_HF,
        TFQA_GEN,
        TFQA_GEN_LMEVAL,
        FACTOR_NEWS,
        FACTOR_EXPERT,
        STRATEGYQA,
        GSM8K,
        HALUEVAL,
        HALUEVAL_NOKNOWLEDGE,
    )
}


def get_benchmark(name: str) -> Benchmark:
    """The named benchmark.

    Raises:
        EvalError: an unknown name (the message lists the valid ones).
    """
    from contrastive_decoding.eval.errors import EvalError

    if name not in BENCHMARKS:
        raise EvalError(f"--benchmark {name!r} is unknown; valid: {', '.join(BENCHMARKS)}.")
    return BENCHMARKS[name]
