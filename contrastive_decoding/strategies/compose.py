"""Composition: several strategies at once, their scores summed with weights.

Every part runs on the same forward passes: the layers all parts need are captured once, the
degraded streams of all parts run as row groups of one batch, and one amateur may be shared. Each
part scores with its own rule (including its own plausibility filter) and the results are added:
``sum_k w_k * score_k``. In generation a token that any part with a positive weight rules out keeps
``-inf``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from contrastive_decoding.core.contract import ContrastInputs, ContrastOutput, ContrastStrategy, ModelLayout
from contrastive_decoding.core.protocols import Floor, ScoringProtocol, floored
from contrastive_decoding.core.specs import SuppressionRule
from contrastive_decoding.core.validation import check_number

__all__ = ["SCALES", "WeightedContrast"]

SCALES = ("raw", "log_softmax", "standardize")


class WeightedContrast(ContrastStrategy):
    """A weighted sum of strategies' scores, in generation and in scoring.

    Parts' raw scores can live on very different scales: DoLa's contrast of uncalibrated early exits
    runs to about 1e4 per token on small models, ICD's to below 1, so
    ``WeightedContrast([(1, DoLa("high")), (0.5, InducedContrast())])`` with raw scores decodes
    exactly DoLa's tokens. Two options put the parts on one scale first, each applied to a part's
    decoding scores (its own plausibility filter applied) before weighting:

    * ``scale="log_softmax"``: log-softmaxed over the vocabulary. This fixes each part's offset, not
      its spread: a part whose raw scores differ by thousands between tokens stays one-hot, so on
      SmolLM2 the mix above still decodes DoLa's tokens;
    * ``scale="standardize"``: over each row's tokens the part keeps, minus their mean and divided
      by their standard deviation (a part that keeps one token gives it 0), so every part spreads
      its tokens alike and the weights decide.

    In scoring a part then gives a target its rescaled score, or ``floor`` where the part rules the
    target out, under either protocol.

    Args:
        parts: ``(weight, strategy)`` pairs, or strategies (weight 1). Weights must be positive
            finite numbers.
        scale: ``"raw"`` (default: each part's own scores), ``"log_softmax"`` or ``"standardize"``.

    Example:
        >>> from contrastive_decoding import DoLa, InducedContrast, VistaLogits, WeightedContrast
        >>> both = WeightedContrast([(1.0, DoLa("high")), (0.5, VistaLogits())])
        >>> [w for w, _ in both.parts]
        [1.0, 0.5]
        >>> WeightedContrast([(1.0, DoLa("high")), (0.5, InducedContrast())], scale="log_softmax").scale
        'log_softmax'
    """

    def __init__(
        self,
        parts: Sequence[tuple[float, ContrastStrategy] | ContrastStrategy],
        scale: Literal["raw", "log_softmax", "standardize"] = "raw",
    ) -> None:
        if scale not in SCALES:
            raise ValueError(f"`scale` must be one of {SCALES}, got {scale!r}.")
        self.scale = scale
        if isinstance(parts, ContrastStrategy) or not isinstance(parts, Sequence) or not parts:
            raise ValueError("`parts` must be a non-empty list of strategies or (weight, strategy) pairs.")
        checked = []
        for i, part in enumerate(parts):
            if isinstance(part, ContrastStrategy):
                part = (1.0, part)
            if isinstance(part, (str, bytes)) or not isinstance(part, Sequence) or len(part) != 2:
                raise ValueError(
                    f"`parts[{i}]` must be a strategy or a (weight, strategy) pair, got {part!r}."
                )
            weight, strategy = part
            if not isinstance(strategy, ContrastStrategy):
                raise ValueError(f"`parts[{i}]` must hold a ContrastStrategy, got {type(strategy).__name__}.")
            # Finite as well as positive: an infinite weight turns the -inf of ruled-out tokens into
            # NaN once the parts' scores are added.
            hint = "the part's weight; weights must be positive"
            checked.append((check_number(f"parts[{i}]", weight, 0.0, low_open=True, hint=hint), strategy))
        amateurs = {id(s.amateur_stream()) for _, s in checked if s.amateur_stream() is not None}
        if len(amateurs) > 1:
            raise ValueError(
                "Several parts declare an amateur; a composition runs at most one amateur stream. Give "
                "the parts the same Amateur object."
            )
        suppression = {(s.mode, s.bias, s.query_rows) for _, s in checked if _has_streams(s)}
        if len(suppression) > 1:
            raise ValueError(
                "The parts' degraded streams use different suppression settings (mode, bias, query_rows); "
                "a composition runs all its streams with one setting."
            )
        self.parts = checked
        self.relative_top = None  # each part filters with its own rule
        if suppression:
            self.mode, self.bias, self.query_rows = suppression.pop()
        self._plans: dict[int, tuple] = {}

    def __repr__(self) -> str:
        scale = "" if self.scale == "raw" else f", scale={self.scale!r}"
        return "WeightedContrast([" + ", ".join(f"({w}, {s!r})" for w, s in self.parts) + f"]{scale})"

    def _plan(self, readout: ModelLayout) -> tuple:
        """The union of the parts' layers and streams, and where each part's own sit in it."""
        key = id(getattr(readout, "model", readout))
        if key not in self._plans:
            spec = self.amateur_stream()
            amateur_readout = None if spec is None else readout.layout_of(spec.model)
            amateur_union = [] if spec is None else self.amateur_layers(amateur_readout)
            layers: list[int] = []
            streams: list[list[SuppressionRule]] = []
            parts = []
            for _, strategy in self.parts:
                own = strategy.premature_layers(readout)
                layers = list(dict.fromkeys(layers + list(own)))
                own_streams = strategy.degraded_streams(readout)
                stream_index = list(range(len(streams), len(streams) + len(own_streams)))
                streams += own_streams
                own_amateur = (
                    [] if strategy.amateur_stream() is None else strategy.amateur_layers(amateur_readout)
                )
                parts.append((own, stream_index, own_amateur))
            index = [
                ([layers.index(j) for j in own], stream_index, [amateur_union.index(j) for j in own_amateur])
                for own, stream_index, own_amateur in parts
            ]
            self._plans[key] = (layers, streams, index)
        return self._plans[key]

    def premature_layers(self, readout: ModelLayout) -> list[int]:
        return self._plan(readout)[0]

    def degraded_streams(self, readout: ModelLayout) -> list[list[SuppressionRule]]:
        return self._plan(readout)[1]

    def amateur_stream(self):
        return next((s.amateur_stream() for _, s in self.parts if s.amateur_stream() is not None), None)

    def amateur_layers(self, readout: ModelLayout) -> list[int]:
        own = (s.amateur_layers(readout) for _, s in self.parts if s.amateur_stream() is not None)
        return list(dict.fromkeys(layer for layers in own for layer in layers))

    def entropy_source(self, readout: ModelLayout):
        sources = {s.entropy_source(readout) for _, s in self.parts} - {None}
        if len(sources) > 1:
            raise ValueError(
                f"The parts read context entropies from different sources ({sorted(map(repr, sources))}); "
                "a composition keeps one: give them the same info layer, context and final_norm."
            )
        return next(iter(sources), None)

    def _views(self, inputs: ContrastInputs) -> list[ContrastInputs]:
        readout = inputs._readout
        if readout is None:
            index = [([], [], []) for _ in self.parts]
        else:
            index = self._plan(readout)[2]
        return [
            inputs.view(*where, strategy.final_norm)
            for (_, strategy), where in zip(self.parts, index, strict=True)
        ]

    def _step_scores(self, strategy: ContrastStrategy, view: ContrastInputs) -> torch.Tensor:
        scores = strategy.step(view).scores
        if self.scale == "log_softmax":
            return F.log_softmax(scores, dim=-1)
        if self.scale == "standardize":
            return _standardized(scores)
        return scores

    def step(self, inputs: ContrastInputs) -> ContrastOutput:
        total = None
        for (weight, strategy), view in zip(self.parts, self._views(inputs), strict=True):
            scores = weight * self._step_scores(strategy, view)
            total = scores if total is None else total + scores
        return ContrastOutput(total)

    def score(
        self,
        inputs: ContrastInputs,
        targets: torch.Tensor,
        protocol: ScoringProtocol = "paper",
        floor: Floor = -1000.0,
    ) -> ContrastOutput:
        total = None
        for (weight, strategy), view in zip(self.parts, self._views(inputs), strict=True):
            if self.scale != "raw":
                rescaled = self._step_scores(strategy, view)
                kept = rescaled > -torch.inf
                part = floored(rescaled, kept, floor).gather(-1, targets[:, None]).squeeze(-1)
            else:
                part = strategy.score(view, targets, protocol, floor).scores
            scores = weight * part
            total = scores if total is None else total + scores
        return ContrastOutput(total)


def _standardized(scores: torch.Tensor) -> torch.Tensor:
    """Each row's finite scores as z-scores over those entries; ``-inf`` stays ``-inf``."""
    kept = scores > -torch.inf
    count = kept.sum(-1, keepdim=True).clamp(min=1)
    values = torch.where(kept, scores, 0.0)
    mean = values.sum(-1, keepdim=True) / count
    spread = (torch.where(kept, scores - mean, 0.0).square().sum(-1, keepdim=True) / count).sqrt()
    # One kept token (or all equal): no spread to divide by; it gets 0.
    z = (values - mean) / torch.where(spread > 0, spread, 1.0)
    return torch.where(kept, z, -torch.inf)


def _has_streams(strategy: ContrastStrategy) -> bool:
    # Whether a part declares streams cannot be known without a model; suppression settings are only
    # compared for parts that override `degraded_streams`.
    return type(strategy).degraded_streams is not ContrastStrategy.degraded_streams
