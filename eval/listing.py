"""``contrastive-decoding list`` without importing torch: benchmarks, strategies and presets.

The benchmark definitions import without torch, so they are read live. The strategy registry is
not: registering a strategy imports its class, and the classes import torch (several seconds).
So the library's strategies and presets, as the harness lists them, are also kept in a generated
module, :mod:`contrastive_decoding.eval._strategy_catalog`, that ships with the package and is
read instead of the registry whenever nothing could have added a strategy:

- the registry is not loaded in this process (``--import`` and in-process callers load it, and
  whatever they registered must be listed);
- ``CONTRASTIVE_DECODING_STRATEGIES`` names no module;
- no installed package declares a ``contrastive_decoding.strategies`` entry point.

Otherwise the live registry is read (and torch imported). Refresh the catalog after changing a
strategy's name, description, parameters or presets::

    python -m contrastive_decoding.eval.listing

``tests/eval/test_cli_startup.py`` fails, naming that command, when the catalog and the registry
differ, and checks that both give the same listing.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable, Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

__all__ = [
    "CATALOG_FILE",
    "REFRESH_COMMAND",
    "Catalog",
    "listing_text",
    "live_catalog",
    "render_catalog",
    "stored_catalog",
    "uses_live_registry",
    "write_catalog",
]

#: The generated module holding the library's strategies and presets.
CATALOG_FILE = Path(__file__).with_name("_strategy_catalog.py")
#: The command that rewrites :data:`CATALOG_FILE` from the live registry.
REFRESH_COMMAND = "python -m contrastive_decoding.eval.listing"

# The environment variable and entry-point group through which other packages add strategies
# (contrastive_decoding/strategies/__init__.py; importing that module would import torch).
_ENVIRONMENT_VARIABLE = "CONTRASTIVE_DECODING_STRATEGIES"
_ENTRY_POINT_GROUP = "contrastive_decoding.strategies"
_REGISTRY_MODULE = "contrastive_decoding.strategies"

# A strategy: (name, description, ((parameter, repr of its default), ...)).
_Strategy = tuple[str, str, tuple[tuple[str, str], ...]]
# A preset: (name, strategy, ((parameter, value as `--param` writes it), ...)).
_Preset = tuple[str, str, tuple[tuple[str, str], ...]]
#: ``{"strategies": (...), "presets": (...)}``: what ``list`` prints of the registry, as text.
Catalog = dict[str, tuple[Any, ...]]


def live_catalog() -> Catalog:
    """The strategies and presets the harness accepts now, read from the registry (imports torch).

    Returns:
        The catalog, in the harness's order (the library's strategies, then the harness's own).
    """
    from contrastive_decoding.eval.strategies import PRESETS, STRATEGIES

    strategies: list[_Strategy] = [
        (s.name, s.description, tuple((k, repr(v)) for k, v in s.defaults.items()))
        for s in STRATEGIES.values()
    ]
    presets: list[_Preset] = [
        (name, base, tuple((k, str(v)) for k, v in params.items()))
        for name, (base, params) in PRESETS.items()
    ]
    return {"strategies": tuple(strategies), "presets": tuple(presets)}


def stored_catalog() -> Catalog:
    """The catalog generated from the library's registry (no torch import).

    Raises:
        RuntimeError: the generated module is missing (a broken install), naming the command
            that writes it.
    """
    try:
        module = importlib.import_module("contrastive_decoding.eval._strategy_catalog")
    except ImportError:
        raise RuntimeError(
            f"{CATALOG_FILE.name} is missing from the harness; reinstall contrastive-decoding, or run "
            f"`{REFRESH_COMMAND}` in a checkout."
        ) from None
    return {"strategies": module.STRATEGIES, "presets": module.PRESETS}


def uses_live_registry() -> bool:
    """Whether ``list`` must read the live registry: something in this process or installed could
    have added a strategy the stored catalog does not hold."""
    if _REGISTRY_MODULE in sys.modules:  # already paid for, and it holds what was registered here
        return True
    if any(m.strip() for m in os.environ.get(_ENVIRONMENT_VARIABLE, "").split(",")):
        return True
    return bool(list(entry_points(group=_ENTRY_POINT_GROUP)))


def render_catalog(catalog: Mapping[str, Iterable[Any]]) -> str:
    """The ``strategies:`` and ``presets:`` sections of the listing.

    Args:
        catalog: from :func:`live_catalog` or :func:`stored_catalog`.
    """
    lines = ["strategies:"]
    for name, description, defaults in catalog["strategies"]:
        params = ", ".join(f"{k}={v}" for k, v in defaults) or "no parameters"
        lines.append(f"  {name:<22} {description}")
        lines.append(f"  {'':<22} params: {params}")
    lines.append("presets:")
    for name, base, params in catalog["presets"]:
        lines.append(f"  {name:<22} = {base} " + " ".join(f"--param {k}={v}" for k, v in params))
    return "\n".join(lines) + "\n"


def _benchmarks_text() -> str:
    from contrastive_decoding.eval.benchmarks import BENCHMARKS

    lines = ["benchmarks:"]
    for b in BENCHMARKS.values():
        proto = f" [scoring: {b.default_protocol}]" if b.task == "score" else ""
        lines.append(f"  {b.name:<22} {b.description}{proto}")
        lines.append(f"  {'':<22} data: {b.source.describe()}")
    return "\n".join(lines) + "\n"


def listing_text(live: bool | None = None) -> str:
    """What ``contrastive-decoding list`` prints.

    Args:
        live: read the live registry (``True``), the stored catalog (``False``), or decide with
            :func:`uses_live_registry` (``None``).
    """
    if live is None:
        live = uses_live_registry()
    if live:
        catalog = live_catalog()
    else:
        try:
            catalog = stored_catalog()
        except RuntimeError:  # a broken install without the catalog: the registry still answers
            catalog = live_catalog()
    return _benchmarks_text() + render_catalog(catalog)


def _catalog_source(catalog: Catalog) -> str:
    def block(name: str, rows: Iterable[Any]) -> list[str]:
        return [f"{name} = (", *(f"    {row!r}," for row in rows), ")"]

    return "\n".join(
        [
            '"""The library\'s strategies and presets as `contrastive-decoding list` prints them.',
            "",
            f"Generated from the registry by `{REFRESH_COMMAND}`; do not edit.",
            "Read instead of the registry (which imports torch) when nothing else registers",
            "strategies: see :mod:`contrastive_decoding.eval.listing`.",
            '"""',
            "# ruff: noqa: E501",
            "",
            *block("STRATEGIES", catalog["strategies"]),
            "",
            *block("PRESETS", catalog["presets"]),
            "",
        ]
    )


def write_catalog(path: Path | None = None) -> Path:
    """Write the catalog module from the live registry (imports torch).

    Only the library's own strategies belong in it: strategies from ``--import`` modules, the
    environment variable or other packages' entry points would make the stored catalog list them
    where they are not installed.

    Args:
        path: where to write (default: :data:`CATALOG_FILE`).

    Returns:
        The path written.

    Raises:
        RuntimeError: ``CONTRASTIVE_DECODING_STRATEGIES`` names modules or another package
            declares strategies (unset it, or run in an environment without that package).
    """
    if any(m.strip() for m in os.environ.get(_ENVIRONMENT_VARIABLE, "").split(",")):
        raise RuntimeError(
            f"unset {_ENVIRONMENT_VARIABLE} before writing the catalog of the library's strategies."
        )
    plugins = [ep.value for ep in entry_points(group=_ENTRY_POINT_GROUP)]
    if plugins:
        raise RuntimeError(
            f"installed packages add strategies ({', '.join(plugins)}); write the catalog in an "
            "environment without them."
        )
    path = CATALOG_FILE if path is None else Path(path)
    text = _catalog_source(live_catalog())
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)  # a reader never sees half a module
    return path


if __name__ == "__main__":
    print(f"wrote {write_catalog()}")
