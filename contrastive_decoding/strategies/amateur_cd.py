"""Classic contrastive decoding with a smaller amateur model (Li et al., ACL 2023; code
XiangLi1999/ContrastiveDecoding).

The score is ``log p_expert(v) - log p_amateur(v)`` on the plausible set of the expert
(``relative_top`` 0.1); the amateur's logits are divided by ``amateur_temperature`` (0.5 in the
authors' runs) before its log-softmax. The amateur must share the expert's tokenizer; a mismatch is
refused before anything is attached.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from contrastive_decoding.core.contract import ContrastInputs, ContrastStrategy
from contrastive_decoding.core.plausibility import check_min_tokens_to_keep, check_relative_top
from contrastive_decoding.core.registry import register_strategy
from contrastive_decoding.core.specs import Amateur
from contrastive_decoding.core.validation import check_number, check_usable_model, looks_like_path

__all__ = ["ContrastiveDecoding"]


def check_temperature(value: float, argument: str) -> float:
    return check_number(argument, value, 0.0, low_open=True, hint="0.5 in contrastive decoding")


def _check_amateur_model(amateur_model: object) -> None:
    if isinstance(amateur_model, (str, os.PathLike)):
        # A name or path: this class takes a loaded model. Say which, and whether a path exists.
        text = os.fspath(amateur_model)
        if looks_like_path(text) and not os.path.exists(os.path.expanduser(text)):
            raise ValueError(
                f"`amateur_model`={text!r} is a path that does not exist. Pass a loaded causal LM, e.g. "
                "`amateur, amateur_tokenizer = load_model(name)` (contrastive_decoding.load_model) where "
                "`name` is an existing folder or .gguf file, or a Hub id such as "
                "'HuggingFaceTB/SmolLM2-135M'."
            )
        raise ValueError(
            f"`amateur_model` must be a causal LM (torch.nn.Module), got the string {text!r}; load it "
            "first, e.g. `model, tokenizer = load_model(name)` (contrastive_decoding.load_model) or "
            "AutoModelForCausalLM.from_pretrained(name)."
        )
    check_usable_model(amateur_model, "amateur_model")


@register_strategy(
    "cd",
    repetition_penalty=1.0,
    description=(
        "contrastive decoding (Li et al. 2023): contrast with a smaller amateur model (--param amateur=...)"
    ),
)
class ContrastiveDecoding(ContrastStrategy):
    """Contrast the model with a smaller amateur model of the same tokenizer.

    Args:
        amateur_model: the amateur causal LM, loaded (e.g. a smaller checkpoint of the same family,
            from :func:`~contrastive_decoding.load_model`); a name or path is refused with a hint.
        amateur_tokenizer: its tokenizer; when given, its vocabulary must equal the model's
            (checked when the strategy is attached, with the model's tokenizer).
        amateur_temperature: divides the amateur's logits before its log-softmax; a finite number > 0.
        relative_top: plausibility threshold on the expert (``None`` turns the filter off).
        min_tokens_to_keep: tokens always kept by the plausibility filter (an int >= 1).

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from contrastive_decoding import ContrastiveDecoding
        >>> small = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=8, intermediate_size=16,
        ...     num_hidden_layers=1, num_attention_heads=2)).eval()
        >>> ContrastiveDecoding(small).amateur_temperature
        0.5
    """

    def __init__(
        self,
        amateur_model: nn.Module,
        amateur_tokenizer=None,
        amateur_temperature: float = 0.5,
        relative_top: float | None = 0.1,
        min_tokens_to_keep: int = 1,
    ) -> None:
        _check_amateur_model(amateur_model)
        self.amateur_temperature = check_temperature(amateur_temperature, "amateur_temperature")
        self.relative_top = None if relative_top is None else check_relative_top(relative_top)
        self.min_tokens_to_keep = check_min_tokens_to_keep(min_tokens_to_keep)
        self.amateur_model = amateur_model
        self.amateur_tokenizer = amateur_tokenizer
        self._amateur = Amateur(model=amateur_model, tokenizer=amateur_tokenizer)

    def amateur_stream(self) -> Amateur:
        return self._amateur

    def combine(self, inputs: ContrastInputs) -> torch.Tensor:
        expert = F.log_softmax(inputs.final, dim=-1)
        amateur = F.log_softmax(inputs.amateur / self.amateur_temperature, dim=-1)
        return expert - amateur
