"""Divergences between the mature distribution and early-exit distributions (DoLa's layer choice).

Two definitions are offered because they differ:

* ``"reference"`` (default): what DoLa's official code and transformers' former built-in compute,
  ``0.5 * (KL(m || p) + KL(m || q))`` with ``m = (p + q) / 2``, written with ``F.kl_div``. Using it
  keeps the premature-layer choice token-identical to the reference implementation.
* ``"jsd"``: the textbook Jensen-Shannon divergence ``0.5 * (KL(p || m) + KL(q || m))``, always
  finite and in ``[0, log 2]``.

Both average over the vocabulary (as the reference does; a constant scale that does not move the
argmax) and are computed in float32.

Memory: the stacked computation holds about five ``(layers, rows, vocab)`` float32 tensors at once
(0.5 GiB each for 16 layers x 32 rows x 262k tokens). :func:`divergence_by_layer` takes the layers
one at a time with the same result bit for bit, wherever that is guaranteed (see
:func:`layerwise_is_exact`); DoLa uses it there.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "DIVERGENCES",
    "divergence_and_log_probs",
    "divergence_by_layer",
    "layer_divergence",
    "layerwise_is_exact",
]

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
    if layerwise_is_exact(final_logits, layer_logits, kind):
        return divergence_by_layer(final_logits, layer_logits)[0]
    return divergence_and_log_probs(final_logits, layer_logits, kind)[0]


def layerwise_is_exact(
    final_logits: torch.Tensor, layer_logits: torch.Tensor, kind: Literal["reference", "jsd"] = "reference"
) -> bool:
    """Whether :func:`divergence_by_layer` equals the stacked computation bit for bit here.

    Softmaxes and elementwise operations treat every row alike however many are stacked; only the
    mean over the vocabulary could differ. On CPU, PyTorch reduces each output row with the same
    serial kernel whenever there are two or more output rows (it splits the rows among threads),
    but a single output row is split across threads in two passes. So the layers are taken one at
    a time on CPU when each layer has two or more rows, or with one intra-op thread. On GPUs the
    reduction's launch layout depends on the number of rows, so the stacked path is kept there.
    """
    rows = final_logits.numel() // max(final_logits.shape[-1], 1)
    return (
        kind == "reference"
        and layer_logits.device.type == "cpu"
        and layer_logits.shape[0] > 1
        and (rows > 1 or torch.get_num_threads() == 1)
    )


def divergence_by_layer(
    final_logits: torch.Tensor, layer_logits: torch.Tensor, log_p: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``"reference"`` divergence, one candidate layer at a time, and ``log_p``.

    Equal bit for bit to ``divergence_and_log_probs(...)[:2]`` where :func:`layerwise_is_exact`;
    no ``(layers, rows, vocab)`` tensor is made besides ``layer_logits`` itself, so the extra memory
    is about four ``(rows, vocab)`` float32 tensors whatever the number of layers. The layers'
    log-softmaxes are not kept: recompute a chosen row's with ``F.log_softmax`` (bit-identical to
    slicing the stacked one).

    Args:
        log_p: ``F.log_softmax(final_logits.float(), -1)`` when the caller has it already.

    Returns:
        ``(divergence (J, ...), log_p (..., V))``.
    """
    final_logits = final_logits.float()
    log_p = F.log_softmax(final_logits, dim=-1) if log_p is None else log_p
    final_probs = F.softmax(final_logits, dim=-1)
    kl1 = torch.empty(layer_logits.shape[:-1], dtype=torch.float32, device=layer_logits.device)
    kl2 = torch.empty_like(kl1)
    for j, logits in enumerate(layer_logits):
        logits = logits.float()
        m = F.softmax(logits, dim=-1).add_(final_probs).mul_(0.5)
        xm = torch.special.xlogy(m, m)
        kl1[j] = (m * log_p).neg_().add_(xm).mean(-1)  # as in divergence_and_log_probs
        kl2[j] = xm.sub_(m.mul_(F.log_softmax(logits, dim=-1))).mean(-1)
    return 0.5 * (kl1 + kl2), log_p


def divergence_and_log_probs(
    final_logits: torch.Tensor,
    layer_logits: torch.Tensor,
    kind: Literal["reference", "jsd"] = "reference",
    log_p: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`layer_divergence`, plus the float32 log-softmaxes it computed, for reuse.

    Args:
        log_p: ``F.log_softmax(final_logits.float(), -1)`` when the caller has it already.

    Returns:
        ``(divergence (J, ...), log_p (..., V), log_q (J, ..., V))``.
    """
    final_logits = final_logits.float()
    layer_logits = layer_logits.float()
    log_p = F.log_softmax(final_logits, dim=-1) if log_p is None else log_p
    log_q = F.log_softmax(layer_logits, dim=-1)
    if kind == "reference":
        # F.kl_div(inp, m) is xlogy(m, m) - m * inp; xlogy(m, m) is shared by both terms. Written
        # this way it is bit-identical to two kl_div calls and ~2x faster; each difference is taken
        # in place of one of its operands, so at most five (J, ..., V) float32 tensors are alive
        # (the logits, log_q, m, xm and one product): at 262k vocabularies that is the peak.
        m = F.softmax(layer_logits, dim=-1)
        m.add_(F.softmax(final_logits, dim=-1).unsqueeze(0)).mul_(0.5)
        xm = torch.special.xlogy(m, m)
        # (-(m * log_p)) + xm rounds exactly as xm - m * log_p (negation is exact); in place, so no
        # second buffer is needed (and autograd, which refuses out=, still follows it).
        kl1 = (m * log_p.unsqueeze(0)).neg_().add_(xm).mean(-1)
        kl2 = xm.sub_(m.mul_(log_q)).mean(-1)
        return 0.5 * (kl1 + kl2), log_p, log_q
    if kind == "jsd":
        lp, lq = torch.broadcast_tensors(log_p.unsqueeze(0), log_q)
        log_m = torch.logsumexp(torch.stack([lp, lq]), dim=0) - math.log(2.0)
        # p * (log p - log m), with 0 * log 0 taken as 0 where a token has probability 0.
        kl_pm = torch.where(lp > -torch.inf, lp.exp() * (lp - log_m), 0.0)
        kl_qm = torch.where(lq > -torch.inf, lq.exp() * (lq - log_m), 0.0)
        return 0.5 * (kl_pm.mean(-1) + kl_qm.mean(-1)), log_p, log_q
    raise ValueError(f"`divergence` must be one of {DIVERGENCES}, got {kind!r}.")
