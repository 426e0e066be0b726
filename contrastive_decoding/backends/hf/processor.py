"""Contrast strategies as `LogitsProcessor`s for stock ``model.generate``.

:class:`ContrastLogitsProcessor` attaches what its strategy declares (see
:class:`~contrastive_decoding.ContrastSources`) when it is built: hooks that record the declared
layers' last-position states during each step's forward, degraded streams run as extra rows of each
forward, an amateur stream run beside it. ``__call__`` hands them to the strategy with the model's
own logits and returns the contrasted scores.
"""

from __future__ import annotations

import threading
import warnings
import weakref

import torch
from torch import nn
from transformers import LogitsProcessor

from contrastive_decoding.backends.hf.sources import ContrastSources
from contrastive_decoding.core.contract import ContrastStrategy
from contrastive_decoding.strategies import as_strategy

__all__ = ["ContrastLogitsProcessor", "LayerContrastLogitsProcessor", "StreamContrastLogitsProcessor"]


class ContrastLogitsProcessor(LogitsProcessor):
    """Apply any :class:`~contrastive_decoding.ContrastStrategy` inside stock ``model.generate``.

    What the strategy declares is attached when the processor is built (after every argument is
    validated) and removed by :meth:`detach`, on leaving a ``with`` block, or, for a processor
    passed inline (``logits_processor=[DoLaLogitsProcessor(model)]``), as soon as nothing references
    it any more: the model's hooks never hold the processor itself. Each way leaves the model exactly
    as it was. While a processor with degraded streams or a same-model amateur is attached, no other
    strategy may attach to that model (a clear ``ValueError`` says which one to detach).

    The mature logits are the model's own, recorded by a hook; tokens that
    earlier processors set to ``-inf`` (``min_new_tokens``, ``bad_words_ids``) stay ``-inf``.
    Processors that should act on the contrasted scores (DoLa's repetition penalty) go after it:
    pass them in ``logits_processor=`` after this one rather than as ``repetition_penalty=``.
    Strategies with only layers work with greedy search, sampling and beam search; degraded streams
    and amateurs keep a cache row per sequence, so beam search is refused with a clear error.

    Args:
        model: the causal LM that ``generate`` runs.
        strategy: the strategy, e.g. :class:`~contrastive_decoding.DoLa` or a user subclass, or a
            registered name or preset (``"dola-high"``).
        tokenizer: the model's tokenizer, for strategies with degraded streams (token classes) or
            an amateur with a text prefix.
        classifier: token classes for degraded streams, if not the tokenizer's: a
            :class:`~contrastive_decoding.TokenClassifier` or a callable mapping token ids to classes.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList
        >>> from contrastive_decoding import ContrastLogitsProcessor, VistaLogits
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=4, num_attention_heads=2, pad_token_id=0)).eval()
        >>> with ContrastLogitsProcessor(model, VistaLogits()) as vista:
        ...     out = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=4, do_sample=False,
        ...         logits_processor=LogitsProcessorList([vista]))
        >>> out.shape
        torch.Size([1, 7])
    """

    supports_continuous_batching = False

    def _check_call(self, input_ids: torch.Tensor, scores: torch.Tensor) -> None:
        """Refuse a step that is not the last position of this model's latest forward, in this
        thread: the recorded states would belong to another model, call, position or thread."""
        name, model = type(self).__name__, type(self.sources.model).__name__
        if not self.attached:
            raise RuntimeError(f"{name} was detached; build a new one (or use it inside its `with` block).")
        record = self.sources.last_forward
        if record is None or record.index == self._consumed:
            raise ValueError(
                f"{name}: no forward pass of the model it was built for ({model}) ran since its last "
                "step, so it has nothing of this step to contrast. Either `generate` runs another model "
                "(build the processor for that model), or it scores candidate tokens outside the "
                "model's forward (assisted generation `assistant_model=`, prompt lookup "
                "`prompt_lookup_num_tokens=`: not supported; decode without them), or the forward runs "
                "where the processor's hooks cannot see it (a torch.compile'd model: build the "
                "processor for the uncompiled model)."
            )
        if record.thread != threading.get_ident() or self.sources.forwards_started != record.index:
            raise RuntimeError(
                f"{name}: another forward pass of {model} ran between this step's forward and this "
                "call, e.g. two threads generating with the model at once. A processor records every "
                "forward of its model: generate from one thread at a time, or give each thread its "
                "own model (copy.deepcopy(model), then a processor for each copy)."
            )
        if record.rows != scores.shape[0]:
            raise RuntimeError(
                f"{name}: the last forward pass had {record.rows} rows but `scores` has "
                f"{scores.shape[0]}; the processor must be used in `generate` of the model it was built "
                "for, without `low_memory=True` (which splits the batch into several forwards)."
            )
        if record.length is not None and input_ids.shape[1] != record.length:
            raise ValueError(
                f"{name}: this step predicts from {input_ids.shape[1]} tokens, but the last forward "
                f"of {model} ended at {record.length}: `generate` is verifying several candidate "
                "tokens per forward (assisted generation `assistant_model=`, prompt lookup "
                "`prompt_lookup_num_tokens=`), which a contrast of the last position cannot follow. "
                "Decode without them."
            )
        self._consumed = record.index

    def _finish(self, scores: torch.Tensor, mature: torch.Tensor, contrasted: torch.Tensor) -> torch.Tensor:
        if mature is scores:
            return contrasted.to(scores.dtype)
        # Hard masks set by earlier processors (min_new_tokens, bad_words_ids, ...) still hold.
        return torch.where(scores == -torch.inf, -torch.inf, contrasted).to(scores.dtype)

    def _mature_logits(self, raw: torch.Tensor | None, scores: torch.Tensor) -> torch.Tensor:
        """The model's own logits when earlier processors only masked tokens or shifted rows.

        That makes the contrast identical to the reference, where such processors run after it
        (a -inf mask would otherwise renormalise the mature distribution). If earlier processors
        changed the scores otherwise (e.g. ``repetition_penalty=`` given to ``generate``), their
        output is contrasted instead, with a warning about the order. On an accelerator the choice
        is made on the device and the warning comes a step late, so no step waits for the host.
        """
        if raw is None or raw.shape != scores.shape:
            return scores
        raw = raw.to(device=scores.device, dtype=torch.float32)
        finite = scores > -torch.inf
        shift = scores.float() - raw
        highest = torch.where(finite, shift, -torch.inf).amax(-1)
        lowest = torch.where(finite, shift, torch.inf).amin(-1)
        only_masked = (highest - lowest <= 1e-4 * (1.0 + raw.abs().amax(-1))).all()
        if scores.device.type != "cpu":
            self._check_order_later(only_masked)
            return torch.where(only_masked, raw, scores.float())
        if bool(only_masked):
            return raw
        self._warn_order()
        return scores

    def _warn_order(self) -> None:
        if not self._warned_order:
            self._warned_order = True
            warnings.warn(
                f"Logits processors before {type(self).__name__} changed the scores it contrasts "
                "(e.g. `repetition_penalty=` passed to generate). To apply them to the contrasted "
                "scores, as DoLa does, pass them in `logits_processor=` after this processor.",
                stacklevel=4,
            )

    def _check_order_later(self, only_masked: torch.Tensor) -> None:
        """Read an earlier step's flag once its copy to the host has landed (never waiting)."""
        if self._warned_order:
            return
        if only_masked.device.type != "cuda":  # other accelerators: read it at once
            if not bool(only_masked):
                self._warn_order()
            return
        if self._order_flag is not None and self._order_flag[1].query():
            flag, _ = self._order_flag
            self._order_flag = None
            if not bool(flag):
                self._warn_order()
                return
        if self._order_flag is None:
            flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            flag.copy_(only_masked, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._order_flag = (flag, event)

    def __init__(
        self, model: nn.Module, strategy: ContrastStrategy | str, tokenizer=None, classifier=None
    ) -> None:
        strategy = as_strategy(strategy)
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            raise ValueError(
                "`model` is a torch.compile'd wrapper, whose forward the processor's hooks do not see; "
                "build the processor for the model itself (`model._orig_mod`) and generate with it."
            )
        self.strategy = strategy
        self.sources = ContrastSources(
            model, strategy, tokenizer, classifier, positions="last", keep_logits=True
        )
        self.readout = self.sources.readout
        self.layers = self.sources.layers
        self._layer_ids = torch.tensor(self.layers, dtype=torch.long)
        self._chosen: list[torch.Tensor] = []
        self._last_call: tuple[int, int] | None = None  # (rows, length) of the previous call
        self._consumed = 0  # the index of the last forward a step has used (see _check_call)
        self._warned_order = False
        self._order_flag: tuple[torch.Tensor, object] | None = None  # see _check_order_later
        self.sources.__enter__()
        # The model's hooks hold the sources, never the processor, so a processor passed inline
        # (no `with`) is collected once `generate` returns and nothing references it: this then
        # detaches it. `atexit=False`: at interpreter exit the model goes too.
        self._detach = weakref.finalize(self, ContrastSources.__exit__, self.sources)
        self._detach.atexit = False

    @property
    def attached(self) -> bool:
        return self.sources.attached

    def __deepcopy__(self, memo: dict):
        # A copy would hold the same hooks on the same model: two processors recording one model.
        raise TypeError(
            f"{type(self).__name__} cannot be copied: it is attached to its model. Build a new one "
            "(for a copied model: copy the model, then build a processor for the copy)."
        )

    def __reduce_ex__(self, protocol: int):
        raise TypeError(
            f"{type(self).__name__} cannot be pickled: it holds hooks on a live model. Save the "
            "strategy (e.g. `processor.strategy`) and build a processor where it is loaded."
        )

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self._check_call(input_ids, scores)
        raw = self.sources.logits
        mature = self._mature_logits(raw, scores)
        inputs = self.sources.step_inputs(mature.float(), input_ids)
        out = self.strategy.step(inputs)
        self._record_choice(input_ids, out.chosen)
        return self._finish(scores, mature, out.scores)

    def _record_choice(self, input_ids: torch.Tensor, chosen: torch.Tensor | None) -> None:
        rows, length = input_ids.shape
        # Within one `generate` call each step sees the same rows and one more token; any other
        # call starts a new generation, whose history replaces the previous one.
        if self._last_call != (rows, length - 1):
            self._chosen.clear()
        self._last_call = (rows, length)
        if chosen is not None:
            self._chosen.append(chosen)  # positions in self.layers, mapped when read (no sync here)

    @property
    def chosen_layers(self) -> torch.Tensor:
        """Layer used at each step for each row, ``(steps, rows)``, for strategies that choose one.

        The history covers the latest ``generate`` call (a call whose input is not the previous
        step's plus one token starts a new one, at any batch size) since the last :meth:`reset`;
        ``(0, 0)`` when empty. Under beam search the rows are the ``batch * num_beams`` beams alive
        at each step, not the final sequences.
        """
        if not self._chosen:
            return torch.empty(0, 0, dtype=torch.long)
        return self._layer_ids[torch.stack(self._chosen).cpu()]

    def reset(self) -> None:
        """Forget the layer history and recorded states, e.g. between two ``generate`` calls."""
        self._chosen.clear()
        self._last_call = None
        self.sources.clear()

    def detach(self) -> None:
        """Detach everything; the model is left exactly as it was before the processor was built.

        Optional for a processor passed inline to ``generate``: it detaches itself once it is no
        longer referenced. Calling it again does nothing.
        """
        self._detach()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.detach()


# The pre-0.2 names of the twin processors: one processor runs every strategy now.
LayerContrastLogitsProcessor = ContrastLogitsProcessor
StreamContrastLogitsProcessor = ContrastLogitsProcessor
