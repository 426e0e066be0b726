"""What a benchmark is to the harness: data source, item loader, evaluation of a batch, metrics."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from contrastive_decoding.eval.data import DataSource
from contrastive_decoding.eval.prompts import few_shot_prompt

if TYPE_CHECKING:  # torch and transformers load with the first evaluation, not with the definitions
    from contrastive_decoding.eval.generation import Generated
    from contrastive_decoding.eval.strategies import StrategyRun

    from contrastive_decoding import ContinuationScore, PromptCache

__all__ = ["Benchmark", "EvalContext", "Metric", "layer_histogram"]


@dataclass(frozen=True)
class Metric:
    """A per-item metric; summaries report its mean times ``scale`` with a bootstrap interval.

    Attributes:
        name: the key in each record's ``metrics``.
        scale: 100 for fractions reported in percent; 1 for scores already on a 0-100 scale.
        description: one line for the README and listings.
    """

    name: str
    scale: float = 100.0
    description: str = ""


@dataclass
class EvalContext:
    """Everything a benchmark needs to evaluate items.

    Attributes:
        model: the causal LM.
        tokenizer: its tokenizer.
        strategy: the decoding strategy.
        protocol: the scoring convention passed to ``score_continuations`` (``"paper"`` or
            ``"normalized"``; ignored by the plain model).
        max_new_tokens: generation budget (the benchmark's default unless overridden).
        repetition_penalty: generation repetition penalty (``None``: the strategy's default).
        judge: an optional judge (TruthfulQA generation).
        floor: score of implausible tokens under ``"normalized"`` (a number, or a
            :class:`~contrastive_decoding.RelativeFloor`).
        below_floor: plausible tokens scored below a fixed floor so far (see
            :attr:`~contrastive_decoding.ContinuationScore.below_floor`); the runner records each
            item's count.
    """

    model: Any
    tokenizer: Any
    strategy: StrategyRun
    protocol: str = "paper"
    max_new_tokens: int | None = None
    repetition_penalty: float | None = None
    judge: Any | None = None
    floor: Any = -1000.0
    prompt_caches: dict[str, PromptCache] = field(default_factory=dict)
    below_floor: int = 0

    def score(
        self, prompt: str, continuations: Sequence[str], primer: str | None = None
    ) -> list[ContinuationScore]:
        """All continuations of one prompt in one batched ``score_continuations`` call.

        ``primer``: the few-shot text every prompt of the benchmark starts with; its KV cache is
        computed once per run (see :class:`~contrastive_decoding.PromptCache`).
        """
        from contrastive_decoding import score_continuations

        scores = score_continuations(
            self.model,
            self.tokenizer,
            self._refocused(prompt),
            list(continuations),
            strategy=self.strategy.scoring,
            protocol=self.protocol,
            floor=self.floor,
            prompt_cache=self._prompt_cache(primer),
        )
        self.below_floor += sum(s.below_floor for s in scores)
        return scores

    def _prompt_cache(self, primer: str | None) -> PromptCache | None:
        if primer is None:
            return None
        if primer not in self.prompt_caches:
            from contrastive_decoding import PromptCache

            self.prompt_caches[primer] = PromptCache(primer)
        return self.prompt_caches[primer]

    def _refocused(self, prompt: str) -> str:
        # Strategies with an instruction for the original stream only (LOL's refocus) put it first.
        refocus = getattr(self.strategy.scoring, "refocus_prompt", None)
        return prompt if refocus is None else refocus(prompt)

    def generate(
        self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str], primer: str | None = None
    ) -> list[Generated]:
        """Greedy continuations of a batch of prompts (left-padded).

        ``primer``: the few-shot text every prompt starts with; its KV cache is computed once per
        run and each batch decodes from it (see :func:`~contrastive_decoding.eval.generation.generate_batch`).
        """
        from contrastive_decoding.eval.generation import generate_batch

        return generate_batch(
            self.model,
            self.tokenizer,
            [self._refocused(p) for p in prompts],
            self.strategy,
            self.max_new_tokens or max_new_tokens,
            stop,
            self.repetition_penalty,
            self._prompt_cache(primer),
        )


def layer_histogram(scores: Iterable[ContinuationScore]) -> dict[int, int] | None:
    """Premature layer -> scored tokens that used it, over all continuations (``None`` without a
    strategy)."""
    counts: Counter[int] = Counter()
    any_layers = False
    for s in scores:
        if s.premature_layers is not None:
            any_layers = True
            counts.update(int(x) for x in s.premature_layers)
    return dict(sorted(counts.items())) if any_layers else None


def evaluate_few_shot_cot(
    ctx: EvalContext,
    items: list[dict],
    demo: str,
    stop: Sequence[str],
    extract: Callable[[str], Any],
    max_new_tokens: int = 256,
) -> list[dict]:
    """Greedy chain-of-thought answers to few-shot prompts, scored by exact match of the extracted
    answer with ``item["gold"]`` (an answer that cannot be extracted counts as wrong)."""
    prompts = [few_shot_prompt(demo, it["question"]) for it in items]
    outputs = ctx.generate(prompts, max_new_tokens, stop, primer=demo)
    records = []
    for item, gen in zip(items, outputs, strict=True):
        completion = gen.text.strip()
        pred = extract(completion)
        records.append(
            {
                "id": item["id"],
                "metrics": {"acc": float(pred is not None and pred == item["gold"])},
                "completion": completion,
                "pred": pred,
                "gold": item["gold"],
                "n_tokens": gen.n_tokens,
                "premature_layers": gen.layer_counts,
            }
        )
    return records


@dataclass(frozen=True)
class Benchmark:
    """A benchmark definition.

    Attributes:
        name: what ``--benchmark`` takes.
        description: one line.
        task: ``"score"`` (multiple choice by continuation scores) or ``"generate"``.
        source: where the data comes from.
        read_file: local file -> items (each with a stable ``"id"``).
        from_hub: Hub rows -> items (``None`` when the Hub copy is a raw file read by
            ``read_file``).
        evaluate: ``evaluate(ctx, items) -> records`` (one per item, same order; each with
            ``"metrics"`` and ``"premature_layers"``).
        metrics: the metrics every record carries.
        prompt: how the prompt is built, with the source of its exemplars.
        default_protocol: default scoring convention (``"paper"`` or ``"normalized"``) for
            ``"score"`` benchmarks; ``None`` for generation.
        batch_size: default items per batch (generation batches prompts; scoring runs one
            question's answers per call).
        max_new_tokens: default generation budget.
        stop: generation stop strings.
        optional_metrics: metrics present only with an option (e.g. a judge).
    """

    name: str
    description: str
    task: Literal["score", "generate"]
    source: DataSource
    read_file: Callable[[Path], list[dict]]
    from_hub: Callable[[list[Mapping[str, Any]]], list[dict]] | None
    evaluate: Callable[[EvalContext, list[dict]], list[dict]]
    metrics: tuple[Metric, ...]
    prompt: str
    default_protocol: str | None = "paper"
    batch_size: int = 1
    max_new_tokens: int | None = None
    stop: tuple[str, ...] = ()
    optional_metrics: tuple[Metric, ...] = field(default_factory=tuple)

    def all_metrics(self) -> tuple[Metric, ...]:
        return self.metrics + self.optional_metrics
