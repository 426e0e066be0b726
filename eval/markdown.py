"""Markdown tables, as every command of the harness prints them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["markdown_grid"]


def markdown_grid(head: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table: the header, the rule, then one line per row of cells (newline-terminated)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"
