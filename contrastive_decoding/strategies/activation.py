"""Activation decoding (Chen et al. 2024, "In-Context Sharpness as Alerts"; code
hkust-nlp/Activation_Decoding).

At an "info" layer (26 of 32), the early exit ``A[t, v]`` is read at every context position ``t``.
A token whose logit is concentrated on a few positions (low entropy ``E(v)`` of ``softmax_t A[t, v]``)
is one the context is sharply about; the score favours it:
``log q_N(v) - alpha * E(v)`` (``alpha`` 0.5) on the plausible set of ``q_N`` (``relative_top`` 0.1).
Early exits use the raw head, as in the authors' code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from contrastive_decoding.core.contract import ContrastInputs, ContrastStrategy, ModelLayout
from contrastive_decoding.core.plausibility import check_min_tokens_to_keep, check_relative_top
from contrastive_decoding.core.registry import register_strategy
from contrastive_decoding.core.specs import ENTROPY_CONTEXTS, EntropyContext, EntropySource
from contrastive_decoding.core.validation import check_flag, check_number

__all__ = ["ActivationDecoding", "INFO_LAYER"]

#: The paper's info layer, 26 of 32, as a fraction of depth.
INFO_LAYER = 26 / 32


@register_strategy(
    "activation",
    description="activation decoding (Chen et al. 2024): favour tokens the context is sharp about",
)
class ActivationDecoding(ContrastStrategy):
    """Favour tokens the context is sharp about: ``log q_N(v) - alpha * E(v)``.

    ``E(v)`` is the entropy (nats) over the context positions of the info layer's early-exit logit
    of ``v``, a softmax along positions. With ``context="prompt"`` (the authors' generation code) the
    context is the prompt, read once; ``"all"`` also reads each generated token as it comes (in
    scoring: the prompt and the continuation tokens before the scored one). The authors' MC scoring
    instead reads the whole question-and-answer text for every answer token; scoring here stays
    causal so that a continuation is scored as generation would see it.

    Args:
        info_layer: the state entering block ``info_layer`` (``0..N-1``), or a fraction of depth in
            ``(0, 1)``; default ``26/32`` of the depth (the paper's layer 26 of 32).
        alpha: weight of the entropy, a finite number >= 0 (0.5 in the paper; 0 is the model itself on
            the plausible set).
        context: ``"prompt"`` or ``"all"`` (see above). Beam search needs ``"prompt"``.
        relative_top: plausibility threshold on ``q_N`` (``None``: no filter).
        min_tokens_to_keep: tokens the plausibility filter always keeps.
        final_norm: apply the final norm to the early exits (the authors' code does not).

    Example:
        >>> from types import SimpleNamespace
        >>> from contrastive_decoding import ActivationDecoding
        >>> ActivationDecoding().entropy_source(SimpleNamespace(num_layers=32)).layer
        26
    """

    def __init__(
        self,
        info_layer: int | float | None = None,
        alpha: float = 0.5,
        context: EntropyContext = "prompt",
        relative_top: float | None = 0.1,
        min_tokens_to_keep: int = 1,
        final_norm: bool = False,
    ) -> None:
        bad_type = isinstance(info_layer, bool) or not isinstance(info_layer, (int, float))
        if info_layer is not None and bad_type:
            raise ValueError(
                "`info_layer` must be a layer index 0..N-1 or a fraction of depth in (0, 1), "
                f"got {info_layer!r}."
            )
        if isinstance(info_layer, float) and not 0.0 < info_layer < 1.0:
            raise ValueError(
                f"`info_layer`={info_layer!r} as a fraction of depth must be in (0, 1) (the paper's 26/32 = "
                f"{INFO_LAYER}); give an int for a layer index."
            )
        alpha = check_number("alpha", alpha, 0.0, hint="the weight of the entropy; the paper uses 0.5")
        if context not in ENTROPY_CONTEXTS:
            raise ValueError(f"`context` must be one of {ENTROPY_CONTEXTS}, got {context!r}.")
        self.info_layer = info_layer
        self.alpha = alpha
        self.context = context
        self.relative_top = None if relative_top is None else check_relative_top(relative_top)
        self.min_tokens_to_keep = check_min_tokens_to_keep(min_tokens_to_keep)
        self.final_norm = check_flag("final_norm", final_norm)

    def entropy_source(self, readout: ModelLayout) -> EntropySource:
        n = readout.num_layers
        if self.info_layer is None or isinstance(self.info_layer, float):
            fraction = INFO_LAYER if self.info_layer is None else self.info_layer
            layer = min(int(round(fraction * n)), n - 1)
        elif not 0 <= self.info_layer < n:
            raise ValueError(
                f"`info_layer`={self.info_layer} is outside the model's layers 0..{n - 1} "
                f"({n} blocks); give an index in range or a fraction of depth."
            )
        else:
            layer = int(self.info_layer)
        return EntropySource(layer, self.context, self.final_norm)

    def combine(self, inputs: ContrastInputs) -> torch.Tensor:
        return F.log_softmax(inputs.final, dim=-1) - self.alpha * inputs.context_entropy
