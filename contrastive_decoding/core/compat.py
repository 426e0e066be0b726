"""The pre-0.2 twin base classes, kept as thin adapters onto the one contract.

Code written against them (``contrast``/``score_tokens`` taking tensors) keeps working; new
strategies subclass :class:`~contrastive_decoding.ContrastStrategy` and implement ``combine`` (or
``step``/``score``) on :class:`~contrastive_decoding.ContrastInputs`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from contrastive_decoding.core.contract import ContrastInputs, ContrastOutput, ContrastStrategy
from contrastive_decoding.core.protocols import Floor, ScoringProtocol

__all__ = ["LayerContrastStrategy", "StreamContrastStrategy"]


class _TensorContrast(ContrastStrategy, ABC):
    """``step``/``score`` delegate to ``contrast``/``score_tokens`` on one input tensor."""

    _reads = "layers"

    def step(self, inputs: ContrastInputs) -> ContrastOutput:
        return self.contrast(inputs.final, getattr(inputs, self._reads))

    def score(
        self,
        inputs: ContrastInputs,
        targets: torch.Tensor,
        protocol: ScoringProtocol = "paper",
        floor: Floor = -1000.0,
    ) -> ContrastOutput:
        return self.score_tokens(inputs.final, getattr(inputs, self._reads), targets, protocol, floor)

    @abstractmethod
    def contrast(self, final_logits: torch.Tensor, other_logits: torch.Tensor) -> ContrastOutput:
        """Contrasted next-token scores ``(B, V)`` from the final logits and the early exits
        ``(J, B, V)`` (or the degraded streams' logits ``(S, B, V)``)."""

    @abstractmethod
    def score_tokens(
        self,
        final_logits: torch.Tensor,
        other_logits: torch.Tensor,
        targets: torch.Tensor,
        protocol: ScoringProtocol,
        floor: Floor,
    ) -> ContrastOutput:
        """Contrasted scores ``(P,)`` of the targets at the scored positions."""


class LayerContrastStrategy(_TensorContrast):
    """A strategy of early exits only, written as ``contrast(final, layers)`` and
    ``score_tokens(final, layers, targets, protocol, floor)``; implement ``premature_layers`` too."""

    _reads = "layers"


class StreamContrastStrategy(_TensorContrast):
    """A strategy of degraded streams only, written as ``contrast(final, streams)`` and
    ``score_tokens(final, streams, targets, protocol, floor)``; implement ``degraded_streams`` too."""

    _reads = "streams"
