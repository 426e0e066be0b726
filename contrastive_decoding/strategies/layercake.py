"""LayerCake: token-aware contrastive decoding within the layer stack (Zhu et al., arXiv 2507.04404).

Punctuation tokens (and BOS) draw most attention in early layers, conceptual tokens (nouns, verbs,
adjectives, numbers) govern intermediate layers. A degraded stream is the same model with attention
to those tokens suppressed at those depths; the score is ``(1 + beta) * log p_orig - log p_mod`` on
the plausible set of ``p_orig``. Details follow the first author's development code as described
in ``specs/methods.md`` §2 (not verified against the paper): hard suppression of the targeted key
columns on the query rows that predict new tokens, concept layers 4-20 and punctuation layers 1-5
of 32 (scaled to the model's depth), ``beta`` 0 for TruthfulQA and 1 for GSM8K.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from contrastive_decoding.core.contract import ContrastInputs, ContrastStrategy, ModelLayout
from contrastive_decoding.core.plausibility import check_min_tokens_to_keep, check_relative_top
from contrastive_decoding.core.registry import register_strategy
from contrastive_decoding.core.specs import (
    QUERY_ROWS,
    SUPPRESSION_MODES,
    LayerSpec,
    SuppressionRule,
    resolve_layers,
)
from contrastive_decoding.core.validation import check_number

__all__ = ["LayerCake", "AMATEURS"]

#: ``"combined"``: one stream, punctuation suppressed early AND concepts in the middle;
#: ``"punctuation"`` / ``"concept"``: one stream with one suppression; ``"average"``: two streams
#: (punctuation-early, concept-middle) whose contrasts are averaged.
AMATEURS = ("combined", "punctuation", "concept", "average")

#: Depth ranges of the development code for 32-layer models, as fractions (inclusive).
PUNCTUATION_LAYERS = (1 / 32, 5 / 32)
CONCEPT_LAYERS = (4 / 32, 20 / 32)


def _check_layer_spec(spec: Any, argument: str) -> LayerSpec:
    items = list(spec) if isinstance(spec, (list, tuple, range)) else None
    if items and all(isinstance(x, int) and not isinstance(x, bool) for x in items):
        return items
    if items is not None and len(items) == 2 and all(isinstance(x, (int, float)) for x in items):
        lo, hi = float(items[0]), float(items[1])
        if 0.0 <= lo <= hi <= 1.0:
            return (lo, hi)
    raise ValueError(
        f"`{argument}` must be a list of layer indices or a (start, end) pair of fractions of depth in "
        f"[0, 1] (e.g. {PUNCTUATION_LAYERS if 'punct' in argument else CONCEPT_LAYERS}), got {spec!r}."
    )


@register_strategy(
    "layercake",
    description="LayerCake (Zhu et al. 2025): contrast against attention-suppressed streams",
)
class LayerCake(ContrastStrategy):
    """LayerCake's contrast of the intact model against attention-suppressed copies of itself.

    Args:
        amateur: which degraded stream(s): ``"combined"`` (default), ``"punctuation"``,
            ``"concept"`` or ``"average"`` (two streams, contrasts averaged); see :data:`AMATEURS`.
        punctuation_layers: layers where attention to punctuation (and BOS, newlines) is suppressed:
            a ``(start, end)`` pair of fractions of depth (default 1/32 to 5/32) or explicit indices.
        concept_layers: layers where attention to concept tokens is suppressed (default 4/32 to
            20/32, or explicit indices).
        beta: weight of the intact stream: ``(1 + beta) * log p_orig - log p_mod``, a finite number
            > -1 (0 for TruthfulQA, 1 for GSM8K in the development code).
        relative_top: plausibility threshold on ``p_orig`` (``None`` turns the filter off).
        concept_gate: suppress concepts only on query rows whose head-averaged attention mass on
            them exceeds this, in [0, 1) (0.05 in the development code); needs eager attention.
            ``None``: always.
        mode: ``"mask"`` removes suppressed keys; ``"bias"`` adds ``bias`` to their scores.
        bias: additive pre-softmax bias for ``mode="bias"``, a finite number < 0.
        query_rows: ``"generated"`` (rows predicting new tokens, default) or ``"all"``.
        min_tokens_to_keep: tokens always kept by the plausibility filter (an int >= 1, at most the
            model's vocabulary size, checked when the strategy meets the model).

    Every argument is validated here; a bad value raises a ``ValueError`` naming it.

    Example:
        >>> from contrastive_decoding import LayerCake
        >>> LayerCake(amateur="average", beta=1.0).amateur
        'average'
    """

    def __init__(
        self,
        amateur: Literal["combined", "punctuation", "concept", "average"] = "combined",
        punctuation_layers: LayerSpec = PUNCTUATION_LAYERS,
        concept_layers: LayerSpec = CONCEPT_LAYERS,
        beta: float = 0.0,
        relative_top: float | None = 0.1,
        concept_gate: float | None = None,
        mode: Literal["mask", "bias"] = "mask",
        bias: float = -100.0,
        query_rows: Literal["generated", "all"] = "generated",
        min_tokens_to_keep: int = 1,
    ) -> None:
        if amateur not in AMATEURS:
            raise ValueError(f"`amateur` must be one of {AMATEURS}, got {amateur!r}.")
        if mode not in SUPPRESSION_MODES:
            raise ValueError(f"`mode` must be one of {SUPPRESSION_MODES}, got {mode!r}.")
        if query_rows not in QUERY_ROWS:
            raise ValueError(f"`query_rows` must be one of {QUERY_ROWS}, got {query_rows!r}.")
        self.amateur = amateur
        self.punctuation_layers = _check_layer_spec(punctuation_layers, "punctuation_layers")
        self.concept_layers = _check_layer_spec(concept_layers, "concept_layers")
        # beta > -1 keeps the intact stream's weight 1 + beta positive (the development code uses 0
        # and 1); a NaN beta used to turn every score into NaN and decode token 0 at every step.
        self.beta = check_number("beta", beta, -1.0, low_open=True, hint="0 for TruthfulQA, 1 for GSM8K")
        self.relative_top = None if relative_top is None else check_relative_top(relative_top)
        # Named here as the caller knows it; SuppressionRule would call it `gate` when streams are built.
        self.concept_gate = check_number(
            "concept_gate",
            concept_gate,
            0.0,
            1.0,
            high_open=True,
            allow_none=True,
            hint="an attention mass; 0.05 in the development code",
        )
        self.mode = mode
        # Checked here too (AttentionSuppression checks it only when streams are built) so that
        # the strategy itself is refused, wherever it is used.
        self.bias = check_number(
            "bias", bias, high=0.0, high_open=True, hint="the pre-softmax bias of mode='bias'; e.g. -100"
        )
        self.query_rows = query_rows
        self.min_tokens_to_keep = check_min_tokens_to_keep(min_tokens_to_keep)

    def degraded_streams(self, readout: ModelLayout) -> list[list[SuppressionRule]]:
        n = readout.num_layers
        punct = SuppressionRule(
            "punctuation", resolve_layers(self.punctuation_layers, n, "punctuation_layers")
        )
        concept = SuppressionRule(
            "concept", resolve_layers(self.concept_layers, n, "concept_layers"), gate=self.concept_gate
        )
        return {
            "combined": [[punct, concept]],
            "punctuation": [[punct]],
            "concept": [[concept]],
            "average": [[punct], [concept]],
        }[self.amateur]

    def combine(self, inputs: ContrastInputs) -> torch.Tensor:
        # The plausible set is the default one: relative_top of the intact stream's distribution.
        final_lp = inputs.final_log_probs
        amateur_lp = F.log_softmax(inputs.streams.float(), dim=-1).mean(0)
        return (1.0 + self.beta) * final_lp - amateur_lp
