"""Copies of a model with a strategy attached come out clean.

While sources are attached, ``copy.deepcopy(model)`` would carry their hooks (and the swapped
attention implementation) into the copy, for good: a copy of a LayerCake model would run two rows per
forward with nothing left to detach them. :func:`copy_clean` gives the attached model a
``__deepcopy__`` that copies it as if nothing were attached: this library's hooks are left out of the
copy (the original keeps them, in their order) and the copy gets back the attention implementation
the model had.
"""

from __future__ import annotations

import copy
import weakref
from typing import Any

from torch import nn

__all__ = ["copy_clean", "stop_copy_clean"]

_PREFIX = "contrastive_decoding."
_SUPPRESSED_ATTENTION = "contrastive_decoding_"  # see suppression._NAME
_HOOK_TABLES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


def _is_ours(hook: Any) -> bool:
    return (getattr(hook, "__module__", None) or "").startswith(_PREFIX)


class _CleanCopier:
    """The model's ``__deepcopy__`` while sources are attached (an instance attribute)."""

    def __init__(self, model: nn.Module) -> None:
        self._model = weakref.ref(model)

    def __call__(self, memo: dict) -> nn.Module:
        model = self._model()
        saved: list[tuple[dict, dict]] = []
        del model.__dict__["__deepcopy__"]  # the copy below takes Python's own path
        try:
            for module in model.modules():
                ours = {
                    key
                    for table in (module._forward_hooks, module._forward_pre_hooks)
                    for key, hook in table.items()
                    if _is_ours(hook)
                }
                for name in _HOOK_TABLES:
                    table = getattr(module, name, None)
                    if isinstance(table, dict) and ours & table.keys():
                        saved.append((table, dict(table)))
                        for key in ours:
                            table.pop(key, None)
            clone = copy.deepcopy(model, memo)
        finally:
            for table, kept in saved:
                table.clear()
                table.update(kept)
            model.__dict__["__deepcopy__"] = self
        _restore_attention(clone)
        return clone


def _restore_attention(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if isinstance(impl, str) and impl.startswith(_SUPPRESSED_ATTENTION):
        model.set_attn_implementation(impl[len(_SUPPRESSED_ATTENTION):])


def copy_clean(model: nn.Module) -> None:
    """Make ``copy.deepcopy(model)`` leave out what this library attached (until
    :func:`stop_copy_clean`)."""
    if "__deepcopy__" not in model.__dict__:
        model.__dict__["__deepcopy__"] = _CleanCopier(model)


def stop_copy_clean(model: nn.Module) -> None:
    """Undo :func:`copy_clean` (the model's ``__dict__`` exactly as before)."""
    if isinstance(model.__dict__.get("__deepcopy__"), _CleanCopier):
        del model.__dict__["__deepcopy__"]
