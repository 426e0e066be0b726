"""What a strategy declares it needs, as plain data: no hooks, no model code.

A strategy returns these from its declaration methods (:meth:`ContrastStrategy.premature_layers`,
``degraded_streams``, ``amateur_stream``, ``entropy_source``); a backend turns them into whatever
its engine runs (forward hooks and attention swaps in transformers, layer exits in vLLM).
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from contrastive_decoding.core.token_classes import TOKEN_CLASSES, class_index
from contrastive_decoding.core.validation import check_token_ids, check_usable_model

__all__ = [
    "Amateur",
    "ENTROPY_CONTEXTS",
    "EntropyContext",
    "EntropySource",
    "LayerSpec",
    "QUERY_ROWS",
    "SUPPRESSION_MODES",
    "SuppressionRule",
    "check_layer_indices",
    "resolve_layers",
]

SUPPRESSION_MODES = ("mask", "bias")
QUERY_ROWS = ("generated", "all")

LayerSpec = Sequence[int] | range | tuple[float, float]


def resolve_layers(spec: LayerSpec, num_layers: int, argument: str) -> list[int]:
    """Layer indices from explicit ints or a ``(start, end)`` pair of fractions of depth.

    Fractions map to ``round(start * N) .. round(end * N)`` inclusive (clamped to ``0..N-1``), so a
    range given for a 32-layer model, e.g. layers 4-20 as ``(4/32, 20/32)``, scales to any depth.

    Raises:
        ValueError: naming ``argument``: fractions outside ``[0, 1]`` or reversed, an empty list,
            or an index outside the model.
    """
    items = list(spec) if not isinstance(spec, (str, bytes)) else None
    if items is not None and len(items) == 2 and any(isinstance(x, float) for x in items):
        lo, hi = items
        if not (0.0 <= float(lo) <= float(hi) <= 1.0):
            raise ValueError(
                f"`{argument}`={tuple(items)} as fractions of depth must satisfy 0 <= start <= end <= 1; "
                f"or give explicit layer indices in 0..{num_layers - 1}."
            )
        first = min(round(float(lo) * num_layers), num_layers - 1)
        last = min(round(float(hi) * num_layers), num_layers - 1)
        return list(range(first, last + 1))
    if items is None:
        raise ValueError(
            f"`{argument}` must be a list of layer indices or a (start, end) pair of fractions, got {spec!r}."
        )
    return check_layer_indices(items, num_layers, argument=argument)


@dataclass(frozen=True)
class SuppressionRule:
    """Suppress attention to tokens of ``classes`` in ``layers``.

    Args:
        classes: token class names or indices (see
            :data:`~contrastive_decoding.core.token_classes.TOKEN_CLASSES`).
        layers: decoder block indices (``layer_idx``), validated against the model when used.
        gate: eager attention only: suppress a query row only where its head-averaged attention mass
            on these classes' keys exceeds ``gate`` (LayerCake gates concept suppression at 0.05).
    """

    classes: tuple[int, ...]
    layers: tuple[int, ...]
    gate: float | None = None

    def __init__(self, classes: Iterable[str | int] | str, layers: Iterable[int], gate: float | None = None):
        names = [classes] if isinstance(classes, (str, int)) else list(classes)
        if not names:
            raise ValueError(f"`classes` is empty; give at least one of {TOKEN_CLASSES}.")
        object.__setattr__(self, "classes", tuple(sorted({class_index(c) for c in names})))
        object.__setattr__(self, "layers", tuple(layers))
        if gate is not None and not (isinstance(gate, (int, float)) and 0.0 <= gate < 1.0):
            raise ValueError(f"`gate` must be None or an attention mass in [0, 1), got {gate!r}.")
        object.__setattr__(self, "gate", None if gate is None else float(gate))


def check_layer_indices(
    layers: list[int], num_layers: int, argument: str = "layers", model_name: str = "model"
) -> list[int]:
    """Validate premature-layer indices (``0 <= j < N``) and return them as a list of ints.

    Raises:
        ValueError: naming ``argument`` and the valid range when the list is empty, holds a
            non-integer, or a layer is out of range.
    """
    n = num_layers
    layers = list(layers)
    if not layers:
        raise ValueError(f"`{argument}` is empty; give at least one layer index in 0..{n - 1}.")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ValueError(
                f"`{argument}` must hold integer layer indices, got {layer!r} "
                f"({type(layer).__name__}); valid indices are 0..{n - 1}."
            )
        if not 0 <= layer < n:
            raise ValueError(
                f"`{argument}` has layer {layer}, outside 0..{n - 1} for this {n}-layer {model_name}; "
                f"0 is the embedding output and {n} is the mature layer, which is always used."
            )
    return layers


EntropyContext = Literal["prompt", "all"]
ENTROPY_CONTEXTS = ("prompt", "all")


@dataclass(frozen=True)
class EntropySource:
    """What a strategy's context entropy is computed from.

    Attributes:
        layer: the state entering block ``layer`` (``output_hidden_states[layer]``).
        context: ``"prompt"``: the prompt's tokens only, fixed for a whole generation; ``"all"``:
            every token up to and including the current one (prompt and generated tokens).
        final_norm: apply the final norm (and soft-capping) before the head.
    """

    layer: int
    context: EntropyContext = "prompt"
    final_norm: bool = False


class Amateur:
    """What the amateur stream reads and which model runs it.

    Args:
        model: the amateur model (same tokenizer as the main model); ``None`` runs the main model.
        prefix: an instruction placed before the context of every row (after a BOS token, if the
            row starts with one), as text (tokenized with the main tokenizer, no special tokens) or
            token ids. ``None``: the amateur reads exactly the main model's tokens.
        tokenizer: the amateur model's tokenizer, checked against the main one when both are known.
        replace: text (or token ids) that every main row starts with (after a BOS token) and that
            the amateur does not read: an instruction meant for the main stream only (LOL's
            truthfulness refocus). The amateur reads ``prefix`` in its place.
        prefix_argument, replace_argument: the names the caller gave ``prefix`` and ``replace``
            (e.g. ICD's ``instruction``), used in error messages.

    Token ids (a list or a 1-D integer tensor) must be >= 0; they are checked against the models'
    vocabularies when the amateur meets them.

    Example:
        >>> from contrastive_decoding import Amateur
        >>> Amateur(prefix="Answer with a plausible falsehood.\\n").prefix
        'Answer with a plausible falsehood.\\n'
    """

    def __init__(
        self,
        model: Any = None,
        prefix: str | Sequence[int] | None = None,
        tokenizer=None,
        replace: str | Sequence[int] | None = None,
        *,
        prefix_argument: str = "prefix",
        replace_argument: str = "replace",
    ) -> None:
        if model is None and prefix is None and replace is None:
            raise ValueError(
                "An Amateur needs `model=` (a smaller model with the same tokenizer) or `prefix=` (an "
                "instruction for the same model); with neither it would equal the model itself."
            )
        if model is not None:
            check_usable_model(model, "model")
        self.model = model
        # The names the user gave these under (e.g. ICD's `instruction`), for error messages.
        self.prefix_argument = prefix_argument
        self.replace_argument = replace_argument
        self.prefix = check_text(prefix, prefix_argument)
        self.replace = check_text(replace, replace_argument)
        self.tokenizer = tokenizer

    def __repr__(self) -> str:
        model = None if self.model is None else type(self.model).__name__
        return f"Amateur(model={model}, prefix={self.prefix!r}, replace={self.replace!r})"


def check_text(value, argument: str, none_ok: bool = True):
    """An instruction as text or token ids (``None`` passes where ``none_ok``)."""
    if value is None:
        return None
    if isinstance(value, str):
        if not value:
            alternative = ", or None" if none_ok else " (or its token ids)"
            raise ValueError(f"`{argument}` is an empty string; give the instruction text{alternative}.")
        return value
    if isinstance(value, torch.Tensor):
        # An integer tensor of ids is ids; a float or bool tensor is refused below like a list of them.
        value = value.tolist() if value.dim() == 1 and not value.is_floating_point() else list(value)
    ids = list(value) if isinstance(value, Iterable) else []
    if not ids or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids):
        raise ValueError(f"`{argument}` must be a non-empty string or a non-empty list of token ids.")
    ids = [int(t) for t in ids]
    check_token_ids(ids, None, argument, "token ids are >= 0.")
    return ids
