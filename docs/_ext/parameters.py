"""MkDocs hook: the strategy pages' parameter tables, made from the strategies' one declaration.

A page writes ``<!-- parameters: dola -->`` (a registered strategy's name) or
``<!-- parameters: contrastive_decoding.WeightedContrast -->`` (a strategy class that is not
registered) where the table goes; the marker is replaced by a Markdown table with one row per
parameter of the class's ``__init__`` (what :attr:`StrategyInfo.parameters
<contrastive_decoding.core.registry.StrategyInfo.parameters>` reads: name, default, kind) and its
description from the class docstring's ``Args:`` section, followed by a line on how the strategy is
registered (its name, presets and repetition penalty). A name the registry does not know, or a
parameter without an ``Args:`` entry, is a warning, so ``mkdocs build --strict`` fails on it.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from fractions import Fraction
from typing import Any

log = logging.getLogger("mkdocs.plugins.parameters")

MARKER = re.compile(r"^<!--\s*parameters:\s*(?P<name>[\w.-]+)\s*-->[ \t]*$", re.M)
_ROLE = re.compile(
    r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj|const):`(~?)([^`<]+?)(?:\s*<([^>]+)>)?`"
)
_ENTRY = re.compile(r"^(?P<name>\*{0,2}\w+)(?:\s*\([^)]*\))?:\s*(?P<text>.*)$")
_LONG = 48  # defaults longer than this are shown by the name of the constant that holds them


def _info(name: str):
    """The registered strategy ``name``, or a ``StrategyInfo`` made (not registered) for the class
    at the dotted path ``name``."""
    from contrastive_decoding.strategies import StrategyInfo, get_strategy

    if "." not in name:
        return get_strategy(name)
    module, _, attr = name.rpartition(".")
    strategy_class = getattr(importlib.import_module(module), attr)
    return StrategyInfo(strategy_class.__name__, strategy_class)


def _markdown(text: str) -> str:
    """A docstring fragment (reST-ish) as one line of Markdown fit for a table cell."""

    def role(match: re.Match) -> str:
        tilde, target, explicit = match.groups()
        target = (explicit or target).strip()
        return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"

    text = _ROLE.sub(role, " ".join(text.split()))
    text = text.replace("``", "`")
    # A `|` splits a table cell except inside a code span.
    parts = text.split("`")
    return "`".join(p if i % 2 else p.replace("|", "\\|") for i, p in enumerate(parts))


def args_section(strategy_class: type) -> dict[str, str]:
    """Argument name -> description, from the Google-style ``Args:`` of the class docstring."""
    doc = inspect.getdoc(strategy_class) or ""
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    except StopIteration:
        return {}
    indent = None
    entries: dict[str, list[str]] = {}
    current = None
    for line in lines[start + 1 :]:
        if line.strip() and not line.startswith(" "):
            break  # the next section (or prose) starts at the left margin
        if not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        indent = width if indent is None else indent
        match = _ENTRY.match(line.strip()) if width == indent else None
        if match:
            current = match["name"].lstrip("*")
            entries[current] = [match["text"]]
        elif current is not None:
            entries[current].append(line.strip())
    return {name: _markdown(" ".join(parts)) for name, parts in entries.items()}


def _number(value: float) -> str:
    """A fraction of depth as the docs write it (``25/32``) where that is exact and shorter to read
    than the decimal; otherwise the number itself."""
    if isinstance(value, float) and 0 < value < 1 and len(repr(value)) > 4:
        fraction = Fraction(value)
        if fraction.denominator <= 32 and 32 % fraction.denominator == 0:
            return f"{fraction.numerator * 32 // fraction.denominator}/32"
    return repr(value)


def _value(value: Any, strategy_class: type) -> str:
    """A default as Python source, shortened for a table cell (no backticks)."""
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, tuple) and value and all(isinstance(v, (int, float)) for v in value):
        return f"({', '.join(_number(v) for v in value)})"
    plain = isinstance(value, str) and '"' not in value and "\\" not in repr(value)
    text = f'"{value}"' if plain else repr(value)
    if len(text) > _LONG:
        module = vars(inspect.getmodule(strategy_class))
        constant = next((k for k, v in module.items() if k.isupper() and v is value), None)
        text = constant or f"{text[: _LONG - 4]}...{text[-1]}"
    return text


def _code(text: str) -> str:
    return f"`{text}`"  # a `|` inside a code span does not split a table cell


def _kind(parameter) -> str:
    if parameter.kind:
        kind = parameter.kind.rstrip("?")
        return f"{kind} or `None`" if parameter.kind.endswith("?") else kind
    return _code(parameter.annotation) if parameter.annotation else ""


def _registration(info, strategy_class: type) -> str:
    """How the strategy is reached by name, from the registry."""
    from contrastive_decoding.strategies import presets, registered_strategies

    registered = registered_strategies().get(info.name)
    if registered is None or registered.strategy_class is not strategy_class:
        return f"`{strategy_class.__name__}` is not registered by name: build it in Python, pass the object."
    name = info.name
    required = [p.name for p in info.parameters.values() if p.required]
    arguments = ", ".join([f'"{name}"', *(f"{r}=..." for r in required)])
    ways = [f"`make_strategy({arguments})`"]
    if not required:
        ways.append(
            f'`"{name}"` wherever a strategy is taken (`ContrastLogitsProcessor`, `strategy_generate`, '
            "`score_continuations`)"
        )
    ways += [f"the harness's `--strategy {name}`", f"lm-eval's `strategy={name}`"]
    text = f"Registered as `{name}`: {', '.join(ways)}"
    own = {preset: params for preset, (base, params) in presets().items() if base == name}
    if own:
        shown = [
            f"`{preset}` = " + ", ".join(_code(f"{k}={_value(v, strategy_class)}") for k, v in params.items())
            for preset, params in own.items()
        ]
        text += f"; presets: {'; '.join(shown)}"
    penalty = registered.repetition_penalty
    if penalty == 1:
        return text + ". Run by name, generation applies no repetition penalty."
    return text + f". Run by name, generation applies a repetition penalty of {penalty:g} after the contrast."


def parameter_table(name: str) -> str:
    """The Markdown table (and registration line) that replaces ``<!-- parameters: NAME -->``."""
    info = _info(name)
    cls = info.strategy_class
    described = args_section(cls)
    rows = ["| argument | default | kind | meaning |", "|---|---|---|---|"]
    for p in info.parameters.values():
        if p.name not in described:
            log.warning("parameters: %s: `%s` has no entry in the class docstring's Args:", name, p.name)
        default = "required" if p.required else _code(_value(p.default, cls))
        rows.append(f"| `{p.name}` | {default} | {_kind(p)} | {described.get(p.name, '')} |")
    footer = (
        "*kind*: what the harness's `--param` and lm-eval's `model_args` check a value against "
        "(`number`, `int`, `bool`); other parameters show their annotation."
    )
    return "\n".join(rows) + f"\n\n{_registration(info, cls)}\n\n{footer}\n"


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    def replace(match: re.Match) -> str:
        try:
            return parameter_table(match["name"])
        except (KeyError, ImportError, AttributeError) as exc:
            log.warning("%s: <!-- parameters: %s -->: %s", page.file.src_uri, match["name"], exc)
            return match[0]

    return MARKER.sub(replace, markdown)
