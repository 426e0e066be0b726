"""Errors the harness reports to users as one line (the CLI prints the message and exits with 2)."""

from __future__ import annotations

__all__ = ["DataError", "EvalError", "NonFiniteScoreError", "RunInterrupted", "RunLockedError"]


class EvalError(Exception):
    """A problem with the user's input: the message names the argument or file and the fix."""


class DataError(EvalError):
    """A benchmark data file is missing or malformed, or the Hub copy could not be loaded."""


class RunLockedError(EvalError):
    """Another live process writes the same run folder (or the same shard of it)."""


class NonFiniteScoreError(EvalError):
    """A strategy produced NaN or infinite scores during generation.

    Attributes:
        rows: the batch rows (positions in the batch of prompts) whose scores were not finite; the
            runner turns them into item ids.
        detail: what was found, e.g. ``"NaN in the step scores"``.
    """

    def __init__(self, rows: list[int], detail: str) -> None:
        super().__init__(f"rows {rows}: {detail}")
        self.rows = rows
        self.detail = detail


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C (a ``KeyboardInterrupt``, so code that catches that still does):
    the message says how many items are recorded and how to resume. The CLI prints it as one line
    and exits with 130."""
