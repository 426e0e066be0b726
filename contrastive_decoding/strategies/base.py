"""The strategy base classes: what a strategy needs, and how it combines what it gets.

A strategy is model-independent configuration plus math. It declares what it contrasts:

* early exits of the model's own layers (:meth:`ContrastStrategy.premature_layers`);
* degraded streams: the same model on the same tokens with attention to some token classes
  suppressed (:meth:`ContrastStrategy.degraded_streams`, run as extra rows of every forward);
* an amateur: a second model, or the same model behind an instruction prompt
  (:meth:`ContrastStrategy.amateur_stream`, run as a second forward with its own cache);
* a context entropy: per token, the entropy over all context positions of one layer's early exits
  (:meth:`ContrastStrategy.entropy_source`, activation decoding);

and how their logits combine (:meth:`ContrastStrategy.combine`). The shared machinery (capture
hooks, streams, the plausibility constraint, logits processors, generate loops and scoring) hands
every strategy the same :class:`ContrastInputs`, so a new strategy is a short subclass.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from ..plausibility import check_min_tokens_to_keep, plausible_mask
from ..readout import LayerReadout
from ..suppression import SuppressionRule

if TYPE_CHECKING:
    from ..amateur import Amateur
    from ..context_entropy import EntropySource

__all__ = [
    "ContrastInputs",
    "ContrastOutput",
    "ContrastStrategy",
    "Floor",
    "LayerContrastStrategy",
    "RelativeFloor",
    "ScoringProtocol",
    "SCORING_PROTOCOLS",
    "StreamContrastStrategy",
    "protocol_token_scores",
]

ScoringProtocol = Literal["paper", "normalized"]
SCORING_PROTOCOLS = ("paper", "normalized")


@dataclass
class ContrastOutput:
    """What a strategy returns for one decoding step or one batch of scored tokens.

    Attributes:
        scores: contrasted scores, ``(rows, vocab)`` for a step, ``(tokens,)`` when scoring.
        chosen: for each row/token, the position in :meth:`ContrastStrategy.premature_layers` of the layer
            used (``None`` if the strategy does not choose one).
    """

    scores: torch.Tensor
    chosen: torch.Tensor | None = None


class ContrastInputs:
    """Everything a strategy may contrast, for ``R`` rows.

    In generation the rows are the batch rows at the position predicting the next token; in scoring
    they are the scored positions. Early exits are computed on first access only, so a strategy
    pays for what it reads.

    Attributes:
        final: the intact model's own logits, ``(R, V)`` float32.
    """

    def __init__(
        self,
        final: torch.Tensor,
        readout: LayerReadout | None = None,
        states: torch.Tensor | None = None,
        final_norm: bool = False,
        stream_logits: torch.Tensor | None = None,
        amateur_logits: torch.Tensor | None = None,
        amateur_readout: LayerReadout | None = None,
        amateur_states: torch.Tensor | None = None,
        context_entropy: torch.Tensor | None = None,
    ) -> None:
        self.final = final
        self._readout = readout
        # (J, 1 + S, R, H): the declared layers' states of the intact stream (0) and each degraded one.
        self._states = states
        self._final_norm = final_norm
        self._stream_logits = stream_logits  # (S, R, V)
        self._amateur_logits = amateur_logits  # (R, V)
        self._amateur_readout = amateur_readout
        self._amateur_states = amateur_states  # (J', R, H)
        self._context_entropy = context_entropy  # (R, V)
        self._cache: dict[str, torch.Tensor] = {}

    def _exits(self, key: str, readout: LayerReadout | None, states: torch.Tensor | None, what: str):
        if states is None:
            raise RuntimeError(f"This strategy reads {what} but does not declare them; {_DECLARE[what]}")
        if key not in self._cache:
            logits = readout.early_exit_logits(states, final_norm=self._final_norm)
            self._cache[key] = logits.to(device=self.final.device, dtype=torch.float32)
        return self._cache[key]

    @property
    def layers(self) -> torch.Tensor:
        """Early-exit logits of the intact stream at the declared layers, ``(J, R, V)``."""
        states = None if self._states is None else self._states[:, 0]
        return self._exits("layers", self._readout, states, "layers")

    @property
    def streams(self) -> torch.Tensor:
        """The degraded streams' own final logits, ``(S, R, V)``."""
        if self._stream_logits is None:
            raise RuntimeError(
                f"This strategy reads streams but does not declare them; {_DECLARE['streams']}"
            )
        return self._stream_logits.to(device=self.final.device, dtype=torch.float32)

    @property
    def stream_layers(self) -> torch.Tensor:
        """Early exits of each degraded stream at the declared layers, ``(S, J, R, V)``."""
        states = None if self._states is None or self._states.shape[1] < 2 else self._states[:, 1:]
        if states is not None:
            states = states.transpose(0, 1)
        return self._exits("stream_layers", self._readout, states, "stream layers")

    @property
    def amateur(self) -> torch.Tensor:
        """The amateur's final logits, ``(R, V)``."""
        if self._amateur_logits is None:
            raise RuntimeError(f"This strategy reads an amateur but declares none; {_DECLARE['amateur']}")
        return self._amateur_logits.to(device=self.final.device, dtype=torch.float32)

    @property
    def amateur_layers(self) -> torch.Tensor:
        """Early exits of the amateur at its declared layers, ``(J', R, V)``."""
        return self._exits("amateur_layers", self._amateur_readout, self._amateur_states, "amateur layers")

    @property
    def context_entropy(self) -> torch.Tensor:
        """Per-token entropy over the context positions at the declared layer, ``(R, V)``."""
        if self._context_entropy is None:
            raise RuntimeError(
                f"This strategy reads a context entropy but declares none; {_DECLARE['context entropy']}"
            )
        return self._context_entropy.to(device=self.final.device, dtype=torch.float32)

    def view(
        self,
        layer_index: Sequence[int] | None,
        stream_index: Sequence[int] | None,
        amateur_layer_index: Sequence[int] | None,
        final_norm: bool,
    ) -> ContrastInputs:
        """The inputs one part of a composite strategy sees: a subset of layers and streams."""

        def pick(tensor, index, dim):
            if tensor is None or index is None:
                return None
            return tensor.index_select(dim, torch.tensor(list(index), dtype=torch.long, device=tensor.device))

        states = pick(self._states, layer_index, 0)
        if states is not None and stream_index is not None:
            states = pick(states, [0] + [s + 1 for s in stream_index], 1)
        return ContrastInputs(
            self.final,
            self._readout,
            states,
            final_norm,
            pick(self._stream_logits, stream_index, 0),
            self._amateur_logits,
            self._amateur_readout,
            pick(self._amateur_states, amateur_layer_index, 0),
            self._context_entropy,
        )


def check_vocabulary(strategy: ContrastStrategy, readout: LayerReadout) -> None:
    """Refuse settings that only the model's vocabulary size can rule out (``min_tokens_to_keep``
    beyond it), when a strategy first meets a model.

    Every entry point resolves :meth:`ContrastStrategy.premature_layers` before attaching anything,
    so strategies call this from there: a bad value is refused with the model left untouched,
    instead of failing in ``torch.topk`` at the first decoding step.
    """
    vocab = getattr(readout, "vocab_size", None)  # duck-typed readouts in user code may lack it
    if getattr(strategy, "relative_top", None) is not None and vocab is not None:
        check_min_tokens_to_keep(getattr(strategy, "min_tokens_to_keep", 1), vocab)


_DECLARE = {
    "layers": "return them from `premature_layers(readout)`.",
    "stream layers": (
        "return layers from `premature_layers(readout)` and streams from `degraded_streams(readout)`."
    ),
    "streams": "return their suppression rules from `degraded_streams(readout)`.",
    "amateur": "return one from `amateur_stream()`.",
    "amateur layers": (
        "return an amateur from `amateur_stream()` and its layers from `amateur_layers(readout)`."
    ),
    "context entropy": "return an EntropySource (layer, context) from `entropy_source(readout)`.",
}


@dataclass(frozen=True)
class RelativeFloor:
    """A floor for implausible tokens set per scored position: ``margin`` below the lowest score of
    that position's plausible tokens.

    DoLa's fixed floor (``-1000``) assumes plausible tokens score far above it. When early exits
    are huge (no final norm, a residual stream of 1e5), the normalized contrast of plausible tokens
    can itself sit near ``-3e4``: a fixed floor then ranks implausible tokens *above* plausible
    ones, and answers with more implausible tokens win. A relative floor cannot invert that order.
    Pass it wherever a ``floor`` is taken (``score_continuations(..., floor=RelativeFloor())``, the
    harness's ``--floor relative``).

    Args:
        margin: how far below the lowest plausible score implausible tokens go (finite, > 0).

    Example:
        >>> import torch
        >>> from contrastive_decoding import RelativeFloor
        >>> scores = torch.tensor([[-5.0e4, -4.0e4, 0.0]])
        >>> keep = torch.tensor([[True, True, False]])
        >>> RelativeFloor(1000.0).values(scores, keep)
        tensor([[-51000.]])
    """

    margin: float = 1000.0

    def __post_init__(self) -> None:
        margin = self.margin
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 < margin < float("inf"):
            raise ValueError(f"`margin` must be a finite number > 0 (e.g. 1000.0), got {margin!r}.")

    def values(self, scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The floor of each row, ``(P, 1)``: its lowest plausible score minus ``margin``."""
        lowest = torch.where(keep, scores, torch.inf).amin(-1, keepdim=True)
        return lowest - self.margin


Floor = float | RelativeFloor


def floored(scores: torch.Tensor, keep: torch.Tensor, floor: Floor) -> torch.Tensor:
    """``scores`` with the tokens outside ``keep`` set to ``floor`` (a number, or per row for a
    :class:`RelativeFloor`)."""
    value = floor.values(scores, keep) if isinstance(floor, RelativeFloor) else floor
    return torch.where(keep, scores, value)


def protocol_token_scores(
    contrast: torch.Tensor,
    plausible: Callable[[], torch.Tensor | None],
    targets: torch.Tensor,
    protocol: ScoringProtocol,
    floor: Floor,
) -> torch.Tensor:
    """The targets' scores under a scoring protocol, for strategies' ``score_tokens``.

    Args:
        contrast: the raw contrast at each scored position, ``(P, V)``.
        plausible: returns the plausible-token mask ``(P, V)`` (or ``None`` for no filter); called
            only for ``"normalized"``.
        targets: target ids, ``(P,)``.
        protocol: ``"paper"`` keeps the raw contrast; ``"normalized"`` log-softmaxes it and gives
            implausible tokens ``floor``.
        floor: the finite score of implausible tokens, or a :class:`RelativeFloor`.
    """
    if protocol not in SCORING_PROTOCOLS:
        raise ValueError(f"`protocol` must be one of {SCORING_PROTOCOLS}, got {protocol!r}.")
    if protocol == "normalized":
        contrast = F.log_softmax(contrast, dim=-1)
        keep = plausible()
        if keep is not None:
            contrast = floored(contrast, keep, floor)
    return contrast.gather(-1, targets[:, None]).squeeze(-1)


class ContrastStrategy:
    """Base class of every strategy: declare what to contrast, implement how it combines.

    A subclass overrides any of :meth:`premature_layers`, :meth:`degraded_streams`, :meth:`amateur_stream`,
    :meth:`amateur_layers` and :meth:`entropy_source` to say what it needs, and :meth:`combine` to turn the
    :class:`ContrastInputs` into raw scores. The base class applies the adaptive plausibility
    constraint of the final distribution (``relative_top``; ``None`` turns it off): implausible
    tokens get ``-inf`` when decoding and the scoring protocol's floor when scoring. Strategies whose
    filter is not a plain mask (DoLa's layer choice, ACD's mass-preserving renormalisation) override
    :meth:`step` and :meth:`score` instead.

    Attributes:
        final_norm: apply the final norm (and logit soft-capping) to early exits before the head.
        relative_top: plausibility threshold on the final distribution, or ``None``.
        min_tokens_to_keep: tokens the plausibility filter always keeps.
        mode, bias, query_rows: how degraded streams suppress attention (see
            :class:`~contrastive_decoding.AttentionSuppression`).

    Example:
        >>> import torch
        >>> from contrastive_decoding import ContrastStrategy
        >>> class EarlyExitContrast(ContrastStrategy):
        ...     def premature_layers(self, readout):
        ...         return [readout.num_layers // 2]
        ...     def combine(self, x):
        ...         return x.final.log_softmax(-1) - x.layers[0].log_softmax(-1)
        >>> EarlyExitContrast().relative_top
        0.1
    """

    final_norm: bool = False
    relative_top: float | None = 0.1
    min_tokens_to_keep: int = 1
    mode: str = "mask"
    bias: float = -100.0
    query_rows: str = "generated"

    def premature_layers(self, readout: LayerReadout) -> list[int]:
        """Indices ``0..N-1`` of the layers whose early exits :meth:`combine` reads (default none).

        Raises:
            ValueError: naming the argument and the valid choices for an invalid layer spec, or a
                ``min_tokens_to_keep`` larger than the model's vocabulary.
        """
        check_vocabulary(self, readout)
        return []

    def degraded_streams(self, readout: LayerReadout) -> list[list[SuppressionRule]]:
        """The suppression rules of each degraded stream (default none)."""
        return []

    def amateur_stream(self) -> Amateur | None:
        """A second forward with its own inputs and cache: another model or a prompt (default none)."""
        return None

    def amateur_layers(self, readout: LayerReadout) -> list[int]:
        """Layers of the amateur whose early exits :meth:`combine` reads (default none)."""
        return []

    def entropy_source(self, readout: LayerReadout) -> EntropySource | None:
        """The layer whose early exits over all context positions give
        :attr:`ContrastInputs.context_entropy` (default none; see
        :class:`~contrastive_decoding.ActivationDecoding`)."""
        return None

    def combine(self, inputs: ContrastInputs) -> torch.Tensor:
        """The raw contrast ``(R, V)`` before the plausibility filter; never edits inputs in place."""
        raise NotImplementedError(
            f"{type(self).__name__} must implement `combine(inputs)` (or `step` and `score`)."
        )

    def plausible(self, inputs: ContrastInputs) -> torch.Tensor | None:
        """The tokens that may win, ``(R, V)`` bool (``None``: all)."""
        if self.relative_top is None:
            return None
        return plausible_mask(
            F.log_softmax(inputs.final.float(), -1), self.relative_top, self.min_tokens_to_keep
        )

    def step(self, inputs: ContrastInputs) -> ContrastOutput:
        """Next-token scores for one decoding step, ``(B, V)``, implausible tokens ``-inf``."""
        scores = self.combine(inputs)
        keep = self.plausible(inputs)
        return ContrastOutput(scores if keep is None else torch.where(keep, scores, -torch.inf))

    def score(
        self,
        inputs: ContrastInputs,
        targets: torch.Tensor,
        protocol: ScoringProtocol = "paper",
        floor: Floor = -1000.0,
    ) -> ContrastOutput:
        """Scores of given targets ``(P,)`` at the scored positions (see ``score_continuations``)."""
        raw = self.combine(inputs)
        return ContrastOutput(
            protocol_token_scores(raw, lambda: self.plausible(inputs), targets, protocol, floor)
        )


class LayerContrastStrategy(ContrastStrategy, ABC):
    """A strategy that contrasts the final layer with early exits only (DoLa, SLED, ACD, ...).

    Subclasses implement :meth:`premature_layers`, :meth:`contrast` and :meth:`score_tokens`, which
    take the early-exit logits as a tensor; the shared machinery reaches them through
    :meth:`step` and :meth:`score`.
    """

    def step(self, inputs: ContrastInputs) -> ContrastOutput:
        return self.contrast(inputs.final, inputs.layers)

    def score(
        self,
        inputs: ContrastInputs,
        targets: torch.Tensor,
        protocol: ScoringProtocol = "paper",
        floor: Floor = -1000.0,
    ) -> ContrastOutput:
        return self.score_tokens(inputs.final, inputs.layers, targets, protocol, floor)

    @abstractmethod
    def premature_layers(self, readout: LayerReadout) -> list[int]:
        """Resolve and validate the premature layers (indices ``0..N-1``) for this model.

        Raises:
            ValueError: naming the argument and the valid choices for an invalid layer spec.
        """

    @abstractmethod
    def contrast(self, final_logits: torch.Tensor, layer_logits: torch.Tensor) -> ContrastOutput:
        """Contrasted next-token scores for one decoding step.

        Args:
            final_logits: the mature layer's logits, ``(B, V)``.
            layer_logits: early-exit logits of :meth:`premature_layers`, ``(J, B, V)``.

        Returns:
            A new ``(B, V)`` tensor of scores (inputs are never edited in place) and the layer used
            per row.
        """

    @abstractmethod
    def score_tokens(
        self,
        final_logits: torch.Tensor,
        layer_logits: torch.Tensor,
        targets: torch.Tensor,
        protocol: ScoringProtocol,
        floor: Floor,
    ) -> ContrastOutput:
        """Contrasted log-scores of given target tokens (teacher forcing).

        Args:
            final_logits: mature logits at the positions that predict each target, ``(P, V)``.
            layer_logits: early-exit logits at those positions, ``(J, P, V)``.
            targets: the target token ids, ``(P,)``.
            protocol: ``"paper"`` (raw contrast) or ``"normalized"`` (log-softmaxed contrast with
                the plausibility floor); see :func:`contrastive_decoding.score_continuations`.
            floor: the finite score given to implausible tokens under ``"normalized"``.

        Returns:
            ``(P,)`` scores and the layer used per target.
        """


class StreamContrastStrategy(ContrastStrategy, ABC):
    """Contrast the model's own distribution against degraded streams of the same model.

    A degraded stream is the same model run on the same tokens with attention to some token
    classes suppressed in some layers (see :class:`~contrastive_decoding.AttentionSuppression`).
    Processors, generate loops and scoring run stream 0 (intact) and the degraded streams as row
    groups of one batch; subclasses say which streams they need and how the logits combine.
    """

    def step(self, inputs: ContrastInputs) -> ContrastOutput:
        return self.contrast(inputs.final, inputs.streams)

    def score(
        self,
        inputs: ContrastInputs,
        targets: torch.Tensor,
        protocol: ScoringProtocol = "paper",
        floor: Floor = -1000.0,
    ) -> ContrastOutput:
        return self.score_tokens(inputs.final, inputs.streams, targets, protocol, floor)

    @abstractmethod
    def degraded_streams(self, readout: LayerReadout) -> list[list[SuppressionRule]]:
        """The suppression rules of each degraded stream, resolved and validated for this model.

        Raises:
            ValueError: naming the argument, for layers outside the model.
        """

    @abstractmethod
    def contrast(self, final_logits: torch.Tensor, stream_logits: torch.Tensor) -> ContrastOutput:
        """Contrasted next-token scores for one decoding step.

        Args:
            final_logits: the intact stream's logits, ``(B, V)``.
            stream_logits: the degraded streams' logits, ``(S, B, V)``.
        """

    @abstractmethod
    def score_tokens(
        self,
        final_logits: torch.Tensor,
        stream_logits: torch.Tensor,
        targets: torch.Tensor,
        protocol: ScoringProtocol,
        floor: Floor,
    ) -> ContrastOutput:
        """Contrasted log-scores of given target tokens; ``stream_logits`` is ``(S, P, V)``."""
