"""VISTA's self-logits augmentation (Li et al. 2025; code LzVv123456/VISTA).

The next-token logits are an interpolation, not a contrast: the mean of the early-exit logits of a
band of late layers is mixed into the model's own logits,
``logits = weight_late * mean_j(l_j) + (1 - weight_late) * l_N`` (VISTA: weight 0.3, layers 25-30 of
32, early exits with the raw head, no final norm). No plausibility filter is applied.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from contrastive_decoding.core.contract import (
    ContrastInputs,
    ContrastOutput,
    ContrastStrategy,
    ModelLayout,
)
from contrastive_decoding.core.protocols import Floor, ScoringProtocol, protocol_token_scores
from contrastive_decoding.core.registry import register_strategy
from contrastive_decoding.core.specs import resolve_layers
from contrastive_decoding.core.validation import check_flag, check_number

__all__ = ["VistaLogits", "VISTA_LATE_LAYERS"]

#: VISTA's late band, layers 25-30 of a 32-layer model, as fractions of depth.
VISTA_LATE_LAYERS = (25 / 32, 30 / 32)

LayerBand = Sequence[int] | tuple[float, float]


def _check_band(late_layers: LayerBand) -> list:
    if isinstance(late_layers, (str, bytes)) or not isinstance(late_layers, Sequence):
        raise ValueError(
            "`late_layers` must be a list of layer indices or a (start, end) pair of fractions of "
            f"depth such as {VISTA_LATE_LAYERS}, got {late_layers!r}."
        )
    items = list(late_layers)
    if not items:
        raise ValueError("`late_layers` is empty; give layer indices or a (start, end) pair of fractions.")
    # Fractions are checked here (no model needed); indices are checked against the model later.
    if any(isinstance(x, float) for x in items):
        ok = len(items) == 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in items)
        if not ok or not 0.0 <= items[0] <= items[1] <= 1.0:
            raise ValueError(
                f"`late_layers`={tuple(items)} as fractions of depth must be a (start, end) pair with "
                f"0 <= start <= end <= 1, e.g. {VISTA_LATE_LAYERS}; or give integer layer indices."
            )
    return items


@register_strategy(
    "vista",
    description="VISTA self-logits augmentation (Li et al. 2025): mix late-layer exits into the logits",
)
class VistaLogits(ContrastStrategy):
    """VISTA's self-logits augmentation, as a strategy for processors, generate loops and scoring.

    Step scores are the mixed logits ``weight_late * mean_j(l_j) + (1 - weight_late) * l_N`` in
    float32, where ``l_N`` is the model's own logits and ``l_j`` the early exits of ``late_layers``.
    There is no plausibility filter and no layer choice (``chosen`` is ``None``).

    Scoring: the mixed logits define a distribution, so both protocols give the same value,
    ``log_softmax(mixed)[target]``: ``"paper"`` uses this log-probability as the raw score, and
    ``"normalized"`` (log-softmax, then the plausibility floor) leaves it unchanged because a
    log-softmax is idempotent and VISTA has no plausibility set (no token is floored).

    Args:
        weight_late: weight of the late layers' mean logits, in [0, 1] (VISTA: 0.3; 0 is the
            model's own logits).
        late_layers: layer indices (``0..N-1``) or a ``(start, end)`` pair of fractions of depth
            (both ends included); default ``(25/32, 30/32)``, VISTA's layers 25-30 of 32.
        final_norm: apply the final norm to early exits (VISTA's code does not; default ``False``).

    Example:
        >>> from contrastive_decoding.strategies.vista import VistaLogits
        >>> VistaLogits().weight_late
        0.3
    """

    relative_top = None  # no plausibility mask on the decoding scores

    def __init__(
        self,
        weight_late: float = 0.3,
        late_layers: LayerBand = VISTA_LATE_LAYERS,
        final_norm: bool = False,
    ) -> None:
        self.weight_late = check_number(
            "weight_late",
            weight_late,
            0.0,
            1.0,
            hint="the weight of the late layers' mean logits; VISTA uses 0.3",
        )
        self.late_layers = _check_band(late_layers)
        self.final_norm = check_flag("final_norm", final_norm)

    def premature_layers(self, readout: ModelLayout) -> list[int]:
        return resolve_layers(self.late_layers, readout.num_layers, argument="late_layers")

    def mix(self, final_logits: torch.Tensor, layer_logits: torch.Tensor) -> torch.Tensor:
        """The mixed logits, ``(rows, V)`` float32, from ``(rows, V)`` and ``(J, rows, V)`` inputs."""
        late = layer_logits.float().mean(0)
        return self.weight_late * late + (1.0 - self.weight_late) * final_logits.float()

    def combine(self, inputs: ContrastInputs) -> torch.Tensor:
        return self.mix(inputs.final, inputs.layers)

    def score(
        self,
        inputs: ContrastInputs,
        targets: torch.Tensor,
        protocol: ScoringProtocol = "paper",
        floor: Floor = -1000.0,
    ) -> ContrastOutput:
        final_logits, layer_logits = inputs.final, inputs.layers
        log_probs = F.log_softmax(self.mix(final_logits, layer_logits), dim=-1)
        # No plausibility set: both protocols give log_softmax(mixed) at the target.
        scores = protocol_token_scores(log_probs, lambda: None, targets, protocol, floor)
        return ContrastOutput(scores, None)
