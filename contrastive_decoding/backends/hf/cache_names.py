"""The KV cache's name across transformers releases.

transformers 5.24 renamed the cache argument of every model's ``forward`` (and of
``generate``'s model kwargs) and the output field from ``past_key_values`` to ``cache``; the old
names still work until 5.40 but warn on every call. The library supports 4.57 onwards, so it reads
both names and passes whichever the model's ``forward`` declares. Likewise ``logits_to_keep``,
which not every model's ``forward`` takes, is passed only where it is declared.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["cache_argument", "cache_field", "cache_from", "cache_of_output", "logits_to_keep"]

# Newest first: a forward hook or model_kwargs dict of 5.24+ holds "cache".
_NAMES = ("cache", "past_key_values")


def cache_argument(model: nn.Module) -> str:
    """The keyword under which ``model.forward`` takes its KV cache (``"cache"`` from 5.24)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params and "past_key_values" not in params else "past_key_values"


def logits_to_keep(model: nn.Module, keep: int) -> dict[str, int]:
    """``{"logits_to_keep": keep}`` where ``model.forward`` takes it (only the last ``keep``
    positions go through the output head), else ``{}`` (all positions do)."""
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        return {"logits_to_keep": keep}
    return {}


def cache_field(output_class: type) -> str:
    """The name of the KV cache field of a ``generate`` output dataclass."""
    names = {f.name for f in dataclasses.fields(output_class)}
    return "cache" if "cache" in names else "past_key_values"


def cache_from(kwargs: Mapping[str, Any]) -> Any:
    """The KV cache among a forward's (or ``generate``'s) keyword arguments, ``None`` if absent."""
    for name in _NAMES:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None


def cache_of_output(output: Mapping[str, Any]) -> Any:
    """The KV cache a forward returned (read by key: the old attribute name warns on 5.24+)."""
    return cache_from(output)
