"""Per-item records: JSON lines appended and synced as each item completes, read back to resume.

A run killed mid-write leaves at most a truncated last line (every record is written as one
``write`` of a line that contains no raw newline); :func:`repair_tail` cuts it off before the
file is appended to again, and :func:`read_records` skips it, so no item is lost or duplicated.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["RecordWriter", "item_files", "read_records", "repair_tail"]


def repair_tail(path: Path) -> int:
    """Cut a truncated last line (no final newline) off ``path``; return the bytes removed."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with open(path, "rb+") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # Scan back for the last complete line; files are small enough to read in blocks.
        pos = size
        keep = 0
        while pos > 0:
            step = min(1 << 16, pos)
            pos -= step
            f.seek(pos)
            block = f.read(step)
            nl = block.rfind(b"\n")
            if nl >= 0:
                keep = pos + nl + 1
                break
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return size - keep


def item_files(folder: Path) -> list[Path]:
    """A run folder's records files: ``items.jsonl``, or one ``items.shard<r>-of-<n>.jsonl`` per shard."""
    return sorted(folder.glob("items*.jsonl"))


def read_records(paths: Iterable[Path]) -> dict[Any, dict[str, Any]]:
    """Records by item id from JSON-lines files; the first record of an id wins.

    A line that is not valid JSON (a truncated write) is skipped with a warning: its item simply
    counts as not done.
    """
    records: dict[Any, dict[str, Any]] = {}
    for path in paths:
        if not path.exists():
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    message = f"{path}: line {number} is incomplete or corrupt; its item will be redone"
                    warnings.warn(message, stacklevel=2)
                    continue
                if isinstance(record, dict) and "id" in record:
                    records.setdefault(record["id"], record)
    return records


class RecordWriter:
    """Append records to a JSON-lines file, each flushed and fsynced before the next item starts.

    Args:
        path: the file (created if absent; a truncated last line is removed first).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        repair_tail(path)
        self._file = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, allow_nan=True, separators=(",", ":")) + "\n"
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
