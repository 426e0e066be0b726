"""MkDocs hooks for the API reference.

The harness's sources live in the top-level folder ``eval/`` but install as
``contrastive_decoding.eval`` (a ``package-dir`` mapping in pyproject.toml), which griffe's static
analysis cannot see from the source tree. Before the build, a temporary folder is made whose
``contrastive_decoding`` links to every entry of the real package plus ``eval`` -> ``eval/``, and
mkdocstrings reads the sources from there: nothing is imported, so the build takes seconds.

The package's ``__init__`` is lazy (PEP 562: a ``_EXPORTS`` table, name -> defining module, read by
``__getattr__``), which static analysis cannot follow either; the temporary folder gets, instead
of a link to it, an ``__init__.py`` written from that table with one ``from MODULE import NAME``
per public name, so that ``::: contrastive_decoding.DoLa`` resolves to
``contrastive_decoding.strategies.dola.DoLa``. The table is read by running the real ``__init__``
(it imports nothing but ``importlib``), so the two cannot drift.
"""

from __future__ import annotations

import ast
import runpy
import shutil
import tempfile
from pathlib import Path

from mkdocs.plugins import event_priority

_MADE: list[Path] = []


def static_init(init: Path) -> str:
    """The source of an eager ``__init__`` equivalent to the lazy one at ``init``."""
    lazy = runpy.run_path(str(init))
    exports: dict[str, str] = lazy["_EXPORTS"]
    docstring = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
    lines = [repr(docstring), "", f"__version__ = {lazy['__version__']!r}", ""]
    lines += [f"from {module} import {name}" for name, module in sorted(exports.items())]
    lines += ["", f"__all__ = {sorted(lazy['__all__'])!r}", ""]
    return "\n".join(lines)


@event_priority(100)  # before mkdocstrings, which builds its handlers in its own on_config
def on_config(config, **kwargs):
    root = Path(config.config_file_path).resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix="cd-docs-src-"))
    _MADE.append(tmp)
    package = tmp / "contrastive_decoding"
    package.mkdir()
    for entry in (root / "contrastive_decoding").iterdir():
        if entry.name not in ("__pycache__", "__init__.py"):
            (package / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    (package / "__init__.py").write_text(static_init(root / "contrastive_decoding" / "__init__.py"))
    (package / "eval").symlink_to(root / "eval", target_is_directory=True)
    python = config.plugins["mkdocstrings"].config["handlers"].setdefault("python", {})
    python["paths"] = [str(tmp)]
    return config


def on_shutdown(**kwargs):
    while _MADE:
        shutil.rmtree(_MADE.pop(), ignore_errors=True)
