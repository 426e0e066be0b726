"""The strategy registry: every strategy declared once, every front-end built from that.

A strategy registers itself where it is defined::

    @register_strategy("dola", presets={"dola-high": {"dola_layers": "high"}})
    class DoLa(ContrastStrategy):
        def __init__(self, dola_layers="high", relative_top=0.1, ...): ...

The class's ``__init__`` signature is the one declaration of its parameters: their names,
defaults and kinds (read from the annotations) feed the transformers logits processor and generate
loop, the harness's ``--strategy``/``--param``, lm-eval's ``model_args``, ``repr`` and the docs'
parameter tables. The registry holds what has been registered: importing
:mod:`contrastive_decoding.strategies` registers the library's own (the core imports no strategy).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contrastive_decoding.core.contract import ContrastStrategy, declared_parameters

__all__ = [
    "Parameter",
    "StrategyInfo",
    "as_strategy",
    "get_strategy",
    "load_strategy_modules",
    "make_strategy",
    "presets",
    "register_strategy",
    "registered_strategies",
    "resolve_strategy",
    "unregister_strategy",
]

_REGISTRY: dict[str, StrategyInfo] = {}
_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {}


@dataclass(frozen=True)
class Parameter:
    """One declared parameter of a strategy.

    Attributes:
        name: the ``__init__`` argument.
        default: its default (``None`` where it has none).
        required: it has no default.
        kind: ``"number"``, ``"int"`` or ``"bool"`` (``"?"`` appended where ``None`` is accepted)
            when the annotation is made of those types only, else ``None``.
        annotation: the annotation as written.
    """

    name: str
    default: Any
    required: bool
    kind: str | None
    annotation: str


@dataclass(frozen=True)
class StrategyInfo:
    """A registered strategy.

    Attributes:
        name: what ``--strategy`` (harness), ``strategy=`` (lm-eval) and ``make_strategy`` take.
        strategy_class: the :class:`~contrastive_decoding.ContrastStrategy` subclass.
        description: one line for listings.
        presets: preset name -> parameters (e.g. ``dola-high`` -> ``{"dola_layers": "high"}``).
        repetition_penalty: the generation repetition penalty its authors apply after the contrast
            (DoLa: 1.2); front-ends that decode by name use it by default.
    """

    name: str
    strategy_class: type[ContrastStrategy]
    description: str = ""
    presets: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    repetition_penalty: float = 1.2

    @property
    def parameters(self) -> dict[str, Parameter]:
        """The declared parameters, in ``__init__`` order."""
        return {
            name: Parameter(
                name,
                None if p.default is p.empty else p.default,
                p.default is p.empty,
                _annotation_kind(p.annotation),
                "" if p.annotation is p.empty else _annotation_text(p.annotation),
            )
            for name, p in declared_parameters(self.strategy_class).items()
        }

    @property
    def defaults(self) -> dict[str, Any]:
        """Parameter name -> default."""
        return {name: p.default for name, p in self.parameters.items()}

    @property
    def kinds(self) -> dict[str, str]:
        """Parameter name -> kind, for the parameters of a plain numeric or boolean kind."""
        return {name: p.kind for name, p in self.parameters.items() if p.kind is not None}

    def build(self, **params: Any) -> ContrastStrategy:
        """The strategy with ``params`` (validated by the class's ``__init__``)."""
        unknown = [k for k in params if k not in self.parameters]
        if unknown:
            valid = ", ".join(self.parameters) or "none"
            raise TypeError(
                f"{', '.join(f'`{k}`' for k in unknown)}: not a parameter of strategy {self.name!r}; "
                f"valid: {valid}."
            )
        return self.strategy_class(**params)


def register_strategy(
    name: str,
    *,
    presets: Mapping[str, Mapping[str, Any]] | None = None,
    description: str | None = None,
    repetition_penalty: float = 1.2,
    replace: bool = False,
) -> Callable[[type[ContrastStrategy]], type[ContrastStrategy]]:
    """Class decorator: register a :class:`~contrastive_decoding.ContrastStrategy` under ``name``.

    Args:
        name: the registry name (letters, digits, ``-`` and ``_``).
        presets: named parameter sets, e.g. ``{"dola-high": {"dola_layers": "high"}}``.
        description: one line for listings (default: the class docstring's first line).
        repetition_penalty: the generation repetition penalty applied after the contrast when the
            strategy is run by name (harness, lm-eval); 1.0 for none.
        replace: allow replacing an existing registration of ``name`` (or of a preset name).

    Raises:
        ValueError: a malformed or taken name, or a class that is not a ContrastStrategy.

    Example:
        >>> from contrastive_decoding import ContrastStrategy, register_strategy, make_strategy
        >>> @register_strategy("half-exit-doc", replace=True)
        ... class HalfExit(ContrastStrategy):
        ...     def __init__(self, weight: float = 1.0):
        ...         self.weight = weight
        ...     def premature_layers(self, layout):
        ...         return [layout.num_layers // 2]
        ...     def combine(self, x):
        ...         return x.final.log_softmax(-1) - self.weight * x.layers[0].log_softmax(-1)
        >>> make_strategy("half-exit-doc", weight=0.5)
        HalfExit(weight=0.5)
    """
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][\w-]*", name):
        raise ValueError(f"A strategy name must be letters, digits, '-' and '_', got {name!r}.")

    def decorate(strategy_class: type[ContrastStrategy]) -> type[ContrastStrategy]:
        if not (isinstance(strategy_class, type) and issubclass(strategy_class, ContrastStrategy)):
            raise ValueError(f"register_strategy({name!r}) decorates a ContrastStrategy subclass.")
        taken = [n for n in (name, *(presets or {})) if n in _REGISTRY or n in _PRESETS]
        taken = [n for n in taken if not _same_class(n, strategy_class)]
        if taken and not replace:
            raise ValueError(
                f"Strategy name(s) {', '.join(map(repr, taken))} are registered already; pick another "
                "name or pass `replace=True`."
            )
        doc = (strategy_class.__doc__ or "").strip().split("\n")[0]
        info = StrategyInfo(name, strategy_class, description or doc, dict(presets or {}), repetition_penalty)
        _REGISTRY[name] = info
        for preset, params in (presets or {}).items():
            _PRESETS[preset] = (name, dict(params))
        strategy_class.registry_name = name
        return strategy_class

    return decorate


def _same_class(name: str, strategy_class: type) -> bool:
    """Re-registering a class under its own names (a module reloaded) is not a clash."""
    base = _PRESETS[name][0] if name in _PRESETS else name
    info = _REGISTRY.get(base)
    return info is not None and info.strategy_class.__qualname__ == strategy_class.__qualname__


def unregister_strategy(name: str) -> None:
    """Remove a registered strategy and its presets (tests, notebooks)."""
    _REGISTRY.pop(name, None)
    for preset in [p for p, (base, _) in _PRESETS.items() if base == name]:
        del _PRESETS[preset]


def registered_strategies() -> dict[str, StrategyInfo]:
    """Every registered strategy, by name (the library's own and any registered since)."""
    return dict(_REGISTRY)


def presets() -> dict[str, tuple[str, dict[str, Any]]]:
    """Preset name -> (strategy name, parameters)."""
    return {k: (base, dict(params)) for k, (base, params) in _PRESETS.items()}


def get_strategy(name: str) -> StrategyInfo:
    """The registered strategy ``name``.

    Raises:
        KeyError: an unknown name; the message lists the valid names and presets.
    """
    if name not in _REGISTRY:
        raise KeyError(f"Unknown strategy {name!r}; valid: {', '.join(_valid_names())}.")
    return _REGISTRY[name]


def resolve_strategy(name: str, params: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """The strategy name and parameters behind a strategy or preset name.

    A preset's own parameters cannot be overridden (``dola-low`` with ``dola_layers="high"`` would
    run one thing under another's name): give the strategy's name instead.

    Raises:
        KeyError: an unknown name (the message lists the valid ones).
        ValueError: an override of a preset's own parameter.
    """
    params = dict(params or {})
    if name in _PRESETS:
        base, fixed = _PRESETS[name]
        clash = [k for k in params if k in fixed and params[k] != fixed[k]]
        if clash:
            raise ValueError(
                f"Preset {name!r} sets {', '.join(f'{k}={fixed[k]!r}' for k in clash)}; to run "
                f"{', '.join(f'{k}={params[k]!r}' for k in clash)}, use strategy {base!r} instead."
            )
        return base, {**fixed, **params}
    if name in _REGISTRY:
        return name, params
    raise KeyError(f"Unknown strategy {name!r}; valid: {', '.join(_valid_names())}.")


def make_strategy(name: str, **params: Any) -> ContrastStrategy:
    """Build a registered strategy (or preset) by name, e.g. ``make_strategy("dola-high")``."""
    base, full = resolve_strategy(name, params)
    return get_strategy(base).build(**full)


def as_strategy(strategy: ContrastStrategy | str) -> ContrastStrategy:
    """``strategy`` itself, or the registered strategy (or preset) of that name with its defaults.

    Raises:
        ValueError: neither a ContrastStrategy nor a registered name (the message lists them).
    """
    if isinstance(strategy, str):
        try:
            return make_strategy(strategy)
        except KeyError as exc:
            raise ValueError(f"`strategy`: {exc.args[0]}") from None
    if not isinstance(strategy, ContrastStrategy):
        raise ValueError(
            "`strategy` must be a ContrastStrategy (e.g. DoLa(), LayerCake()) or a registered name "
            f"such as 'dola-high', got {type(strategy).__name__}."
        )
    return strategy


def load_strategy_modules(names: Iterable[str]) -> list[str]:
    """Import modules that register strategies: dotted module names or ``.py`` files.

    This is how a strategy defined in the user's own file becomes a name for the command line
    (``contrastive-decoding --import my_strategy.py eval --strategy my-name``) and for lm-eval
    (``CONTRASTIVE_DECODING_STRATEGIES=my_strategy.py``).

    Returns:
        The names of the modules imported.

    Raises:
        ValueError: a file that does not exist or a module that cannot be imported, naming it.
    """
    loaded = []
    for name in names:
        name = name.strip()
        if not name:
            continue
        if name.endswith(".py") or os.sep in name or "/" in name:
            path = Path(name).expanduser()
            if not path.is_file():
                raise ValueError(f"Strategy module {name!r} is not a file; give a .py file or a module name.")
            module_name = f"contrastive_decoding_user_{path.stem}"
            if module_name not in sys.modules:
                spec = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module
                try:
                    spec.loader.exec_module(module)
                except BaseException:
                    del sys.modules[module_name]
                    raise
            loaded.append(module_name)
        else:
            try:
                importlib.import_module(name)
            except ImportError as exc:
                raise ValueError(f"Strategy module {name!r} cannot be imported: {exc}") from None
            loaded.append(name)
    return loaded


def _valid_names() -> list[str]:
    return sorted(_REGISTRY) + sorted(_PRESETS)


_NUMBER_TYPES = {"int", "float"}


def _annotation_text(annotation: Any) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def _annotation_kind(annotation: Any) -> str | None:
    """``"number"``, ``"int"`` or ``"bool"`` (``"?"`` appended when ``None`` is allowed) for an
    annotation made of those types only, e.g. ``"float | None"``; ``None`` for anything else."""
    if annotation is inspect.Parameter.empty:
        return None
    names = set(re.findall(r"[A-Za-z_][\w.]*", _annotation_text(annotation).replace("Optional", "None")))
    nullable = "?" if "None" in names else ""
    names.discard("None")
    if names == {"bool"}:
        return "bool" + nullable
    if names == {"int"}:
        return "int" + nullable
    if names and names <= _NUMBER_TYPES:
        return "number" + nullable
    return None
