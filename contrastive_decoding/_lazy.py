"""Module attributes imported on first use (PEP 562), for packages whose names pull in torch.

``import contrastive_decoding`` and the command line's ``--help`` stay fast: a name's module is
imported when the name is first read, not when the package is.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_exports(
    namespace: dict[str, Any], exports: Mapping[str, str], public: Iterable[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's ``__getattr__`` and ``__dir__`` for names defined in other modules.

    Args:
        namespace: the package's ``globals()``; a name is cached there once imported, so later
            reads skip ``__getattr__``.
        exports: public name -> the module that defines it.
        public: the package's ``__all__``.

    Returns:
        ``(__getattr__, __dir__)``, to assign at the package's top level.
    """
    package = namespace["__name__"]
    names = sorted(public)

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
