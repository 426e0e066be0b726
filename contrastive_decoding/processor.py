"""Layer-contrast strategies as `LogitsProcessor`s for stock ``model.generate``.

The processor's hooks record the premature layers' last-position states during each step's
forward; ``__call__`` turns them into early-exit logits with one head product for all layers and
lets the strategy contrast them with the incoming ``scores`` (the mature logits).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LogitsProcessor

from .capture import LayerCapture
from .readout import LayerReadout
from .strategies.base import LayerContrastStrategy

__all__ = ["LayerContrastLogitsProcessor"]


class LayerContrastLogitsProcessor(LogitsProcessor):
    """Apply a :class:`LayerContrastStrategy` inside stock ``model.generate``.

    Hooks are attached when the processor is built (after every argument is validated) and removed
    by :meth:`detach`, or on leaving a ``with`` block. The incoming ``scores`` are contrasted (so masks
    set by earlier processors hold); decisions of the strategy that depend on the model's own
    distribution (DoLa's premature-layer choice) use the model's raw logits, captured by a hook.
    Processors that should act on the contrasted scores (DoLa's repetition penalty) go after it:
    pass them in ``logits_processor=`` after this one rather than as ``repetition_penalty=``.

    Args:
        model: the causal LM whose layers are contrasted (the one that ``generate`` runs).
        strategy: the strategy, e.g. :class:`~contrastive_decoding.DoLa`.
    """

    supports_continuous_batching = False

    def __init__(self, model: nn.Module, strategy: LayerContrastStrategy) -> None:
        self.strategy = strategy
        self.readout = LayerReadout.from_model(model)
        self.layers = strategy.premature_layers(self.readout)
        self._chosen: list[torch.Tensor] = []
        self.capture = LayerCapture(self.readout, self.layers, positions="last", keep_logits=True).attach()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self.capture.attached:
            raise RuntimeError(
                f"{type(self).__name__} was detached; build a new one (or use it inside its `with` block)."
            )
        states = self.capture.stacked()
        if states.shape[1] != scores.shape[0]:
            raise RuntimeError(
                f"{type(self).__name__}: the last forward pass had {states.shape[1]} rows but "
                f"`scores` has {scores.shape[0]}; the processor must be used in `generate` of the "
                "model it was built for."
            )
        layer_logits = self.readout.early_exit_logits(states, final_norm=self.strategy.final_norm)
        raw = self.capture.logits
        raw = raw.to(scores.device) if raw is not None and raw.shape == scores.shape else None
        out = self.strategy.contrast(scores, layer_logits.to(scores.device), raw)
        if out.chosen is not None:
            self._chosen.append(torch.tensor(self.layers, device=out.chosen.device)[out.chosen])
        return out.scores.to(scores.dtype)

    @property
    def chosen_layers(self) -> torch.Tensor:
        """Premature layer used at each step for each row, ``(steps, rows)`` (since the last reset).

        Under beam search the rows are the beams alive at that step, not the final sequences.
        """
        if not self._chosen:
            return torch.empty(0, 0, dtype=torch.long)
        return torch.stack([c.cpu() for c in self._chosen])

    def reset(self) -> None:
        """Forget the layer history and captured states, e.g. between two ``generate`` calls."""
        self._chosen.clear()
        self.capture.clear()

    def detach(self) -> None:
        """Remove the hooks; the model is left exactly as it was before the processor was built."""
        self.capture.detach()

    def __enter__(self) -> LayerContrastLogitsProcessor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.detach()
