"""ACD: auto-contrastive decoding (Gera et al., ACL 2023; code IBM/auto-contrastive-generation).

The expert is the model's own (final) distribution ``p_u``, the amateur the early exit ``p_l`` of
ONE intermediate layer. Inside the plausible head set ``V_h`` of ``p_u`` (the adaptive plausibility
constraint, ``relative_top`` 0.1), the expert's total mass on ``V_h`` is redistributed by the
contrast; outside ``V_h`` the expert's probabilities are kept:

``p(v) = softmax_{V_h}(log p_u - log p_l)(v) * sum_{V_h} p_u``  for ``v`` in ``V_h``,
``p(v) = p_u(v)``  otherwise.

``p`` is a proper distribution (mass-preserving), and its log is the step score.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from contrastive_decoding.core.contract import (
    ContrastInputs,
    ContrastStrategy,
    ModelLayout,
    check_vocabulary,
)
from contrastive_decoding.core.plausibility import (
    check_min_tokens_to_keep,
    check_relative_top,
    plausible_mask,
)
from contrastive_decoding.core.registry import register_strategy
from contrastive_decoding.core.specs import check_layer_indices
from contrastive_decoding.core.validation import check_flag

__all__ = ["AutoContrastive", "acd_log_probs"]


def acd_log_probs(
    final_logits: torch.Tensor,
    amateur_logits: torch.Tensor,
    relative_top: float = 0.1,
    min_tokens_to_keep: int = 1,
) -> torch.Tensor:
    """``log p`` of ACD's mass-preserving contrast, float32, shaped like ``final_logits``.

    Args:
        final_logits: the expert's (model's own) logits, ``(..., V)``.
        amateur_logits: the amateur exit's logits, ``(..., V)``.
        relative_top: APC threshold on the expert's probabilities.
        min_tokens_to_keep: tokens always kept in the head set.
    """
    expert = F.log_softmax(final_logits.float(), dim=-1)
    amateur = F.log_softmax(amateur_logits.float(), dim=-1)
    head = plausible_mask(expert, relative_top, min_tokens_to_keep)
    # log of the expert's mass on V_h, and the log-softmax over V_h of the contrast.
    head_mass = torch.where(head, expert, -torch.inf).logsumexp(-1, keepdim=True)
    inside = F.log_softmax(torch.where(head, expert - amateur, -torch.inf), dim=-1) + head_mass
    return torch.where(head, inside, expert)


@register_strategy(
    "acd",
    description="ACD (Gera et al. 2023): mass-preserving contrast with one intermediate exit",
)
class AutoContrastive(ContrastStrategy):
    """ACD's expert/amateur layer contrast, as a strategy for processors, generate loops and scoring.

    Step scores are ``log p`` of the mass-preserving ACD distribution (see the module docstring),
    so greedy search, sampling and beam search act on a normalised distribution; tokens outside
    the head set keep the expert's log-probability (ACD filters nothing out).

    Scoring: both protocols give ``log p(target)``. ``p`` is already a distribution, so the
    ``"normalized"`` log-softmax leaves it unchanged, and no token is floored because ACD assigns
    the tokens outside ``V_h`` their expert probability instead of excluding them.

    Args:
        layer: the amateur exit: a layer index in ``0..N-1``, a fraction of depth in [0, 1]
            (``round(f * N)``, clamped to ``N - 1``), or ``None`` (default) for the middle layer
            ``N // 2`` (the ACD paper contrasts GPT-2 Medium's 24th layer with its 12th).
        relative_top: APC threshold in (0, 1] on the expert's probabilities (ACD: 0.1).
        final_norm: apply the final norm to the amateur exit before the head (default ``True``:
            the ACD code applies the model's final norm to intermediate states before its exit
            heads; here the model's own head stands in for an exit head trained for that layer).
        min_tokens_to_keep: tokens always kept in the head set.

    Example:
        >>> from contrastive_decoding.strategies.acd import AutoContrastive
        >>> AutoContrastive(layer=0.5).relative_top
        0.1
    """

    def __init__(
        self,
        layer: int | float | None = None,
        relative_top: float = 0.1,
        final_norm: bool = True,
        min_tokens_to_keep: int = 1,
    ) -> None:
        if layer is not None:
            if isinstance(layer, bool) or not isinstance(layer, (int, float)):
                raise ValueError(
                    f"`layer` must be None (the middle layer), a layer index or a fraction of depth in "
                    f"[0, 1], got {layer!r}."
                )
            if isinstance(layer, float) and not 0.0 <= layer <= 1.0:
                raise ValueError(f"`layer` as a fraction of depth must be in [0, 1], got {layer!r}.")
        self.layer = layer
        self.relative_top = check_relative_top(relative_top)
        self.final_norm = check_flag("final_norm", final_norm)
        self.min_tokens_to_keep = check_min_tokens_to_keep(min_tokens_to_keep)

    def premature_layers(self, readout: ModelLayout) -> list[int]:
        check_vocabulary(self, readout)
        n = readout.num_layers
        if self.layer is None:
            return [n // 2]
        if isinstance(self.layer, float):
            return [min(round(self.layer * n), n - 1)]
        return check_layer_indices([self.layer], n, argument="layer")

    def log_probs(self, final_logits: torch.Tensor, layer_logits: torch.Tensor) -> torch.Tensor:
        """``log p`` for ``(rows, V)`` mature logits and ``(1, rows, V)`` amateur logits."""
        return acd_log_probs(final_logits, layer_logits[0], self.relative_top, self.min_tokens_to_keep)

    def combine(self, inputs: ContrastInputs) -> torch.Tensor:
        # log p over the whole vocabulary: both scoring protocols give log p(target).
        return self.log_probs(inputs.final, inputs.layers)

    def plausible(self, inputs: ContrastInputs) -> None:
        return None  # the plausibility filter is inside log p (mass-preserving), not a mask on top
