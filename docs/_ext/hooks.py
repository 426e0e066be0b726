"""MkDocs hooks for the API reference.

The harness's sources live in the top-level folder ``eval/`` but install as
``contrastive_decoding.eval`` (a ``package-dir`` mapping in pyproject.toml), which griffe's static
analysis cannot see from the source tree. Before the build, a temporary folder is made whose
``contrastive_decoding`` links to every entry of the real package plus ``eval`` -> ``eval/``, and
mkdocstrings reads the sources from there: nothing is imported, so the build takes seconds.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from mkdocs.plugins import event_priority

_MADE: list[Path] = []


@event_priority(100)  # before mkdocstrings, which builds its handlers in its own on_config
def on_config(config, **kwargs):
    root = Path(config.config_file_path).resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix="cd-docs-src-"))
    _MADE.append(tmp)
    package = tmp / "contrastive_decoding"
    package.mkdir()
    for entry in (root / "contrastive_decoding").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    (package / "eval").symlink_to(root / "eval", target_is_directory=True)
    python = config.plugins["mkdocstrings"].config["handlers"].setdefault("python", {})
    python["paths"] = [str(tmp)]
    return config


def on_shutdown(**kwargs):
    while _MADE:
        shutil.rmtree(_MADE.pop(), ignore_errors=True)
