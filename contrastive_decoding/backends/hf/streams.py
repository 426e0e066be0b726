"""Several streams of the same sequences as row groups of one batch, inside any forward pass.

:class:`StreamBatch` makes every forward of the model run ``S`` copies of each row (stream ``s`` is
rows ``s*B .. s*B+B-1``): the weights are read once per step for all streams, and each stream keeps
its own rows of the KV cache. Callers (stock ``generate``, a custom loop, scoring) keep seeing ``B``
rows: the model's output is cut back to stream 0 and the other streams' logits are kept aside.
:class:`StreamRunner` adds the :class:`~contrastive_decoding.AttentionSuppression` that makes
streams ``1..S-1`` degraded copies of stream 0.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from contrastive_decoding.backends.hf.cache_names import cache_from
from contrastive_decoding.backends.hf.suppression import AttentionSuppression
from contrastive_decoding.core.specs import SuppressionRule

__all__ = ["StreamBatch", "StreamRunner"]

# Forward arguments with a batch dimension that every stream needs its own copy of.
_BATCHED_KWARGS = ("input_ids", "attention_mask", "position_ids", "token_type_ids", "inputs_embeds")


def _cache_rows(cache) -> int | None:
    for layer in getattr(cache, "layers", None) or []:
        keys = getattr(layer, "keys", None)
        if isinstance(keys, torch.Tensor) and keys.numel():
            return keys.shape[0]
    return None


def _by_name(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """Forward arguments as one dict, positional ones bound to their names."""
    if not args:
        return dict(kwargs)
    signature = inspect.signature(module.forward)
    named = {}
    for name, value in signature.bind_partial(*args, **kwargs).arguments.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return named


class StreamBatch:
    """Context manager: run ``num_streams`` copies of each row in every forward of ``model``.

    Args:
        model: the causal LM.
        num_streams: streams per row (``>= 1``).

    Attributes:
        logits: the last forward's logits of all streams, ``(S, B, T, V)``.
    """

    def __init__(self, model: nn.Module, num_streams: int) -> None:
        if not isinstance(num_streams, int) or num_streams < 1:
            raise ValueError(f"`num_streams` must be a positive int, got {num_streams!r}.")
        self.model = model
        self.num_streams = num_streams
        self.logits: torch.Tensor | None = None
        self._handles: list[RemovableHandle] = []
        self._rows = 0

    def __enter__(self) -> StreamBatch:
        if self._handles:
            raise RuntimeError("This StreamBatch is already active; use one `with` block at a time.")
        self._handles.append(self.model.register_forward_pre_hook(self._expand, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._split))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.logits = None

    def _expand(self, module, args, kwargs):
        kwargs = _by_name(module, args, kwargs)
        args = ()
        ids = kwargs.get("input_ids")
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        rows = ids.shape[0]
        total = rows * self.num_streams
        cache = cache_from(kwargs)
        if "Static" in type(cache).__name__:  # StaticCache, StaticSlidingWindowCache, ...
            raise ValueError(
                "Degraded streams run as extra rows of the KV cache, which a static cache "
                "(`cache_implementation='static'`) cannot hold: its rows are fixed to the batch size. "
                "Use the default dynamic cache."
            )
        cached = _cache_rows(cache)
        if cached is not None and cached != total:
            raise RuntimeError(
                f"The KV cache has {cached} rows but {self.num_streams} streams of {rows} rows need {total}; "
                "multi-stream decoding supports greedy search and sampling with a cache it builds itself "
                "(no beam search, no pre-filled or static cache)."
            )
        for name in _BATCHED_KWARGS:
            value = kwargs.get(name)
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
                kwargs[name] = value.repeat(self.num_streams, *([1] * (value.dim() - 1)))
        self._rows = rows
        return args, kwargs

    def _split(self, module, args, output):
        logits = output["logits"]
        rows = self._rows
        self.logits = logits.view(self.num_streams, rows, *logits.shape[1:])
        output["logits"] = logits[:rows]
        for name in ("hidden_states", "attentions"):
            value = output.get(name) if hasattr(output, "get") else None
            if value is not None:
                output[name] = tuple(t[:rows] for t in value)
        return output


class StreamRunner:
    """Stream 0 intact plus degraded streams with attention suppression, as one context manager.

    Args:
        model: the causal LM (sdpa or eager attention).
        classifier: the tokenizer, a :class:`~contrastive_decoding.TokenClassifier` or a callable.
        degraded: for each degraded stream, its suppression rules.
        mode, bias, query_rows: see :class:`~contrastive_decoding.AttentionSuppression`.
    """

    def __init__(
        self,
        model: nn.Module,
        classifier,
        degraded: Sequence[Sequence[SuppressionRule]],
        mode: str = "mask",
        bias: float = -100.0,
        query_rows: str = "generated",
    ) -> None:
        if not degraded:
            raise ValueError("`degraded` is empty; give the suppression rules of at least one stream.")
        streams = [[]] + [list(rules) for rules in degraded]  # stream 0 stays intact
        self.suppression = AttentionSuppression(
            model, classifier, streams, mode=mode, bias=bias, query_rows=query_rows
        )
        self.batch = StreamBatch(model, 1 + len(degraded))

    @property
    def attached(self) -> bool:
        return self.suppression.attached

    def __enter__(self) -> StreamRunner:
        self.batch.__enter__()
        try:
            self.suppression.__enter__()
        except BaseException:
            self.batch.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self.suppression.__exit__()
        finally:
            self.batch.__exit__()

    def stacked(self) -> torch.Tensor:
        """The degraded streams' logits of the last forward, ``(S-1, B, T, V)``."""
        if self.batch.logits is None:
            raise RuntimeError("No forward pass has run inside the streams yet.")
        return self.batch.logits[1:]
