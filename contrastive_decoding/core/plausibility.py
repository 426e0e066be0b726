"""The adaptive plausibility constraint (APC, "relative top") of contrastive decoding.

Only tokens the mature (final) distribution finds plausible may win a contrast: a token is kept
when ``log p(v) >= max log p + log(relative_top)``, and the ``min_tokens_to_keep`` best tokens are
always kept. Generation gives the others ``-inf``; scoring gives them a finite floor so that summed
scores stay finite.
"""

from __future__ import annotations

import math

import torch

from contrastive_decoding.core.validation import check_int, check_number

__all__ = ["check_min_tokens_to_keep", "check_relative_top", "plausible_mask"]


def check_relative_top(relative_top: float, argument: str = "relative_top") -> float:
    """Validate that ``relative_top`` is a finite number in (0, 1] and return it as a float."""
    return check_number(
        argument,
        relative_top,
        0.0,
        1.0,
        low_open=True,
        hint="the fraction of the top token's probability a token needs to stay plausible; 0.1 is "
        "DoLa's default",
    )


def check_min_tokens_to_keep(value: int, vocab_size: int | None = None) -> int:
    """Validate ``min_tokens_to_keep`` (an int >= 1, at most ``vocab_size`` when known)."""
    value = check_int("min_tokens_to_keep", value, 1, hint="tokens the plausibility filter always keeps")
    if vocab_size is not None and value > vocab_size:
        raise ValueError(
            f"`min_tokens_to_keep`={value} is larger than the model's vocabulary of {vocab_size} tokens; "
            f"give at most {vocab_size} (1 is the default)."
        )
    return value


def plausible_mask(log_probs: torch.Tensor, relative_top: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Boolean mask of the tokens that pass the plausibility constraint.

    Args:
        log_probs: normalised log-probabilities of the mature layer, ``(..., vocab)``.
        relative_top: keep tokens whose probability is at least this fraction of the top one.
        min_tokens_to_keep: always keep at least this many of the most likely tokens.

    Returns:
        A bool tensor shaped like ``log_probs``; ``True`` marks a kept token.
    """
    # Scalar checks only (cheap per step): a NaN threshold would silently mask every token, and a
    # k beyond the vocabulary would fail inside torch.topk.
    check_relative_top(relative_top)
    check_min_tokens_to_keep(min_tokens_to_keep, log_probs.shape[-1] if log_probs.dim() else None)
    if log_probs.dim() == 0:
        raise ValueError("`log_probs` must have a vocabulary dimension, (..., vocab), got a 0-d tensor.")
    # Same threshold as transformers' former `_relative_top_filter`: the looser of the relative
    # threshold and the k-th best score.
    top = log_probs.max(dim=-1, keepdim=True).values
    threshold = top + math.log(relative_top)
    if min_tokens_to_keep > 1:
        kth = log_probs.topk(min_tokens_to_keep, dim=-1).values[..., -1:]
        threshold = torch.minimum(threshold, kth)
    return log_probs >= threshold
