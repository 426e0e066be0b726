"""Divergences between the mature distribution and early-exit distributions (DoLa's layer choice).

Two definitions are offered because they differ:

* ``"reference"`` (default): what DoLa's official code and transformers' former built-in compute,
  ``0.5 * (KL(m || p) + KL(m || q))`` with ``m = (p + q) / 2``, written with ``F.kl_div``. Using it
  keeps the premature-layer choice token-identical to the reference implementation.
* ``"jsd"``: the textbook Jensen-Shannon divergence ``0.5 * (KL(p || m) + KL(q || m))``, always
  finite and in ``[0, log 2]``.

Both average over the vocabulary (as the reference does; a constant scale that does not move the
argmax) and are computed in float32.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = ["DIVERGENCES", "layer_divergence"]

DIVERGENCES = ("reference", "jsd")


def layer_divergence(
    final_logits: torch.Tensor,
    layer_logits: torch.Tensor,
    kind: Literal["reference", "jsd"] = "reference",
) -> torch.Tensor:
    """Divergence of each candidate layer's distribution from the final one.

    Args:
        final_logits: mature-layer logits, ``(..., vocab)``.
        layer_logits: candidate-layer logits, ``(num_layers, ..., vocab)``.
        kind: ``"reference"`` or ``"jsd"`` (see the module docstring).

    Returns:
        ``(num_layers, ...)`` divergences, averaged over the vocabulary.
    """
    final_logits = final_logits.float()
    layer_logits = layer_logits.float()
    log_p = F.log_softmax(final_logits, dim=-1).unsqueeze(0)
    log_q = F.log_softmax(layer_logits, dim=-1)
    if kind == "reference":
        m = 0.5 * (F.softmax(final_logits, dim=-1).unsqueeze(0) + F.softmax(layer_logits, dim=-1))
        kl1 = F.kl_div(log_p, m, reduction="none").mean(-1)
        kl2 = F.kl_div(log_q, m, reduction="none").mean(-1)
        return 0.5 * (kl1 + kl2)
    if kind == "jsd":
        log_m = torch.logsumexp(torch.stack(torch.broadcast_tensors(log_p, log_q)), dim=0) - torch.log(
            torch.tensor(2.0, device=log_p.device)
        )
        # p * (log p - log m), with 0 * log 0 taken as 0 where a token has probability 0.
        kl_pm = torch.where(log_p > -torch.inf, log_p.exp() * (log_p - log_m), 0.0)
        kl_qm = torch.where(log_q > -torch.inf, log_q.exp() * (log_q - log_m), 0.0)
        return 0.5 * (kl_pm.mean(-1) + kl_qm.mean(-1))
    raise ValueError(f"`divergence` must be one of {DIVERGENCES}, got {kind!r}.")
