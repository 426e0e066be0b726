"""The adaptive plausibility constraint (APC, "relative top") of contrastive decoding.

Only tokens the mature (final) distribution finds plausible may win a contrast: a token is kept
when ``log p(v) >= max log p + log(relative_top)``, and the ``min_tokens_to_keep`` best tokens are
always kept. Generation gives the others ``-inf``; scoring gives them a finite floor so that summed
scores stay finite.
"""

from __future__ import annotations

import math

import torch

__all__ = ["check_relative_top", "plausible_mask"]


def check_relative_top(relative_top: float, argument: str = "relative_top") -> float:
    """Validate that ``relative_top`` lies in (0, 1] and return it as a float."""
    if isinstance(relative_top, bool) or not isinstance(relative_top, (int, float)):
        raise ValueError(f"`{argument}` must be a number in (0, 1], got {relative_top!r}.")
    if not 0.0 < relative_top <= 1.0:
        raise ValueError(
            f"`{argument}` must be in (0, 1] (the fraction of the top token's probability a token "
            f"needs to stay plausible; 0.1 is DoLa's default), got {relative_top!r}."
        )
    return float(relative_top)


def plausible_mask(log_probs: torch.Tensor, relative_top: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Boolean mask of the tokens that pass the plausibility constraint.

    Args:
        log_probs: normalised log-probabilities of the mature layer, ``(..., vocab)``.
        relative_top: keep tokens whose probability is at least this fraction of the top one.
        min_tokens_to_keep: always keep at least this many of the most likely tokens.

    Returns:
        A bool tensor shaped like ``log_probs``; ``True`` marks a kept token.
    """
    # Same threshold as transformers' former `_relative_top_filter`: the looser of the relative
    # threshold and the k-th best score.
    top = log_probs.max(dim=-1, keepdim=True).values
    threshold = top + math.log(relative_top)
    if min_tokens_to_keep > 1:
        kth = log_probs.topk(min_tokens_to_keep, dim=-1).values[..., -1:]
        threshold = torch.minimum(threshold, kth)
    return log_probs >= threshold
