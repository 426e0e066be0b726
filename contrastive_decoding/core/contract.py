"""The one strategy contract: what a strategy needs, and how it combines what it gets.

A strategy is model-independent configuration plus math. It declares what it contrasts:

* early exits of the model's own layers (:meth:`ContrastStrategy.premature_layers`);
* degraded streams: the same model on the same tokens with attention to some token classes
  suppressed (:meth:`ContrastStrategy.degraded_streams`, as :class:`~.specs.SuppressionRule` data);
* an amateur: a second model, or the same model behind an instruction prompt
  (:meth:`ContrastStrategy.amateur_stream`, an :class:`~.specs.Amateur`);
* a context entropy: per token, the entropy over all context positions of one layer's early exits
  (:meth:`ContrastStrategy.entropy_source`, an :class:`~.specs.EntropySource`);

and how their logits combine (:meth:`ContrastStrategy.combine`, or :meth:`~ContrastStrategy.step`
and :meth:`~ContrastStrategy.score` where the filter is not a plain mask). A backend (transformers'
hooks, vLLM's layer exits) turns the declarations into :class:`ContrastInputs`; this module imports
torch only.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F

from contrastive_decoding.core.plausibility import check_min_tokens_to_keep, plausible_mask
from contrastive_decoding.core.protocols import Floor, ScoringProtocol, protocol_token_scores

if TYPE_CHECKING:
    from contrastive_decoding.core.specs import Amateur, EntropySource, SuppressionRule

__all__ = [
    "ContrastInputs",
    "ContrastOutput",
    "ContrastStrategy",
    "LayerExits",
    "ModelLayout",
    "check_vocabulary",
    "declared_parameters",
]


class ModelLayout(Protocol):
    """What a strategy may know of a model when it resolves its declarations."""

    num_layers: int  # decoder blocks; early exits are indexed 0..num_layers-1 (0: embeddings)
    tied_embeddings: bool
    vocab_size: int

    def layout_of(self, model: Any) -> ModelLayout:
        """The layout of another model the strategy runs (an amateur); ``None``: this one."""
        ...


class LayerExits(ModelLayout, Protocol):
    """A :class:`ModelLayout` that also turns hidden states into early-exit logits."""

    def early_exit_logits(self, states: torch.Tensor, final_norm: bool = False) -> torch.Tensor: ...


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
    pays for what it reads. Every argument is a keyword; a backend passes what the strategy declared.

    Args:
        final: the intact model's own logits, ``(R, V)`` float32.
        layer_logits: early exits at the declared layers, ``(J, R, V)``, when the backend computed
            them itself (otherwise ``readout`` and ``states`` give them on first access).
        readout: turns ``states`` into early-exit logits (:class:`LayerExits`).
        states: the declared layers' hidden states, ``(J, 1 + S, R, H)``: the intact stream, then
            each degraded one.
        final_norm: apply the final norm (and soft-capping) to early exits.
        stream_logits: the degraded streams' own final logits, ``(S, R, V)``.
        amateur_logits: the amateur's final logits, ``(R, V)``.
        amateur_readout: the amateur's :class:`LayerExits`.
        amateur_states: the amateur's declared layers' states, ``(J', R, H)``.
        context_entropy: per-token entropy over the context positions, ``(R, V)``.

    Attributes:
        final: the intact model's own logits, ``(R, V)`` float32.

    Example:
        >>> import torch
        >>> from contrastive_decoding import ContrastInputs, DoLa
        >>> inputs = ContrastInputs(final=torch.randn(2, 8), layer_logits=torch.randn(3, 2, 8))
        >>> DoLa(dola_layers=[0, 1, 2]).step(inputs).scores.shape
        torch.Size([2, 8])
    """

    def __init__(
        self,
        *,
        final: torch.Tensor,
        layer_logits: torch.Tensor | None = None,
        readout: LayerExits | None = None,
        states: torch.Tensor | None = None,
        final_norm: bool = False,
        stream_logits: torch.Tensor | None = None,
        amateur_logits: torch.Tensor | None = None,
        amateur_readout: LayerExits | None = None,
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
        if layer_logits is not None:  # exits a backend computed itself (e.g. vLLM), or a test's
            self._cache["layers"] = layer_logits.to(device=final.device, dtype=torch.float32)

    def _exits(self, key: str, readout: LayerExits | None, states: torch.Tensor | None, what: str):
        if key in self._cache:
            return self._cache[key]
        if states is None:
            raise RuntimeError(f"This strategy reads {what} but does not declare them; {_DECLARE[what]}")
        logits = readout.early_exit_logits(states, final_norm=self._final_norm)
        self._cache[key] = logits.to(device=self.final.device, dtype=torch.float32)
        return self._cache[key]

    @property
    def final_log_probs(self) -> torch.Tensor:
        """``log_softmax`` of :attr:`final` in float32, ``(R, V)``, computed once per step: the
        plausibility filter and most contrasts read it."""
        if "final_log_probs" not in self._cache:
            self._cache["final_log_probs"] = F.log_softmax(self.final.float(), dim=-1)
        return self._cache["final_log_probs"]

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
        layers = self._cache.get("layers") if self._states is None else None
        return ContrastInputs(
            final=self.final,
            layer_logits=pick(layers, layer_index, 0),
            readout=self._readout,
            states=states,
            final_norm=final_norm,
            stream_logits=pick(self._stream_logits, stream_index, 0),
            amateur_logits=self._amateur_logits,
            amateur_readout=self._amateur_readout,
            amateur_states=pick(self._amateur_states, amateur_layer_index, 0),
            context_entropy=self._context_entropy,
        )


def check_vocabulary(strategy: ContrastStrategy, readout: ModelLayout) -> None:
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

    def premature_layers(self, readout: ModelLayout) -> list[int]:
        """Indices ``0..N-1`` of the layers whose early exits :meth:`combine` reads (default none).

        Raises:
            ValueError: naming the argument and the valid choices for an invalid layer spec, or a
                ``min_tokens_to_keep`` larger than the model's vocabulary.
        """
        check_vocabulary(self, readout)
        return []

    def degraded_streams(self, readout: ModelLayout) -> list[list[SuppressionRule]]:
        """The suppression rules of each degraded stream (default none)."""
        return []

    def amateur_stream(self) -> Amateur | None:
        """A second forward with its own inputs and cache: another model or a prompt (default none)."""
        return None

    def amateur_layers(self, readout: ModelLayout) -> list[int]:
        """Layers of the amateur whose early exits :meth:`combine` reads (default none)."""
        return []

    def entropy_source(self, readout: ModelLayout) -> EntropySource | None:
        """The layer whose early exits over all context positions give
        :attr:`ContrastInputs.context_entropy` (default none; see
        :class:`~contrastive_decoding.ActivationDecoding`)."""
        return None

    def combine(self, inputs: ContrastInputs) -> torch.Tensor | ContrastOutput:
        """The raw contrast ``(R, V)`` before the plausibility filter; never edits inputs in place.

        Return a :class:`ContrastOutput` instead of a tensor to report the layer used per row.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must implement `combine(inputs)` (or `step` and `score`)."
        )

    def plausible(self, inputs: ContrastInputs) -> torch.Tensor | None:
        """The tokens that may win, ``(R, V)`` bool (``None``: all)."""
        if self.relative_top is None:
            return None
        return plausible_mask(inputs.final_log_probs, self.relative_top, self.min_tokens_to_keep)

    def _combined(self, inputs: ContrastInputs) -> ContrastOutput:
        out = self.combine(inputs)
        return out if isinstance(out, ContrastOutput) else ContrastOutput(out)

    def step(self, inputs: ContrastInputs) -> ContrastOutput:
        """Next-token scores for one decoding step, ``(B, V)``, implausible tokens ``-inf``."""
        out = self._combined(inputs)
        keep = self.plausible(inputs)
        scores = out.scores if keep is None else torch.where(keep, out.scores, -torch.inf)
        return ContrastOutput(scores, out.chosen)

    def score(
        self,
        inputs: ContrastInputs,
        targets: torch.Tensor,
        protocol: ScoringProtocol = "paper",
        floor: Floor = -1000.0,
    ) -> ContrastOutput:
        """Scores of given targets ``(P,)`` at the scored positions (see ``score_continuations``)."""
        out = self._combined(inputs)
        scores = protocol_token_scores(out.scores, lambda: self.plausible(inputs), targets, protocol, floor)
        return ContrastOutput(scores, out.chosen)

    def params(self) -> dict[str, Any]:
        """The strategy's declared parameters (its ``__init__``'s) and their current values."""
        return {name: getattr(self, name) for name in declared_parameters(type(self)) if hasattr(self, name)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={_show(v)}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def declared_parameters(strategy_class: type) -> dict[str, inspect.Parameter]:
    """The parameters a strategy class declares: its ``__init__``'s, without ``self``/``*args``."""
    init = strategy_class.__init__
    if init is object.__init__:
        return {}
    return {
        name: p
        for name, p in inspect.signature(init).parameters.items()
        if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def _show(value: Any) -> str:
    text = repr(value)
    # An amateur model or a tokenizer: its class, not a repr of many lines.
    return type(value).__name__ if isinstance(value, torch.nn.Module) or len(text) > 120 else text
