"""SLED: self logits evolution decoding (Zhang et al., NeurIPS 2024; code JayZhang42/SLED).

SLED contrasts the final logits ``l_N`` with the early exits ``l_n`` of every layer ``n = 0..N-1``
(raw head, no final norm) to estimate a "latent" distribution ``P`` over the top-``k`` candidates
of ``q_N``, then moves the final logits towards it with a few steps of gradient descent on the
cross-entropy between ``softmax(l)`` and ``P``:

1. candidates ``C`` = top-``k`` tokens of ``q_N`` (``k = evolution_scale``);
2. for each layer ``n`` and candidate ``i``:
   ``m_{n,i} = max(0, cos(softmax(l_n) - e_i, l_n - l_N)) ** 2`` (cosine over the whole
   vocabulary, ``e_i`` the one-hot vector of ``i``);
3. per layer ``m_hat_n = m_n / sum_i m_{n,i}`` and layer weight ``s_n = sum_i m_{n,i} / sum_{n,i}
   m_{n,i}`` (a layer or a row whose sum is 0 contributes 0, as in the authors' code);
4. latent ``P = sum_n s_n * m_hat_n`` (zero outside ``C``);
5. starting from ``l = l_N``, ``T = evolution_steps`` (10) steps
   ``l <- l - eta_t * (softmax(l) - P)``, ``eta_t = evolution_rate * (1 - t / T)``, ``t = 0..T-1``;
6. tokens outside ``C`` get ``evolution_lower_bound``; the candidates keep their evolved logits.

Details the spec leaves open, read from the authors' ``sled_decoding.py`` (TruthfulQA class,
``lm_score``, mode ``"SLED"``):

- the evolution runs on the FULL-vocabulary logits, so ``softmax(l)`` in step 5 is over the whole
  vocabulary (not over the candidates); only afterwards are the non-candidates floored;
- the cosine uses the full-vocabulary vectors ``softmax(l_n) - e_i`` and ``l_n - l_N`` in float32;
- TruthfulQA settings (their ``scripts/TruthfulQA.sh`` and ``lm_score`` defaults): rate 2.5 and
  scale 75 for LLaMA-2-7B (scale 50-100 and rate 2-2.5 for the other models), lower bound -100,
  ``T = 10``, all layers ``0..N-1`` as premature layers;
- the authors run the evolution in the model's dtype (float16) and with batch size 1; here it runs
  in float32, one row at a time in parallel (everything is per row).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from contrastive_decoding.core.contract import (
    ContrastInputs,
    ContrastOutput,
    ContrastStrategy,
    ModelLayout,
)
from contrastive_decoding.core.protocols import Floor, ScoringProtocol, protocol_token_scores
from contrastive_decoding.core.registry import register_strategy
from contrastive_decoding.core.specs import resolve_layers
from contrastive_decoding.core.validation import check_flag, check_int, check_number

# torch.nn.functional.cosine_similarity's eps, used the same way (on the product of the norms).
_COS_EPS = 1e-8


def sled_latent(
    final_logits: torch.Tensor, layer_logits: torch.Tensor, candidates: torch.Tensor
) -> torch.Tensor:
    """SLED's latent distribution ``P`` over the candidates, float32, ``(R, K)``.

    Args:
        final_logits: mature logits ``l_N``, ``(R, V)``.
        layer_logits: early-exit logits ``l_n``, ``(J, R, V)``.
        candidates: candidate token ids per row, ``(R, K)``.

    The cosine of ``softmax(l_n) - e_i`` and ``d_n = l_n - l_N`` is computed without building the
    ``(J, R, K, V)`` tensor: ``(p.d - d_i) / (sqrt(|p|^2 - 2 p_i + 1) * |d|)``.
    """
    final = final_logits.float()
    layers = layer_logits.float()
    probs = torch.softmax(layers, dim=-1)  # (J, R, V)
    diff = layers - final[None]  # (J, R, V)
    idx = candidates[None].expand(layers.shape[0], -1, -1)  # (J, R, K)
    p_c = probs.gather(-1, idx)
    d_c = diff.gather(-1, idx)
    dot = (probs * diff).sum(-1, keepdim=True) - d_c
    grad_sq = ((probs * probs).sum(-1, keepdim=True) - 2.0 * p_c + 1.0).clamp_min(0.0)
    diff_sq = (diff * diff).sum(-1, keepdim=True)
    cos = dot / (grad_sq * diff_sq).clamp_min(_COS_EPS**2).sqrt()
    m = cos.clamp_min(0.0).square()  # (J, R, K)
    # sum_n s_n * m_n / sum_i m_{n,i} with s_n = sum_i m_{n,i} / sum_{n,i} m_{n,i}.
    total = m.sum(dim=(0, 2))[:, None]  # (R, 1)
    return torch.where(total > 0, m.sum(0) / torch.where(total > 0, total, 1.0), 0.0)


def sled_evolve(
    final_logits: torch.Tensor,
    layer_logits: torch.Tensor,
    evolution_scale: int = 75,
    evolution_rate: float = 2.5,
    evolution_lower_bound: float = -100.0,
    evolution_steps: int = 10,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SLED's evolved logits ``(R, V)`` float32 and the candidate mask ``(R, V)``.

    Args:
        final_logits: mature logits ``l_N``, ``(R, V)``.
        layer_logits: early-exit logits ``l_n``, ``(J, R, V)``.
        evolution_scale: number of candidates ``k`` (top-``k`` of ``q_N``; capped at ``V``).
        evolution_rate: the first step size ``eta_0``.
        evolution_lower_bound: the logit given to tokens outside the candidates.
        evolution_steps: number of evolution steps ``T``.
    """
    logits = final_logits.float()
    k = min(evolution_scale, logits.shape[-1])
    candidates = logits.topk(k, dim=-1).indices  # top-k of q_N (softmax is monotone)
    latent = torch.zeros_like(logits).scatter_(-1, candidates, sled_latent(logits, layer_logits, candidates))
    evolved = logits.clone()
    for t in range(evolution_steps):
        rate = evolution_rate * (1.0 - t / evolution_steps)
        evolved = evolved - rate * (torch.softmax(evolved, dim=-1) - latent)
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, candidates, True)
    return torch.where(mask, evolved, float(evolution_lower_bound)), mask


@register_strategy(
    "sled",
    description="SLED (Zhang et al. 2024): evolve the final logits toward a latent from all early exits",
)
class SLED(ContrastStrategy):
    """SLED's self logits evolution, as a strategy for processors, generate loops and scoring.

    Step scores are the evolved logits (see the module docstring): the candidates' logits after
    ``evolution_steps`` evolution steps, every other token at ``evolution_lower_bound``. There is
    no layer choice (``chosen`` is ``None``); every premature layer contributes with its weight.

    Scoring: ``"paper"`` gives ``log_softmax(evolved)[target]`` when ``post_softmax`` is true (the
    default), or the raw evolved logit at the target when it is false, which is what the authors'
    TruthfulQA-MC script scores (its ``--post_softmax`` flag is off by default). ``"normalized"``
    gives ``log_softmax(evolved)[target]`` with tokens outside the candidates at the protocol's
    ``floor`` (the candidates play the role of the plausible set).

    Args:
        evolution_rate: first step size ``eta_0`` (>= 0; the authors use 2.5 for LLaMA-2-7B on
            TruthfulQA, 2 for larger models). 0 leaves the final logits on the candidates.
        evolution_scale: number of candidate tokens ``k`` (top-``k`` of ``q_N``, capped at the
            vocabulary; TruthfulQA: 75 for LLaMA-2-7B, 50-100 for others).
        evolution_lower_bound: logit of the tokens outside the candidates (TruthfulQA: -100).
        evolution_steps: number of evolution steps ``T`` (the authors' ``op_T`` = 10).
        layers: premature layers: ``None`` (default) for all layers ``0..N-1`` as in the paper,
            a list of layer indices, or a ``(start, end)`` pair of fractions of depth.
        final_norm: apply the final norm to early exits (SLED's code does not; default ``False``).
        post_softmax: under ``"paper"`` scoring, log-softmax the evolved logits (default ``True``);
            ``False`` scores raw evolved logits as the authors' TruthfulQA script does.

    Example:
        >>> import torch
        >>> from contrastive_decoding import SLED, ContrastInputs
        >>> sled = SLED(evolution_scale=3)
        >>> final, layers = torch.randn(2, 10), torch.randn(4, 2, 10)
        >>> out = sled.step(ContrastInputs(final=final, layer_logits=layers)).scores
        >>> out.shape, int((out > -100).sum(-1).max())
        (torch.Size([2, 10]), 3)
    """

    relative_top = None  # no plausibility mask on the decoding scores

    def __init__(
        self,
        evolution_rate: float = 2.5,
        evolution_scale: int = 75,
        evolution_lower_bound: float = -100.0,
        evolution_steps: int = 10,
        layers: Sequence[int] | tuple[float, float] | None = None,
        final_norm: bool = False,
        post_softmax: bool = True,
    ) -> None:
        self.evolution_rate = check_number(
            "evolution_rate", evolution_rate, 0.0, hint="the first evolution step size; SLED uses 2-2.5"
        )
        self.evolution_scale = check_int(
            "evolution_scale", evolution_scale, 1, hint="the number of candidate tokens; SLED uses 50-100"
        )
        self.evolution_lower_bound = check_number(
            "evolution_lower_bound", evolution_lower_bound, hint="the logit of non-candidates; SLED uses -100"
        )
        self.evolution_steps = check_int(
            "evolution_steps", evolution_steps, 1, hint="the number of evolution steps; SLED uses 10"
        )
        if layers is not None:
            if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence) or not len(layers):
                raise ValueError(
                    "`layers` must be None (all layers 0..N-1, as SLED), a non-empty list of layer "
                    f"indices or a (start, end) pair of fractions of depth, got {layers!r}."
                )
            layers = list(layers)
        self.layers = layers
        self.final_norm = check_flag("final_norm", final_norm)
        self.post_softmax = check_flag("post_softmax", post_softmax)

    def premature_layers(self, readout: ModelLayout) -> list[int]:
        if self.layers is None:
            return list(range(readout.num_layers))
        return resolve_layers(self.layers, readout.num_layers, argument="layers")

    def evolve(
        self, final_logits: torch.Tensor, layer_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Evolved logits (float32) and candidate mask ``(rows, V)`` from ``(rows, V)``, ``(J, rows, V)``."""
        return sled_evolve(
            final_logits,
            layer_logits,
            self.evolution_scale,
            self.evolution_rate,
            self.evolution_lower_bound,
            self.evolution_steps,
        )

    def combine(self, inputs: ContrastInputs) -> torch.Tensor:
        return self.evolve(inputs.final, inputs.layers)[0]

    def score(
        self,
        inputs: ContrastInputs,
        targets: torch.Tensor,
        protocol: ScoringProtocol = "paper",
        floor: Floor = -1000.0,
    ) -> ContrastOutput:
        final_logits, layer_logits = inputs.final, inputs.layers
        evolved, mask = self.evolve(final_logits, layer_logits)
        if protocol == "paper" and self.post_softmax:
            evolved = F.log_softmax(evolved, dim=-1)
        scores = protocol_token_scores(evolved, lambda: mask, targets, protocol, floor)
        return ContrastOutput(scores, None)
