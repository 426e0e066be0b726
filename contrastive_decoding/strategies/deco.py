"""DeCo: dynamic correction decoding (Wang et al. 2024, arXiv 2410.11779; code zjunlp/Deco).

The model's own logits are corrected with the early exit of ONE late layer, chosen per row and
step as the layer most confident about any of the model's own candidate tokens:

1. candidates ``C``: the ``top_k`` (20) most probable tokens of ``q_N = softmax(l_N)``, truncated at
   cumulative probability ``top_p`` (0.9), keeping the token that crosses the threshold (at least
   one token is always kept);
2. ``(j*, c*) = argmax_{j, c in C} q_j(c)`` over the late layers ``j`` (default 20-28 of 32), with
   ``q_j`` the softmax of the early exit of layer ``j`` taken WITH the final norm;
3. ``logits = l_N + alpha * q_{j*}(c*) * l_{j*}`` on ``C``; tokens outside ``C`` get ``-inf``.

Details the spec (§4, DeCo bullet) leaves open follow ``deco_greedy_search`` in the authors'
``transformers/generation/utils.py``: the top-p cut is ``searchsorted(cumsum, top_p) + 1`` capped at
``top_k`` (the crossing token is kept); the argmax runs over the flattened ``(layers, candidates)``
grid in layer-major order, so ties go to the lowest layer, then the most probable candidate; the
mask is built from the model's own probabilities before any other logits processor. Defaults come
from the authors' README: ``alpha=0.6`` (its usage example; the argument table shows 0.5) and
``early_exit_layers=range(20, 29)``, i.e. layers 20-28 of 32 (DoLa-style indices: the output of
block ``j``, ``j=0`` the embeddings). Unlike the authors' code (one sequence at a time), the layer
choice is made per row, and the maths runs in float32.
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
from contrastive_decoding.core.protocols import Floor, ScoringProtocol, floored, protocol_token_scores
from contrastive_decoding.core.registry import register_strategy
from contrastive_decoding.core.specs import resolve_layers
from contrastive_decoding.core.validation import check_flag, check_int, check_number

__all__ = ["DeCo", "DECO_LATE_LAYERS", "deco_logits"]

#: DeCo's candidate layers, 20-28 of a 32-layer model (``range(20, 29)``), as fractions of depth.
DECO_LATE_LAYERS = (20 / 32, 28 / 32)

LayerBand = Sequence[int] | tuple[float, float]


def deco_logits(
    final_logits: torch.Tensor,
    layer_logits: torch.Tensor,
    alpha: float = 0.6,
    top_k: int = 20,
    top_p: float = 0.9,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DeCo's corrected logits (unmasked), the candidate mask and the chosen layer, float32.

    Args:
        final_logits: the model's own logits, ``(rows, V)``.
        layer_logits: early exits of the candidate layers, ``(J, rows, V)``.
        alpha: correction strength.
        top_k: candidates taken from the top of ``q_N`` (capped at ``V``).
        top_p: cumulative-probability cut of the candidates.

    Returns:
        ``(logits, candidates, chosen)``: ``l_N + alpha * q_{j*}(c*) * l_{j*}`` for every token
        ``(rows, V)``; the boolean candidate set ``C`` ``(rows, V)``; the index of ``j*`` in the
        layer list ``(rows,)``.
    """
    final = final_logits.float()
    layers = layer_logits.float()
    num_layers, rows, vocab = layers.shape
    k = min(top_k, vocab)
    top_probs, top_ids = torch.softmax(final, dim=-1).topk(k, dim=-1)  # (rows, k), descending
    # searchsorted(cumsum, top_p) counts the prefix still below top_p; +1 keeps the crossing token.
    n_keep = ((top_probs.cumsum(-1) < top_p).sum(-1) + 1).clamp(max=k)
    keep = torch.arange(k, device=final.device) < n_keep[:, None]  # (rows, k)
    candidates = torch.zeros_like(final, dtype=torch.bool).scatter(-1, top_ids, keep)
    # q_j(c) for every layer and candidate; dropped candidates can never win (probabilities >= 0).
    layer_probs = torch.softmax(layers, dim=-1)
    cand_probs = layer_probs.gather(-1, top_ids.expand(num_layers, rows, k))
    cand_probs = torch.where(keep, cand_probs, -1.0)
    # Layer-major flattening, as the authors' argmax over their [layers, candidates] grid.
    confidence, flat = cand_probs.permute(1, 0, 2).reshape(rows, num_layers * k).max(-1)
    chosen = torch.div(flat, k, rounding_mode="floor")
    picked = layers[chosen, torch.arange(rows, device=final.device)]  # (rows, V)
    logits = final + alpha * confidence[:, None] * picked
    return logits, candidates, chosen


def _check_band(layers: LayerBand) -> list:
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise ValueError(
            "`layers` must be a list of layer indices or a (start, end) pair of fractions of depth "
            f"such as {DECO_LATE_LAYERS}, got {layers!r}."
        )
    items = list(layers)
    if not items:
        raise ValueError("`layers` is empty; give layer indices or a (start, end) pair of fractions.")
    if any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in items):
        raise ValueError(f"`layers` must hold ints (indices) or two floats (fractions), got {layers!r}.")
    if any(isinstance(x, float) for x in items):
        if len(items) != 2 or not 0.0 <= items[0] <= items[1] <= 1.0:
            raise ValueError(
                f"`layers`={tuple(items)} as fractions of depth must be a (start, end) pair with "
                f"0 <= start <= end <= 1, e.g. {DECO_LATE_LAYERS}; or give integer layer indices."
            )
    return items


@register_strategy(
    "deco",
    description="DeCo (Wang et al. 2024): add the most confident late-layer exit to the final logits",
)
class DeCo(ContrastStrategy):
    """DeCo's dynamic correction, as a strategy for processors, generate loops and scoring.

    Step scores are ``l_N + alpha * q_{j*}(c*) * l_{j*}`` on the candidate set ``C`` and ``-inf``
    elsewhere (see the module docstring); ``chosen`` is the position of ``j*`` in
    :meth:`premature_layers`, per row.

    Scoring: ``"paper"`` gives ``log_softmax`` of the DeCo logits over ``C`` (the distribution DeCo
    samples from) at the target, and ``floor`` for a target outside ``C`` (its log-probability
    would be ``-inf``; the finite floor keeps summed scores finite, as the spec's §0 does for the
    plausibility constraint). ``"normalized"`` is :func:`protocol_token_scores` on the unmasked
    DeCo logits with ``C`` as the plausible set: ``log_softmax`` over the whole vocabulary, then
    ``floor`` outside ``C``; it differs from ``"paper"`` by ``log`` of the mass the corrected
    logits put on ``C``.

    Args:
        alpha: correction strength, a number >= 0 (authors' example 0.6, argument table 0.5).
        top_k: number of candidates taken from the model's own distribution, an int >= 1 (20).
        top_p: cumulative-probability cut of the candidates, in (0, 1] (0.9).
        layers: the late layers searched for ``j*``: layer indices (``0..N-1``) or a ``(start, end)``
            pair of fractions of depth (both ends included); default ``(20/32, 28/32)``, DeCo's
            layers 20-28 of 32.
        final_norm: apply the final norm to early exits (default ``True``, as DeCo's code does).

    Example:
        >>> from contrastive_decoding.strategies.deco import DeCo
        >>> deco = DeCo()
        >>> deco.alpha, deco.top_k, deco.top_p, deco.final_norm
        (0.6, 20, 0.9, True)
    """

    def __init__(
        self,
        alpha: float = 0.6,
        top_k: int = 20,
        top_p: float = 0.9,
        layers: LayerBand = DECO_LATE_LAYERS,
        final_norm: bool = True,
    ) -> None:
        self.alpha = check_number("alpha", alpha, 0.0, hint="the correction strength; DeCo uses 0.5-0.6")
        self.top_k = check_int("top_k", top_k, 1, hint="DeCo uses 20")
        self.top_p = check_number("top_p", top_p, 0.0, 1.0, low_open=True, hint="DeCo uses 0.9")
        self.final_norm = check_flag("final_norm", final_norm)
        self.layers = _check_band(layers)

    def premature_layers(self, readout: ModelLayout) -> list[int]:
        return resolve_layers(self.layers, readout.num_layers, argument="layers")

    def correct(
        self, final_logits: torch.Tensor, layer_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unmasked corrected logits, candidate mask and chosen layer; see :func:`deco_logits`."""
        return deco_logits(final_logits, layer_logits, self.alpha, self.top_k, self.top_p)

    def step(self, inputs: ContrastInputs) -> ContrastOutput:
        final_logits, layer_logits = inputs.final, inputs.layers
        logits, candidates, chosen = self.correct(final_logits, layer_logits)
        return ContrastOutput(torch.where(candidates, logits, -torch.inf), chosen)

    def score(
        self,
        inputs: ContrastInputs,
        targets: torch.Tensor,
        protocol: ScoringProtocol = "paper",
        floor: Floor = -1000.0,
    ) -> ContrastOutput:
        final_logits, layer_logits = inputs.final, inputs.layers
        logits, candidates, chosen = self.correct(final_logits, layer_logits)
        if protocol == "paper":
            # The distribution DeCo decodes from: log_softmax over C, the floor outside it.
            log_p = F.log_softmax(torch.where(candidates, logits, -torch.inf), dim=-1)
            scores = floored(log_p, candidates, floor).gather(-1, targets[:, None]).squeeze(-1)
            return ContrastOutput(scores, chosen)
        scores = protocol_token_scores(logits, lambda: candidates, targets, protocol, floor)
        return ContrastOutput(scores, chosen)
