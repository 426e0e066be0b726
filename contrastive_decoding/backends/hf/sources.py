"""What a strategy contrasts, gathered during the model's own forward passes.

:class:`ContrastSources` is the one piece of machinery behind the logits processor, the generate
loop and scoring: for a :class:`~contrastive_decoding.ContrastStrategy` it attaches what the
strategy declares (layer-capture hooks, degraded streams with attention suppression, an amateur
stream, a context entropy) for the duration of a ``with`` block, and turns what they recorded into
:class:`~contrastive_decoding.ContrastInputs`.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from contrastive_decoding.backends.hf.amateur import AmateurRunner
from contrastive_decoding.backends.hf.cache_names import cache_from
from contrastive_decoding.backends.hf.capture import LayerCapture
from contrastive_decoding.backends.hf.context_entropy import ContextEntropy
from contrastive_decoding.backends.hf.copying import copy_clean, stop_copy_clean
from contrastive_decoding.backends.hf.readout import LayerReadout
from contrastive_decoding.backends.hf.streams import StreamRunner, _by_name
from contrastive_decoding.core.contract import ContrastInputs, ContrastStrategy
from contrastive_decoding.strategies import as_strategy

__all__ = ["ContrastSources", "ForwardRecord", "reads_whole_prompt"]

# The sources attached right now, on any model (weakly, so that a model and its hooks that became
# garbage together leave nothing behind).
_ATTACHED: weakref.WeakSet[ContrastSources] = weakref.WeakSet()


@dataclass(frozen=True)
class ForwardRecord:
    """The forward pass whose states and logits the sources hold.

    Attributes:
        index: its place among the model's forwards since the sources were attached (by start).
        thread: the thread that ran it.
        length: the sequence length its last position predicts from (cache plus new tokens), or
            ``None`` when unknown.
        rows: its batch rows.
    """

    index: int
    thread: int
    length: int | None
    rows: int


def _sequence_length(named: dict) -> int | None:
    """The length of the sequence a forward's last position predicts from (``None``: unknown)."""
    position = named.get("cache_position")
    if isinstance(position, torch.Tensor) and position.numel():
        return int(position[-1]) + 1
    cache = cache_from(named)
    if cache is not None:
        return cache.get_seq_length() if hasattr(cache, "get_seq_length") else None
    tokens = named.get("input_ids")
    tokens = named.get("inputs_embeds") if tokens is None else tokens
    return None if tokens is None else tokens.shape[1]  # no cache: the input is the whole sequence


def _exclusive_reason(degraded: list, amateur_on_same_model: bool) -> str | None:
    """Why sources with these declarations cannot share their model with other attached sources."""
    if degraded:
        return "runs degraded streams as extra rows of every forward of the model"
    if amateur_on_same_model:
        return "runs its amateur's forward passes through the same model"
    return None


class ContrastSources:
    """Context manager: attach what ``strategy`` contrasts to ``model``; detach it exactly on exit.

    Args:
        model: the causal LM.
        strategy: the strategy.
        tokenizer: the model's tokenizer: tokenizes an amateur's text prefix, and gives degraded
            streams their token classes unless ``classifier`` is given.
        classifier: the token classes of degraded streams: a tokenizer, a
            :class:`~contrastive_decoding.TokenClassifier` or a callable.
        positions: ``"last"`` for decoding steps, ``"all"`` for teacher-forced scoring.
        keep_logits: record the model's own last-position logits of each forward (processors).

    Every argument is validated, and every layer resolved, before anything is attached.
    """

    def __init__(
        self,
        model: nn.Module,
        strategy: ContrastStrategy,
        tokenizer=None,
        classifier=None,
        positions: Literal["last", "all"] = "last",
        keep_logits: bool = False,
    ) -> None:
        strategy = as_strategy(strategy)
        self.model = model
        self.strategy = strategy
        self.readout = LayerReadout.from_model(model)
        layers = list(strategy.premature_layers(self.readout))
        self.layers = self.readout.check_layers(layers, "premature_layers") if layers else []
        degraded = strategy.degraded_streams(self.readout)
        spec = strategy.amateur_stream()
        name = type(strategy).__name__
        classifier = tokenizer if classifier is None else classifier
        if degraded and classifier is None:
            raise ValueError(
                f"{name} runs degraded streams and needs the token classes: pass the model's tokenizer "
                "(`tokenizer=`/`classifier=`), a TokenClassifier, or a callable mapping token ids to classes."
            )
        if spec is not None and degraded and spec.model in (None, model):
            raise ValueError(
                f"{name} combines degraded streams with an amateur of the same model; give the amateur "
                "its own model (`Amateur(model=...)`) or use one of the two."
            )
        if spec is not None and spec.model is model and spec.prefix is None and spec.replace is None:
            raise ValueError(
                f"{name}'s amateur is the model itself, reading the same tokens: every contrast would be "
                "0. Give a different (smaller) amateur model of the same tokenizer, or an instruction "
                "for the same model (e.g. LowerLayerFusion(amateur='prompt'), InducedContrast)."
            )
        self._exclusive = _exclusive_reason(degraded, spec is not None and spec.model in (None, model))
        self._check_alone()
        self.streams = (
            StreamRunner(
                model,
                classifier,
                degraded,
                mode=strategy.mode,
                bias=strategy.bias,
                query_rows=strategy.query_rows,
            )
            if degraded
            else None
        )
        self.num_streams = 1 + len(degraded)
        self.capture = LayerCapture(self.readout, self.layers, positions=positions) if self.layers else None
        self.amateur = None
        if spec is not None:
            amateur_model = spec.model if spec.model is not None else model
            amateur_layers = strategy.amateur_layers(self.readout.layout_of(amateur_model))
            self.amateur = AmateurRunner(spec, model, tokenizer, amateur_layers, positions=positions)
        source = strategy.entropy_source(self.readout)
        if source is not None:
            self.readout.check_layers([source.layer], "entropy_source")
        self.entropy = None if source is None else ContextEntropy(self.readout, source)
        self.keep_logits = keep_logits
        self.logits: torch.Tensor | None = None  # the model's own last-position logits
        # Which forward the recorded states come from (see ForwardRecord); forwards counted by start.
        self.forwards_started = 0
        self.last_forward: ForwardRecord | None = None
        self.attention_mask: torch.Tensor | None = None  # the last forward's mask
        self.fresh = self.uncached = False  # whether the last forward started from an empty / no cache
        self._stack: ExitStack | None = None
        self._handles: list[RemovableHandle] = []

    @property
    def attached(self) -> bool:
        return self._stack is not None

    def _check_alone(self) -> None:
        """Refuse to attach beside other attached sources when either side changes the forward
        passes the other records (before anything is attached, so the model stays as it was)."""
        others = [s for s in _ATTACHED if s.model is self.model and s is not self]
        clash = next((s for s in others if self._exclusive or s._exclusive), None)
        if clash is None:
            return
        mine, theirs = type(self.strategy).__name__, type(clash.strategy).__name__
        reason = f"{mine} {self._exclusive}" if self._exclusive else f"{theirs} {clash._exclusive}"
        raise ValueError(
            f"`model` already has {theirs} attached (a logits processor still referenced, or an open "
            f"`with` block), and {reason}, so the two cannot share it. Detach the other first "
            "(`processor.detach()`, or use each processor in its own `with` block, or drop the last "
            "reference to an inline processor), or combine the strategies in one WeightedContrast."
        )

    def __enter__(self) -> ContrastSources:
        if self._stack is not None:
            raise RuntimeError("These ContrastSources are already attached; use one `with` block at a time.")
        self._check_alone()
        stack = ExitStack()
        try:
            # Streams first: their hooks expand the batch before anything else sees it and cut the
            # output back to stream 0 before the logits hook below reads it.
            if self.streams is not None:
                stack.enter_context(self.streams)
            if self.capture is not None:
                stack.enter_context(self.capture)
            if self.entropy is not None:
                stack.enter_context(self.entropy)
            if self.amateur is not None:
                stack.enter_context(self.amateur)
            if self.amateur is not None or self.entropy is not None:
                self._handles.append(
                    self.model.register_forward_pre_hook(self._record_forward, with_kwargs=True)
                )
            if self.keep_logits:
                counter = self.model.register_forward_pre_hook(self._count_forward, with_kwargs=True)
                self._handles.append(counter)
                self._handles.append(
                    self.model.register_forward_hook(self._record_logits, with_kwargs=True)
                )
            stack.callback(self._remove_hooks)
            stack.callback(_ATTACHED.discard, self)
        except BaseException:
            self._remove_hooks()
            stack.close()
            raise
        self._stack = stack
        _ATTACHED.add(self)
        copy_clean(self.model)
        return self

    def __exit__(self, *exc_info: object) -> None:
        stack, self._stack = self._stack, None
        self.logits = None
        self.last_forward = None
        self.attention_mask = None
        if stack is not None:
            stack.close()
            if not any(s.model is self.model for s in _ATTACHED):
                stop_copy_clean(self.model)

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _record_forward(self, module, args, kwargs):
        if self.amateur is not None and self.amateur.running:  # the amateur's own forward (same model)
            return
        named = _by_name(module, args, kwargs)
        mask = named.get("attention_mask")
        self.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        cache = cache_from(named)
        self.uncached = cache is None
        self.fresh = cache is None or (hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0)
        if self.fresh and self.amateur is not None:
            # A forward from an empty cache starts new sequences (a new `generate` call with the
            # same processor, or uncached decoding): the amateur reads them from the start too.
            self.amateur._reset()

    def _count_forward(self, module, args, kwargs):
        if self.amateur is not None and self.amateur.running:  # the amateur's own forward (same model)
            return
        tokens = _by_name(module, args, kwargs).get("input_ids")
        if isinstance(tokens, torch.Tensor) and tokens.dim() == 2 and tokens.shape[1] == 0:
            raise ValueError("`input_ids` is empty: give a prompt of at least one token (e.g. BOS).")
        self.forwards_started += 1

    def _record_logits(self, module, args, kwargs, output):
        if self.amateur is not None and self.amateur.running:
            return
        logits = output["logits"] if isinstance(output, dict) else output[0]
        length = _sequence_length(_by_name(module, args, kwargs))
        record = ForwardRecord(self.forwards_started, threading.get_ident(), length, logits.shape[0])
        self.last_forward = record
        last = logits[:, -1, :].detach()
        # A copy only when the view would keep more than itself alive (a prompt's logits, or the
        # rows of degraded streams): at 262k vocabularies each (rows, V) copy is a step's peak.
        whole = last.untyped_storage().nbytes() == last.numel() * last.element_size()
        self.logits = last if whole and logits.shape[1] == 1 else last.clone()

    def clear(self) -> None:
        """Forget recorded states, logits and every row's context (hooks stay attached)."""
        self.logits = None
        self.last_forward = None
        if self.capture is not None:
            self.capture.clear()
        if self.amateur is not None:
            self.amateur._reset()
        if self.entropy is not None:
            self.entropy.reset()

    def states(self) -> torch.Tensor | None:
        """The declared layers' states of the last forward, ``(J, S, B, [T,] H)`` (stream-major rows)."""
        if self.capture is None:
            return None
        states = self.capture.stacked()
        return states.view(states.shape[0], self.num_streams, -1, *states.shape[2:])

    def stream_logits(self) -> torch.Tensor | None:
        """The degraded streams' logits of the last forward, ``(S, B, T, V)``."""
        return None if self.streams is None else self.streams.stacked()

    def step_inputs(self, final_logits: torch.Tensor, input_ids: torch.Tensor) -> ContrastInputs:
        """The inputs of one decoding step, after the model's forward over ``input_ids``.

        Args:
            final_logits: the model's own last-position logits, ``(B, V)`` float32.
            input_ids: every token of each row so far, ``(B, T)`` (the amateur reads the new ones).
        """
        # Read the main model's records before the amateur's forward, which may be the same model.
        states = self.states()
        streams = self.stream_logits()
        entropy = None
        if self.entropy is not None:
            entropy = self.entropy.step(input_ids, self.attention_mask, self.fresh, self.uncached)
        amateur_logits = amateur_states = None
        if self.amateur is not None:
            mask = self.attention_mask
            if mask is not None and mask.shape[0] != input_ids.shape[0]:
                mask = mask[: input_ids.shape[0]]
            amateur_logits, amateur_states = self.amateur.step(input_ids, mask)
        return ContrastInputs(
            final=final_logits,
            readout=self.readout,
            states=states,
            final_norm=self.strategy.final_norm,
            stream_logits=None if streams is None else streams[:, :, -1],
            amateur_logits=amateur_logits,
            amateur_readout=None if self.amateur is None else self.amateur.readout,
            amateur_states=amateur_states,
            context_entropy=entropy,
        )

    def scored_inputs(
        self, final: torch.Tensor, probe: dict, rows: torch.Tensor, positions: torch.Tensor
    ) -> ContrastInputs:
        """The inputs of scored positions, after a teacher-forced pass over whole rows.

        Args:
            final: the model's own logits at the scored positions, ``(P, V)`` float32.
            probe: what the pass recorded: ``states`` ``(J, S, B, T, H)``, ``streams``
                ``(S-1, B, T, V)``, ``amateur`` (logits ``(B, T, V)``, states ``(J', B, T, H)``) and
                ``entropy`` ``(B, T, V)``, any of them absent.
            rows, positions: the batch row and position of each scored position, ``(P,)``.
        """
        states, streams = probe.get("states"), probe.get("streams")
        amateur_logits, amateur_states = probe.get("amateur", (None, None))
        entropy = probe.get("entropy")
        return ContrastInputs(
            final=final,
            readout=self.readout,
            states=None if states is None else states[:, :, rows, positions],
            final_norm=self.strategy.final_norm,
            stream_logits=None if streams is None else streams[:, rows, positions],
            amateur_logits=None if amateur_logits is None else amateur_logits[rows, positions],
            amateur_readout=None if self.amateur is None else self.amateur.readout,
            amateur_states=None if amateur_states is None else amateur_states[:, rows, positions],
            context_entropy=None if entropy is None else entropy[rows, positions],
        )

def reads_whole_prompt(strategy: ContrastStrategy | None, readout: LayerReadout) -> bool:
    """Whether ``strategy`` attaches something that reads every prompt position in a pass of its
    own, so that a forward may not start from a cached primer: degraded streams and an amateur keep
    KV caches of their own, and a context entropy reads every position (what
    :class:`ContrastSources` attaches for these declarations)."""
    if strategy is None:
        return False
    return (
        bool(strategy.degraded_streams(readout))
        or strategy.amateur_stream() is not None
        or strategy.entropy_source(readout) is not None
    )
