"""Markdown tables, as every command of the harness prints them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["markdown_grid"]


def markdown_grid(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table: the header, the rule, then one line per row of cells (newline-terminated).

    A ``|`` inside a cell is escaped and a line break becomes a space, so that a label holding
    either (a parameter's value, a path) stays in its cell.
    """
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return " ".join(str(text).splitlines()).replace("|", "\\|")
