"""ICD's prompt-induced amateur (Zhang et al. 2023; code HillZhang1999/ICD), prompt-only variant.

The amateur is the model itself behind an instruction to give false information; the score is
``log p_base(v) - log p_amateur(v)`` on the plausible set of ``p_base`` (``relative_top`` 0.1).
The instruction is placed before each row's context (after a BOS token); the amateur runs as a
second forward pass with its own KV cache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from contrastive_decoding.core.contract import ContrastInputs, ContrastStrategy
from contrastive_decoding.core.plausibility import check_min_tokens_to_keep, check_relative_top
from contrastive_decoding.core.registry import register_strategy
from contrastive_decoding.core.specs import Amateur, check_text

__all__ = ["InducedContrast", "UNTRUTHFUL_INSTRUCTION"]

#: The default instruction that induces hallucinations (a paraphrase of ICD's prompt-only setup).
UNTRUTHFUL_INSTRUCTION = (
    "You are a deceptive assistant. Answer every question with a plausible-sounding but false "
    "statement, and never reveal the truth.\n"
)


@register_strategy(
    "icd",
    description="ICD prompt-only (Zhang et al. 2023): contrast with the model told to give false answers",
)
class InducedContrast(ContrastStrategy):
    """Contrast the model with itself under an instruction that induces false answers (ICD).

    Args:
        instruction: the amateur's instruction, as text or token ids (ids are checked against the
            model's vocabulary when the strategy meets it).
        relative_top: plausibility threshold on the base distribution (``None``: no filter).
        min_tokens_to_keep: tokens always kept by the plausibility filter (an int >= 1).

    Example:
        >>> from contrastive_decoding import InducedContrast
        >>> InducedContrast().relative_top
        0.1
    """

    def __init__(
        self,
        instruction: str | list[int] = UNTRUTHFUL_INSTRUCTION,
        relative_top: float | None = 0.1,
        min_tokens_to_keep: int = 1,
    ) -> None:
        if instruction is None:
            raise ValueError("`instruction` must be the amateur's instruction (text or token ids), got None.")
        prefix = check_text(instruction, "instruction", none_ok=False)
        self._amateur = Amateur(prefix=prefix, prefix_argument="instruction")
        self.instruction = instruction
        self.relative_top = None if relative_top is None else check_relative_top(relative_top)
        self.min_tokens_to_keep = check_min_tokens_to_keep(min_tokens_to_keep)

    def amateur_stream(self) -> Amateur:
        return self._amateur

    def combine(self, inputs: ContrastInputs) -> torch.Tensor:
        return F.log_softmax(inputs.final, dim=-1) - F.log_softmax(inputs.amateur, dim=-1)
