"""Argument checks shared by every strategy, processor, generate loop and scoring entry point.

Each check raises a ``ValueError`` that names the argument, the accepted values and what was given,
so that a bad value is refused when it is passed, before anything is attached to a model, instead
of surfacing later as a torch error, a ``TypeError`` deep in the library or silently wrong (NaN)
scores.
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = [
    "FLOAT32_MAX",
    "check_flag",
    "check_int",
    "check_number",
    "check_token_ids",
    "check_usable_model",
    "model_vocab_size",
    "parse_param_pairs",
]

#: Scores are computed in float32: a parameter beyond this magnitude becomes ``inf`` there and
#: turns scores into ``inf``/``NaN``.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    def fmt(x: float) -> str:
        return f"{x:g}"

    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{fmt(low)}, {fmt(high)}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {fmt(low)}"
    if high is not None:
        return f"{'<' if high_open else '<='} {fmt(high)}"
    return ""


def check_number(
    name: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
    hint: str = "",
) -> float | None:
    """Validate a real-valued parameter and return it as a Python float.

    Accepts ints and floats (and NumPy scalars), not bools, strings or tensors; refuses NaN,
    ``±inf`` and magnitudes beyond float32's range (the library computes in float32).

    Args:
        name: the argument's name, as the caller spelled it.
        value: the value given.
        low, high: bounds of the accepted interval (``None``: unbounded).
        low_open, high_open: exclude the bound itself.
        allow_none: ``None`` is accepted (and returned).
        hint: a short note on typical values, added to the message.

    Raises:
        ValueError: ``"`name` must be a finite number >= 0 (hint), got nan."`` for a wrong type or a
            non-finite value; ``"`name` must be >= 0 (hint), got -1."`` for a value out of range.
    """
    if value is None and allow_none:
        return None
    interval = _interval(low, high, low_open, high_open)
    note = f" ({hint})" if hint else ""
    none_note = " or None" if allow_none else ""
    number = None
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, torch.Tensor)):
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float
            number = math.inf
    if number is None or not math.isfinite(number) or abs(number) > FLOAT32_MAX:
        what = f"a finite number {interval}".rstrip()
        if number is not None and math.isfinite(number):
            # Finite in Python but not in the float32 maths that uses it.
            note += f" (the scores are computed in float32, which holds |x| <= {FLOAT32_MAX:.3g})"
        raise ValueError(f"`{name}` must be {what}{none_note}{note}, got {_show(value)}.")
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if too_low or too_high:
        raise ValueError(f"`{name}` must be {interval}{note}, got {_show(value)}.")
    return number


def check_int(
    name: str,
    value: object,
    low: int | None = None,
    high: int | None = None,
    *,
    allow_none: bool = False,
    hint: str = "",
) -> int | None:
    """Validate an integer parameter (bounds inclusive) and return it as a Python int.

    Accepts Python and NumPy integers, not bools, floats (even ``2.0``) or strings.

    Raises:
        ValueError: ``"`name` must be an int >= 1 (hint), got 2.0."``.
    """
    if value is None and allow_none:
        return None
    interval = _interval(low, high, False, False)
    note = f" ({hint})" if hint else ""
    what = f"an int {interval}".rstrip() + (" or None" if allow_none else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"`{name}` must be {what}{note}, got {_show(value)}.")
    number = int(value)
    if (low is not None and number < low) or (high is not None and number > high):
        raise ValueError(f"`{name}` must be {what}{note}, got {number}.")
    return number


def check_flag(name: str, value: object, allow_int: bool = False) -> bool:
    """Validate a boolean parameter; ``allow_int`` also accepts 0 and 1 (arguments that were
    coerced with ``bool()`` before, kept valid)."""
    if isinstance(value, bool) or type(value).__name__ == "bool_":  # NumPy's bool too
        return bool(value)
    if allow_int and isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    raise ValueError(f"`{name}` must be True or False, got {_show(value)}.")


def _show(value: object) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return text if isinstance(value, (str, int, float, type(None))) else f"{text} ({type(value).__name__})"


def model_vocab_size(model: nn.Module) -> int | None:
    """The number of token ids ``model`` can read and score: the smaller of its input-embedding and
    output-head sizes (``None`` when it has neither)."""
    sizes = []
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if isinstance(getattr(emb, "weight", None), torch.Tensor):
        sizes.append(emb.weight.shape[0])
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if isinstance(getattr(head, "weight", None), torch.Tensor):
        sizes.append(head.weight.shape[0])
    return min(sizes) if sizes else None


def check_token_ids(ids: Iterable[int], vocab_size: int | None, argument: str, fix: str) -> None:
    """Refuse token ids outside ``0..vocab_size - 1`` (the model would raise an IndexError).

    Args:
        ids: the ids.
        vocab_size: the model's vocabulary size (``None``: only negative ids are refused).
        argument: what holds the ids, e.g. ``"continuations[1]"``.
        fix: how to fix it (appended to the message).
    """
    bad = next((t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)), None)
    if bad is None:
        return
    if vocab_size is None:
        raise ValueError(f"`{argument}` has token id {bad}; {fix}")
    raise ValueError(
        f"`{argument}` has token id {bad}, outside the model's vocabulary (ids 0..{vocab_size - 1}); {fix}"
    )


def _unbacked_meta(module: nn.Module) -> bool:
    """Whether ``module`` holds meta tensors of its own that nothing will fill in: accelerate's
    offloading (``device_map`` with "cpu"/"disk" offload) keeps weights on meta and loads them
    inside each forward through the module's ``_hf_hook``, which is fine."""
    own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return any(t.is_meta for t in own) and getattr(module, "_hf_hook", None) is None


def check_usable_model(model: object, argument: str = "model") -> None:
    """Refuse a model that cannot run forward passes here: not an ``nn.Module``, or with weights
    on the ``meta`` device (built under ``torch.device('meta')`` / ``init_empty_weights``)."""
    if not isinstance(model, nn.Module):
        raise ValueError(
            f"`{argument}` must be a causal LM (torch.nn.Module), got {type(model).__name__}; load it "
            "first, e.g. with AutoModelForCausalLM.from_pretrained(...) or contrastive_decoding.load_model."
        )
    if any(_unbacked_meta(module) for module in model.modules()):
        raise ValueError(
            f"`{argument}` ({type(model).__name__}) has weights on the 'meta' device (built under "
            "torch.device('meta') or init_empty_weights), so it cannot compute anything; load real "
            "weights first, e.g. with from_pretrained(...) or model.to_empty(device=...) and a state dict."
        )


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_path(name: str) -> bool:
    """Whether ``name`` can only be a local path, not a Hub id: it starts with ``/``, ``.``, ``~``
    or a drive letter, uses backslashes, or is not of the ``namespace/name`` form."""
    return (
        name.startswith(("/", ".", "~", "\\"))
        or bool(re.match(r"^[A-Za-z]:[\\/]", name))
        or "\\" in name
        or not _HUB_ID.match(name)
    )


def parse_param_pairs(pairs: Iterable[str] | None, option: str = "--param") -> dict[str, Any]:
    """Command-line ``["key=value", ...]`` into a dict (the harness's and ``serve``'s ``--param``).

    Values are read as JSON where they parse (``0.1``, ``true``, ``[14, 16]``), comma-separated
    integers as a list (``14,16``), else as strings; the strategy checks them when it is built.

    Raises:
        ValueError: an item without ``=`` or with an empty key.
    """
    params: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{option} {pair!r}: write it as NAME=VALUE, e.g. {option} dola_layers=high.")
        raw = raw.strip()
        if re.fullmatch(r"-?\d+(\s*,\s*-?\d+)+", raw):
            value: Any = [int(x) for x in raw.split(",")]
        else:
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
        params[key] = value
    return params
