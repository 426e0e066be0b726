"""Scoring protocols and floors: how contrasted scores of given targets are read.

``"paper"`` keeps each method's own scores; ``"normalized"`` log-softmaxes the contrast and gives
implausible tokens a floor (a fixed number, or a :class:`RelativeFloor` below each position's
lowest plausible score). Backend-free: tensors in, tensors out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "Floor",
    "RelativeFloor",
    "SCORING_PROTOCOLS",
    "ScoringProtocol",
    "floored",
    "protocol_token_scores",
]

ScoringProtocol = Literal["paper", "normalized"]
SCORING_PROTOCOLS = ("paper", "normalized")


@dataclass(frozen=True)
class RelativeFloor:
    """A floor for implausible tokens set per scored position: ``margin`` below the lowest score of
    that position's plausible tokens.

    DoLa's fixed floor (``-1000``) assumes plausible tokens score far above it. When early exits
    are huge (no final norm, a residual stream of 1e5), the normalized contrast of plausible tokens
    can itself sit near ``-3e4``: a fixed floor then ranks implausible tokens *above* plausible
    ones, and answers with more implausible tokens win. A relative floor cannot invert that order.
    Pass it wherever a ``floor`` is taken (``score_continuations(..., floor=RelativeFloor())``, the
    harness's ``--floor relative``).

    Args:
        margin: how far below the lowest plausible score implausible tokens go (finite, > 0).

    Example:
        >>> import torch
        >>> from contrastive_decoding import RelativeFloor
        >>> scores = torch.tensor([[-5.0e4, -4.0e4, 0.0]])
        >>> keep = torch.tensor([[True, True, False]])
        >>> RelativeFloor(1000.0).values(scores, keep)
        tensor([[-51000.]])
    """

    margin: float = 1000.0

    def __post_init__(self) -> None:
        margin = self.margin
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 < margin < float("inf"):
            raise ValueError(f"`margin` must be a finite number > 0 (e.g. 1000.0), got {margin!r}.")

    def values(self, scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The floor of each row, ``(P, 1)``: its lowest plausible score minus ``margin``."""
        lowest = torch.where(keep, scores, torch.inf).amin(-1, keepdim=True)
        return lowest - self.margin


Floor = float | RelativeFloor


def floored(scores: torch.Tensor, keep: torch.Tensor, floor: Floor) -> torch.Tensor:
    """``scores`` with the tokens outside ``keep`` set to ``floor`` (a number, or per row for a
    :class:`RelativeFloor`)."""
    value = floor.values(scores, keep) if isinstance(floor, RelativeFloor) else floor
    return torch.where(keep, scores, value)


def protocol_token_scores(
    contrast: torch.Tensor,
    plausible: Callable[[], torch.Tensor | None],
    targets: torch.Tensor,
    protocol: ScoringProtocol,
    floor: Floor,
) -> torch.Tensor:
    """The targets' scores under a scoring protocol, for strategies' ``score_tokens``.

    Args:
        contrast: the raw contrast at each scored position, ``(P, V)``.
        plausible: returns the plausible-token mask ``(P, V)`` (or ``None`` for no filter); called
            only for ``"normalized"``.
        targets: target ids, ``(P,)``.
        protocol: ``"paper"`` keeps the raw contrast; ``"normalized"`` log-softmaxes it and gives
            implausible tokens ``floor``.
        floor: the finite score of implausible tokens, or a :class:`RelativeFloor`.
    """
    if protocol not in SCORING_PROTOCOLS:
        raise ValueError(f"`protocol` must be one of {SCORING_PROTOCOLS}, got {protocol!r}.")
    if protocol == "normalized":
        contrast = F.log_softmax(contrast, dim=-1)
        keep = plausible()
        if keep is not None:
            contrast = floored(contrast, keep, floor)
    return contrast.gather(-1, targets[:, None]).squeeze(-1)
