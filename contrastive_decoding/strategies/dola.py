"""DoLa: Decoding by Contrasting Layers (Chuang et al., ICLR 2024, arXiv 2309.03883).

The next-token score is ``log q_N - log q_M`` on the plausible set of ``q_N``, where ``q_N`` is the
model's own distribution and ``q_M`` the early exit of a premature layer ``M``: fixed ("static"),
or chosen per row and step as the candidate layer whose distribution diverges most from ``q_N``
("dynamic"). Layer buckets, divergence and plausibility filter follow transformers 4.43-4.55's
built-in implementation, so greedy outputs match it token for token.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Literal

import torch
import torch.nn.functional as F

from contrastive_decoding.core.contract import (
    ContrastInputs,
    ContrastOutput,
    ContrastStrategy,
    ModelLayout,
    check_vocabulary,
)
from contrastive_decoding.core.divergence import (
    DIVERGENCES,
    divergence_and_log_probs,
    divergence_by_layer,
    layerwise_is_exact,
)
from contrastive_decoding.core.plausibility import (
    check_min_tokens_to_keep,
    check_relative_top,
)
from contrastive_decoding.core.registry import register_strategy
from contrastive_decoding.core.specs import check_layer_indices
from contrastive_decoding.core.validation import check_flag

__all__ = ["DoLa", "dola_candidate_layers", "LAYER_CHOICES"]

LAYER_CHOICES = ("per_row", "batch_mean")

DoLaLayers = Literal["low", "high"] | int | Sequence[int]


def dola_candidate_layers(dola_layers: DoLaLayers, num_layers: int, tied_embeddings: bool) -> list[int]:
    """Candidate premature layers, with transformers' ``dola_layers`` bucket rules.

    ``start`` is 0, or 2 with tied embeddings (an exit from tied embeddings is close to identity;
    1 for a 2-layer model). For ``N <= 40``: ``"low"`` is ``range(start, N // 2, 2)`` and ``"high"``
    ``range(N // 2, N, 2)``; for ``N > 40``: ``range(start, 20, 2)`` and ``range(N - 20, N, 2)``.
    An int or a list of ints is taken as given (``0 <= j < N``; 0 is the embedding output).

    Raises:
        ValueError: an unknown bucket name, an empty list, or a layer outside ``0..N-1``.
    """
    n = num_layers
    if isinstance(dola_layers, str):
        if dola_layers not in ("low", "high"):
            raise ValueError(
                f"`dola_layers` must be 'low', 'high', an int or a list of ints in 0..{n - 1}, "
                f"got {dola_layers!r}."
            )
        if not tied_embeddings:
            start = 0
        elif n > 2:
            start = 2
        elif n == 2:
            start = 1
        else:
            start = 0
        if dola_layers == "low":
            if start == n // 2:
                layers = [start]
            else:
                layers = list(range(start, n // 2, 2)) if n <= 40 else list(range(start, 20, 2))
        else:
            layers = list(range(n // 2, n, 2)) if n <= 40 else list(range(n - 20, n, 2))
        if not layers:
            raise ValueError(
                f"`dola_layers={dola_layers!r}` selects no layer for this {n}-layer model "
                f"(tied embeddings: {tied_embeddings}); pass explicit layer indices in 0..{n - 1}."
            )
        return layers
    layers = [dola_layers] if isinstance(dola_layers, int) else list(dola_layers)
    return check_layer_indices(layers, n, argument="dola_layers")


def _check_dola_layers(dola_layers: object) -> str | int | list[int]:
    """``dola_layers`` as ``"low"``/``"high"``, an int or a list of ints (ranges are checked
    against the model when the strategy meets it)."""
    accepted = (
        "`dola_layers` must be 'low', 'high', an int or a list of ints (layer indices; 0 is the "
        "embedding output)"
    )
    if isinstance(dola_layers, str):
        if dola_layers not in ("low", "high"):
            raise ValueError(f"{accepted}, got {dola_layers!r}.")
        return dola_layers
    if isinstance(dola_layers, numbers.Integral) and not isinstance(dola_layers, bool):
        return int(dola_layers)
    if isinstance(dola_layers, (bytes, Mapping, AbstractSet)) or not isinstance(dola_layers, Iterable):
        raise ValueError(f"{accepted}, got {dola_layers!r} ({type(dola_layers).__name__}).")
    layers = list(dola_layers)
    if not layers:
        raise ValueError("`dola_layers` is an empty list; give 'low', 'high' or layer indices.")
    if any(isinstance(x, bool) or not isinstance(x, numbers.Integral) for x in layers):
        raise ValueError(f"{accepted}, got {layers!r}.")
    return [int(x) for x in layers]


@register_strategy(
    "dola",
    presets={"dola-high": {"dola_layers": "high"}, "dola-low": {"dola_layers": "low"}},
    description="DoLa (Chuang et al. 2024): contrast the final layer with the most divergent early exit",
)
class DoLa(ContrastStrategy):
    """DoLa's layer contrast, as a strategy for processors, generate loops and scoring.

    Args:
        dola_layers: ``"high"`` (short factual answers), ``"low"`` (long reasoning), one layer index
            (static DoLa: no divergence, always that layer) or a list of candidate layers.
        relative_top: plausibility threshold in (0, 1]; tokens below ``relative_top`` times the top
            probability of the mature layer are excluded (``-inf``).
        final_norm: apply the final norm to early exits (DoLa's reference does not).
        layer_choice: ``"per_row"`` picks the premature layer for each batch row (correct batching);
            ``"batch_mean"`` picks one layer for the whole batch from the batch-mean divergence, as
            the reference code does.
        divergence: ``"reference"`` (the reference code's formula, default) or ``"jsd"`` (textbook
            Jensen-Shannon); see :mod:`contrastive_decoding.core.divergence`.
        min_tokens_to_keep: tokens always kept by the plausibility filter (an int >= 1, at most the
            model's vocabulary size, checked when the strategy meets the model).

    Every argument is validated here (layer ranges when the strategy meets a model); a bad value
    raises a ``ValueError`` naming it and the accepted values.

    Example:
        >>> from contrastive_decoding import DoLa
        >>> DoLa(dola_layers="high").relative_top
        0.1
    """

    def __init__(
        self,
        dola_layers: DoLaLayers = "high",
        relative_top: float = 0.1,
        final_norm: bool = False,
        layer_choice: Literal["per_row", "batch_mean"] = "per_row",
        divergence: Literal["reference", "jsd"] = "reference",
        min_tokens_to_keep: int = 1,
    ) -> None:
        self.dola_layers = _check_dola_layers(dola_layers)
        if layer_choice not in LAYER_CHOICES:
            raise ValueError(f"`layer_choice` must be one of {LAYER_CHOICES}, got {layer_choice!r}.")
        if divergence not in DIVERGENCES:
            raise ValueError(f"`divergence` must be one of {DIVERGENCES}, got {divergence!r}.")
        self.relative_top = check_relative_top(relative_top)
        # 0/1 were coerced with bool() before and stay valid; other values (e.g. "no") are refused.
        self.final_norm = check_flag("final_norm", final_norm, allow_int=True)
        self.layer_choice = layer_choice
        self.divergence = divergence
        self.min_tokens_to_keep = check_min_tokens_to_keep(min_tokens_to_keep)

    def premature_layers(self, readout: ModelLayout) -> list[int]:
        check_vocabulary(self, readout)
        return dola_candidate_layers(self.dola_layers, readout.num_layers, readout.tied_embeddings)

    def _choose(
        self, final_logits: torch.Tensor, layer_logits: torch.Tensor, final_lp: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: the index into the candidate list and the float32 log-softmax of the chosen
        premature logits, ``((rows,), (rows, V))``, given the final log-softmax ``final_lp``."""
        rows = final_logits.shape[0]
        if layer_logits.shape[0] == 1:
            index = torch.zeros(rows, dtype=torch.long, device=final_logits.device)
            return index, F.log_softmax(layer_logits[0].float(), dim=-1)
        by_layer = layerwise_is_exact(final_logits, layer_logits, self.divergence)
        if by_layer:  # the same numbers with a fraction of the memory (large vocabularies)
            div, _ = divergence_by_layer(final_logits, layer_logits, log_p=final_lp)
        else:
            kind = self.divergence
            div, _, layer_lp = divergence_and_log_probs(final_logits, layer_logits, kind, log_p=final_lp)
        index = div.mean(-1).argmax().expand(rows) if self.layer_choice == "batch_mean" else div.argmax(0)
        chosen = (index, torch.arange(rows, device=index.device))
        # The log-softmax of the chosen rows is bit-identical to the slice of the batched one.
        if by_layer:
            return index, F.log_softmax(layer_logits[chosen].float(), dim=-1)
        return index, layer_lp[chosen]

    def combine(self, inputs: ContrastInputs) -> ContrastOutput:
        # The default plausibility filter (relative_top of the final distribution) is DoLa's; it
        # reads the same final log-softmax, computed once per step.
        final_lp = inputs.final_log_probs
        index, base_lp = self._choose(inputs.final, inputs.layers, final_lp)
        return ContrastOutput(final_lp - base_lp, index)
