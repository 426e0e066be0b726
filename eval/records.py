"""Per-item records: JSON lines appended and synced as each item completes, read back to resume.

A run killed mid-write leaves at most a truncated last line (every record is written as one
``write`` of a line that contains no raw newline); :func:`repair_tail` cuts it off before the
file is appended to again, and :func:`read_records` skips it, so no item is lost or duplicated.

One writer per records file: :class:`RunLock` holds ``flock`` locks on hidden lock files in the
run folder for as long as a run writes there. An unsharded run holds the folder's lock
exclusively; each shard holds it shared (so shards run side by side) plus its own shard's lock
exclusively. The kernel drops the locks when the process ends, however it ends (kill -9 too), so
a lock file left behind never blocks a resume.

Every record names its run: ``run_id`` (:data:`RUN_ID_FIELD`) is a short hash of the run's
``identity`` (:func:`run_id`; the settings ``run.json`` holds), so that a folder's records are
adopted only by the run that wrote them, even when ``run.json`` is gone. Records written before the
field existed have none; :func:`record_runs` reports them as ``None`` (trusted on ``run.json``'s
word, refused without it).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # Windows: no flock; runs go unlocked there
    fcntl = None  # type: ignore[assignment]

from contrastive_decoding.eval.errors import EvalError, RunLockedError

__all__ = [
    "FOLDER_LOCK",
    "RUN_ID_FIELD",
    "RecordWriter",
    "RunLock",
    "item_files",
    "non_finite_values",
    "read_records",
    "record_runs",
    "repair_tail",
    "run_id",
    "shard_lock_name",
    "write_error",
]

#: The run folder's lock file (hidden, never a result; ``.gitignore`` covers the pattern
#: ``.contrastive-decoding*.lock``).
FOLDER_LOCK = ".contrastive-decoding.lock"


#: The record field naming the run that wrote the record (see :func:`run_id`).
RUN_ID_FIELD = "run_id"


def run_id(identity: Mapping[str, Any]) -> str:
    """A short, stable hash (16 hex digits) of a run's ``identity``: the settings that shape its
    results (benchmark, model, dtype, strategy and parameters, protocol, generation settings,
    judge, data hash), as ``run.json`` holds them. Key order does not matter.

    Example:
        >>> run_id({"strategy": "dola", "model": "m"}) == run_id({"model": "m", "strategy": "dola"})
        True
    """
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def record_runs(paths: Iterable[Path]) -> dict[Path, Counter]:
    """Per records file, how many records each run id wrote (``None``: records written before
    records named their run). Lines that are not JSON objects are left out, as in
    :func:`read_records`."""
    found: dict[Path, Counter] = {}
    for path in paths:
        if not path.exists():
            continue
        counts: Counter = Counter()
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    record = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict) and "id" in record:
                    counts[record.get(RUN_ID_FIELD)] += 1
        if counts:
            found[path] = counts
    return found


def write_error(path: Path, exc: OSError, kept: str = "") -> EvalError:
    """A one-line error for a file that could not be written (a full disk says so)."""
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        what = "the disk is full (no space left on the device)"
        fix = "free some space and rerun the same command"
    else:
        what = f"cannot write it ({exc.strerror or exc})"
        fix = "fix that and rerun the same command"
    return EvalError(f"{path}: {what}; {kept + '; ' if kept else ''}{fix}.")


def shard_lock_name(rank: int, world: int) -> str:
    """The lock file of shard ``rank`` of ``world``."""
    return f".contrastive-decoding.shard{rank}-of-{world}.lock"


def non_finite_values(record: Mapping[str, Any]) -> list[str]:
    """The metrics and scores of a record that are NaN or infinite, as ``"name=value"``.

    Scores are the record's fields whose names start with ``score`` (``scores_true``,
    ``score_right``, ...): a number or a list of numbers.
    """
    found = []
    fields = [(f"metrics.{k}", v) for k, v in (record.get("metrics") or {}).items()]
    fields += [(k, v) for k, v in record.items() if k.startswith("score")]
    for name, value in fields:
        values = value if isinstance(value, (list, tuple)) else [value]
        for i, v in enumerate(values):
            if isinstance(v, float) and not math.isfinite(v):
                found.append(f"{name}[{i}]={v}" if value is values else f"{name}={v}")
    return found


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
        """Append one record; on a failed write (a full disk) the file is cut back to the records
        before it, so that no partial line is left, and the ``OSError`` is raised."""
        line = json.dumps(record, ensure_ascii=False, allow_nan=True, separators=(",", ":")) + "\n"
        start = os.fstat(self._file.fileno()).st_size  # every earlier line is flushed
        try:
            self._file.write(line)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError:
            self._cut_back(start)
            raise

    def _cut_back(self, size: int) -> None:
        try:
            self._file.close()  # drops what is still buffered (its flush may fail again)
        except OSError:
            pass
        try:
            os.truncate(self.path, size)
        except OSError:
            pass  # repair_tail removes a cut line when the file is next opened
        self._file = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RunLock:
    """The locks of one run process on its run folder (see the module docstring).

    Args:
        folder: the run folder (it must exist).
        rank: this process's shard.
        world: the number of shards (1: unsharded).

    Attributes:
        alone: no other process held the folder's lock when this one took it; only then may a run
            replace settings that no record depends on yet.
        files: the lock files this process opened (the runner removes them from a folder it made
            itself when the run fails before recording anything).

    Raises:
        RunLockedError: another live process holds the folder (an unsharded run, or any run when
            this one is unsharded) or this shard.
    """

    def __init__(self, folder: Path, rank: int = 0, world: int = 1) -> None:
        self.folder = folder
        self.alone = True
        self.files: list[Path] = []
        self._handles: list[IO[str]] = []
        if fcntl is None:
            return
        try:
            self._lock_folder(world)
            if world > 1:
                self._take(
                    shard_lock_name(rank, world), fcntl.LOCK_EX, f"shard {rank}/{world} is being run by"
                )
        except BaseException:
            self.release()
            raise

    def _lock_folder(self, world: int) -> None:
        if world == 1:
            self._take(FOLDER_LOCK, fcntl.LOCK_EX, "this run folder is being written by")
            return
        who = "an unsharded run of this folder is being written by"
        handle = self._open(FOLDER_LOCK)
        try:  # no other process here at all? (Linux drops a lock whose conversion fails: no upgrade)
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            handle.truncate(0)  # an earlier unsharded run's pid would name the wrong process
        except OSError:
            self.alone = False
        try:  # shared from here on, so that the other shards run beside this one
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raise self._refused(handle, who) from None

    def _open(self, name: str) -> IO[str]:
        path = self.folder / name
        handle = open(path, "a+", encoding="utf-8")
        self._handles.append(handle)
        self.files.append(path)
        return handle

    def _take(self, name: str, mode: int, who: str) -> IO[str]:
        handle = self._open(name)
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
        except OSError:
            raise self._refused(handle, who) from None
        # The holder's pid, for the message of a refused second process.
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        return handle

    def _refused(self, handle: IO[str], who: str) -> RunLockedError:
        handle.seek(0)
        holder = handle.read().strip()
        pid = f" (pid {holder})" if holder.isdigit() else ""
        return RunLockedError(
            f"--out {self.folder}: {who} another process{pid}; wait for it to finish, or use another "
            "--out folder (a killed run holds no lock: rerunning resumes it)."
        )

    def release(self) -> None:
        """Drop the locks (closing the files releases them)."""
        for handle in self._handles:
            handle.close()
        self._handles.clear()

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_error(folder: Path, exc: OSError) -> EvalError:
    """A one-line error for a run folder that cannot be created or locked."""
    return EvalError(
        f"--out {folder}: cannot create or write there ({exc.strerror or exc}); choose another folder."
    )
