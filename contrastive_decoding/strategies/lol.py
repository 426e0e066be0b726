"""LOL-style multi-layer fusion ("Lower Layer(s) Matter", Chen et al., arXiv 2408.08769; no code).

The original stream is contrasted with an amateur at the final layer AND at a lower layer, and the
two contrasts are fused:
``F = [log p_o^N - log p_a^N] + weight * [log p_o^L - log p_a^L]`` on the plausible set of
``p_o^N``, where ``p^L`` is the early exit at layer ``L`` (raw head, no final norm, unless
``final_norm``). The amateur is a degraded copy of the model (LayerCake's attention suppression), the
model behind an "untruthful" instruction (as in ICD), or a second model. The truthfulness refocus
is an instruction read by the original stream only: prompts start with it
(:meth:`LowerLayerFusion.refocus_prompt`) and the amateur reads its own instruction in its place.
The paper's lower layer, weights and instruction placement are not public (``specs/methods.md``
§3); the defaults here (``lower_layer`` at half depth, ``weight`` 0.5) are this library's.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from contrastive_decoding.core.contract import ContrastInputs, ContrastStrategy, ModelLayout, check_vocabulary
from contrastive_decoding.core.plausibility import check_min_tokens_to_keep, check_relative_top
from contrastive_decoding.core.registry import register_strategy
from contrastive_decoding.core.specs import Amateur, SuppressionRule, check_text
from contrastive_decoding.core.validation import check_flag, check_number, check_usable_model
from contrastive_decoding.strategies.icd import UNTRUTHFUL_INSTRUCTION
from contrastive_decoding.strategies.layercake import LayerCake

__all__ = ["LowerLayerFusion", "TRUTHFUL_INSTRUCTION"]

#: The default truthfulness refocus for the original stream.
TRUTHFUL_INSTRUCTION = "Answer truthfully and factually; if you are not sure, say so.\n"


def _resolve_depth(spec: int | float, num_layers: int, argument: str) -> int:
    if isinstance(spec, float):
        return min(num_layers - 1, max(0, round(spec * num_layers)))
    if not 0 <= spec < num_layers:
        raise ValueError(f"`{argument}`={spec} is outside 0..{num_layers - 1} for this model.")
    return spec


def _check_suppression(suppression: object) -> None:
    """``suppression`` holds LayerCake keyword arguments only (a clear error instead of a TypeError
    from ``LayerCake(**suppression)``)."""
    if suppression is None:
        return
    if not isinstance(suppression, Mapping):
        raise ValueError(
            "`suppression` must be a dict of LayerCake arguments (e.g. {'amateur': 'concept', 'beta': 1.0}) "
            f"or None, got {type(suppression).__name__}."
        )
    known = set(inspect.signature(LayerCake.__init__).parameters) - {"self"}
    unknown = sorted(map(str, set(suppression) - known))
    if unknown:
        raise ValueError(
            f"`suppression` has unknown LayerCake argument(s) {unknown}; valid keys: {sorted(known)}."
        )


@register_strategy(
    "lol",
    presets={"lol-prompt": {"amateur": "prompt"}},
    description="LOL-style fusion (Chen et al. 2024): final- and lower-layer contrasts with an amateur",
)
class LowerLayerFusion(ContrastStrategy):
    """Fuse original-vs-amateur contrasts taken at the final layer and at a lower layer (LOL).

    Args:
        amateur: ``"suppression"`` (a degraded copy of the model in the same batch; LayerCake's
            suppression rules, set with ``suppression=``), ``"prompt"`` (the model behind
            ``amateur_instruction``), or a second model (``nn.Module``, same tokenizer).
        lower_layer: the lower layer ``L``: an index or a fraction of depth (default 0.5).
        weight: the weight of the lower-layer contrast (``lambda``), a finite number >= 0.
        refocus: an instruction for the original stream only (e.g. :data:`TRUTHFUL_INSTRUCTION`);
            prompts must start with it (:meth:`refocus_prompt`). Needs a prompt or model amateur.
        amateur_instruction: the amateur's instruction for ``amateur="prompt"``.
        suppression: a dict of :class:`~contrastive_decoding.LayerCake` arguments for the degraded
            stream (default: its ``"combined"`` amateur); unknown keys are refused.
        final_norm: apply the final norm to the lower-layer early exits.
        relative_top: plausibility threshold on ``p_o^N`` (``None`` turns the filter off).
        min_tokens_to_keep: tokens always kept by the plausibility filter (an int >= 1, at most the
            model's vocabulary size).

    Example:
        >>> from contrastive_decoding import LowerLayerFusion
        >>> lol = LowerLayerFusion(amateur="prompt", refocus="Be truthful.\\n")
        >>> lol.refocus_prompt("Q: Who wrote Hamlet?\\nA:")
        'Be truthful.\\nQ: Who wrote Hamlet?\\nA:'
    """

    def __init__(
        self,
        amateur: str | nn.Module = "suppression",
        lower_layer: int | float = 0.5,
        weight: float = 0.5,
        refocus: str | None = None,
        amateur_instruction: str = UNTRUTHFUL_INSTRUCTION,
        suppression: dict[str, Any] | None = None,
        final_norm: bool = False,
        relative_top: float | None = 0.1,
        min_tokens_to_keep: int = 1,
    ) -> None:
        if not (amateur in ("suppression", "prompt") or isinstance(amateur, nn.Module)):
            raise ValueError(
                f"`amateur` must be 'suppression', 'prompt' or a second model (nn.Module), got {amateur!r}."
            )
        if isinstance(lower_layer, bool) or not isinstance(lower_layer, (int, float)):
            raise ValueError(
                f"`lower_layer` must be a layer index or a fraction of depth, got {lower_layer!r}."
            )
        if isinstance(lower_layer, float) and not 0.0 <= lower_layer < 1.0:
            raise ValueError(f"`lower_layer` as a fraction of depth must be in [0, 1), got {lower_layer!r}.")
        weight = check_number("weight", weight, 0.0, hint="lambda, the weight of the lower-layer contrast")
        if refocus is not None and (not isinstance(refocus, str) or not refocus):
            raise ValueError(f"`refocus` must be a non-empty instruction string or None, got {refocus!r}.")
        if refocus is not None and amateur == "suppression":
            raise ValueError(
                "`refocus` needs an amateur that reads its own prompt (`amateur='prompt'` or a second "
                "model); a suppressed copy of the model would read the refocus instruction too."
            )
        if amateur == "prompt" and amateur_instruction is None and refocus is None:
            raise ValueError(
                "`amateur_instruction` is None and there is no `refocus`: the prompt amateur would equal "
                "the model itself; give the amateur's instruction."
            )
        if amateur == "prompt":
            check_text(amateur_instruction, "amateur_instruction")
        if suppression is not None and amateur != "suppression":
            raise ValueError("`suppression` only applies to `amateur='suppression'`.")
        _check_suppression(suppression)
        if isinstance(amateur, nn.Module):
            check_usable_model(amateur, "amateur")
        self.amateur = amateur
        self.suppression = suppression
        self.lower_layer = lower_layer
        self.weight = float(weight)
        self.refocus = refocus
        self.amateur_instruction = amateur_instruction
        # 0/1 were coerced with bool() before and stay valid; other values (e.g. "no") are refused.
        self.final_norm = check_flag("final_norm", final_norm, allow_int=True)
        self.relative_top = None if relative_top is None else check_relative_top(relative_top)
        self.min_tokens_to_keep = check_min_tokens_to_keep(min_tokens_to_keep)
        self._cake = LayerCake(**(suppression or {})) if amateur == "suppression" else None
        if self._cake is not None:
            self.mode, self.bias, self.query_rows = self._cake.mode, self._cake.bias, self._cake.query_rows
        self._amateur = None
        names = dict(prefix_argument="amateur_instruction", replace_argument="refocus")
        if amateur == "prompt":
            self._amateur = Amateur(prefix=amateur_instruction, replace=refocus, **names)
        elif isinstance(amateur, nn.Module):
            self._amateur = Amateur(model=amateur, replace=refocus, **names)

    def refocus_prompt(self, prompt: str) -> str:
        """``prompt`` with the refocus instruction in front (unchanged without one)."""
        return prompt if self.refocus is None else self.refocus + prompt

    def premature_layers(self, readout: ModelLayout) -> list[int]:
        check_vocabulary(self, readout)
        return [_resolve_depth(self.lower_layer, readout.num_layers, "lower_layer")]

    def degraded_streams(self, readout: ModelLayout) -> list[list[SuppressionRule]]:
        return [] if self._cake is None else self._cake.degraded_streams(readout)

    def amateur_stream(self) -> Amateur | None:
        return self._amateur

    def amateur_layers(self, readout: ModelLayout) -> list[int]:
        return self.premature_layers(readout)

    def combine(self, inputs: ContrastInputs) -> torch.Tensor:
        if self._cake is not None:
            amateur_final, amateur_lower = inputs.streams[0], inputs.stream_layers[0, 0]
        else:
            amateur_final, amateur_lower = inputs.amateur, inputs.amateur_layers[0]
        final = F.log_softmax(inputs.final, -1) - F.log_softmax(amateur_final, -1)
        lower = F.log_softmax(inputs.layers[0], -1) - F.log_softmax(amateur_lower, -1)
        return final + self.weight * lower
