"""Where benchmark data comes from: a local file, a data folder, or the Hugging Face Hub.

Every benchmark declares a :class:`DataSource`: the file's path inside a data folder laid out like
``../shared/data`` (for offline runs), and the Hub dataset (or Hub file) users can load instead.
The readers here turn CSV / JSON / JSON-lines files into lists of dicts and fail with one line
naming the file, what is wrong and the fix.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contrastive_decoding.eval.errors import DataError

__all__ = [
    "DataSource",
    "ResolvedData",
    "default_data_dirs",
    "fetch_hint",
    "read_csv_rows",
    "read_json_records",
    "require_keys",
    "resolve_data",
]

#: Environment variables naming a data folder laid out like ``../shared/data`` (first set wins).
DATA_DIR_ENV = ("CD_DATA_DIR", "CD_SHARED_DATA")
# ../shared/data beside a checkout of this repository (eval/ is at the repository root).
_CHECKOUT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True)
class DataSource:
    """Where a benchmark's data lives.

    Attributes:
        local: the file's path inside a data folder, e.g. ``"gsm8k/test.jsonl"``.
        hub: Hugging Face Hub dataset id, or ``None`` where the authors publish no Hub copy.
        hub_config: the dataset configuration to load (``None`` for the default).
        hub_split: the split to load.
        hub_file: a raw file inside the Hub dataset repository, read with the local reader, for
            Hub copies that are plain files rather than configured datasets.
        url: the publisher's original download (named in error messages).
    """

    local: str
    hub: str | None = None
    hub_config: str | None = None
    hub_split: str | None = None
    hub_file: str | None = None
    url: str | None = None

    def describe(self) -> str:
        """One line: the Hub id (if any) and the local file name."""
        hub = f"Hub dataset {self.hub}" + (
            f" ({self.hub_config}/{self.hub_split})" if self.hub_config else ""
        )
        return (hub if self.hub else "no Hub copy") + f"; local file {self.local}"


@dataclass(frozen=True)
class ResolvedData:
    """The data a run actually used: a local file (with its sha256) or a Hub dataset."""

    kind: str  # "file" or "hub"
    location: str
    sha256: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "location": self.location, "sha256": self.sha256}


def default_data_dirs() -> list[Path]:
    """Data folders searched when no ``--data``/``--data-dir`` is given: the environment
    variables in :data:`DATA_DIR_ENV`, then ``../shared/data`` beside this checkout."""
    dirs = [Path(os.environ[name]) for name in DATA_DIR_ENV if os.environ.get(name)]
    dirs.append(_CHECKOUT_DATA)
    return dirs


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_data(
    source: DataSource,
    benchmark: str,
    data: str | None = None,
    data_dir: str | None = None,
) -> ResolvedData:
    """Pick the data for a run.

    Order: ``data`` (a file path, or ``"hub"`` to force the Hub); else ``data_dir/<local>``; else
    the first default data folder holding ``<local>``; else the Hub.

    Args:
        source: the benchmark's declared source.
        benchmark: the benchmark name (for messages).
        data: ``--data``: a file path or ``"hub"``.
        data_dir: ``--data-dir``: a folder laid out like ``../shared/data``.

    Raises:
        DataError: a named file or folder does not hold the file, or there is no Hub copy to
            fall back on.
    """
    if data == "hub":
        return _hub(source, benchmark)
    if data is not None:
        path = Path(data).expanduser()
        if not path.is_file():
            raise DataError(
                f"--data {data}: no such file for benchmark {benchmark}; pass the path to "
                f"{Path(source.local).name} ({_where(source)})."
            )
        return ResolvedData("file", str(path.resolve()), _sha256(path))
    if data_dir is not None:
        path = Path(data_dir).expanduser() / source.local
        if not path.is_file():
            raise DataError(
                f"--data-dir {data_dir}: benchmark {benchmark} reads {path}, which is absent; "
                f"`contrastive-decoding data get {benchmark} --to {data_dir}` writes it there "
                f"(`contrastive-decoding data list` shows every file's layout, format and source), "
                f"or pass --data PATH ({_where(source)})."
            )
        return ResolvedData("file", str(path.resolve()), _sha256(path))
    searched = default_data_dirs()
    for folder in searched:
        path = folder / source.local
        if path.is_file():
            return ResolvedData("file", str(path.resolve()), _sha256(path))
    return _hub(source, benchmark, searched)


def _where(source: DataSource) -> str:
    parts = []
    if source.hub:
        parts.append(f"Hub: {source.hub}")
    if source.url:
        parts.append(f"download: {source.url}")
    return ", ".join(parts) or "no public download known"


def fetch_hint(source: DataSource, benchmark: str) -> str:
    """How to get the file in one step: the ``data get`` command and the layout it writes."""
    return (
        f"`contrastive-decoding data get {benchmark} --to DIR` downloads it as DIR/{source.local}, "
        f"then pass --data-dir DIR (`contrastive-decoding data list` shows every file's layout, "
        f"format and source)"
    )


def _hub(source: DataSource, benchmark: str, searched: Sequence[Path] | None = None) -> ResolvedData:
    if source.hub is None:
        looked = f" (looked in {', '.join(str(d) for d in searched)})" if searched else ""
        raise DataError(
            f"benchmark {benchmark} has no Hugging Face Hub copy and no local {source.local} was "
            f"found{looked}; {fetch_hint(source, benchmark)}; or download "
            f"{source.url or source.local} yourself and pass --data PATH."
        )
    where = source.hub + (f"/{source.hub_file}" if source.hub_file else "")
    return ResolvedData("hub", where)


def load_hub_rows(source: DataSource, benchmark: str, read_file: Callable[[Path], list[dict]]) -> list[dict]:
    """Rows of the Hub copy: a configured dataset through ``datasets``, or a raw file read with
    ``read_file``.

    Raises:
        DataError: the Hub could not be reached (offline, unknown id) or ``datasets`` is missing;
            the message says how to use a local file instead.
    """
    offline = [name for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(name)]
    mode = (
        f"{'/'.join(offline)} is set, so only the local Hugging Face cache was read (unset it where "
        f"the network is reachable); "
        if offline
        else ""
    )
    fix = (
        f"{mode}{fetch_hint(source, benchmark)}; or pass --data PATH to a local copy of "
        f"{Path(source.local).name} ({_where(source)})"
    )
    try:
        if source.hub_file is not None:
            from huggingface_hub import hf_hub_download

            path = hf_hub_download(source.hub, source.hub_file, repo_type="dataset")
            return read_file(Path(path))
        import datasets

        rows = datasets.load_dataset(source.hub, source.hub_config, split=source.hub_split)
        return [dict(row) for row in rows]
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any Hub failure becomes one actionable line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataError(
            f"benchmark {benchmark}: could not load {source.hub} from the Hugging Face Hub "
            f"({type(exc).__name__}: {first[:200]}); {fix}."
        ) from None


def require_keys(
    row: Mapping[str, Any], keys: Sequence[str], path: Path | str, where: str, hint: str
) -> None:
    """Raise a one-line :class:`DataError` when ``row`` lacks any of ``keys``.

    Args:
        row: one parsed record.
        keys: the fields the benchmark needs.
        path: the file (for the message).
        where: the record's position, e.g. ``"line 3"``.
        hint: what the file should be (e.g. ``"GSM8K test.jsonl (question, answer)"``).
    """
    missing = [k for k in keys if k not in row]
    if missing:
        found = ", ".join(map(repr, list(row)[:12]))
        raise DataError(
            f"{path}: {where} lacks {', '.join(map(repr, missing))} (found {found}); "
            f"expected {hint}: check the file or re-download it."
        )


def read_csv_rows(path: Path, columns: Sequence[str], hint: str) -> list[dict[str, str]]:
    """Rows of a CSV file (UTF-8, a byte-order mark tolerated) that must have ``columns``.

    Raises:
        DataError: unreadable file, no header, or missing columns.
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in columns if c not in header]
            if missing:
                raise DataError(
                    f"{path}: missing column(s) {', '.join(map(repr, missing))} (header: "
                    f"{', '.join(map(repr, header[:12])) or 'none'}); expected {hint}."
                )
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read as UTF-8 CSV ({exc}); expected {hint}.") from None
    if not rows:
        raise DataError(f"{path}: no rows; expected {hint}.")
    return rows


def read_json_records(path: Path, hint: str) -> list[dict[str, Any]]:
    """Records of a JSON file holding a list of objects, or of a JSON-lines file.

    Raises:
        DataError: unreadable file, invalid JSON (with the line number), or records that are not
            objects.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read as UTF-8 text ({exc}); expected {hint}.") from None
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: the file is empty; expected {hint}.")
    records: list[Any]
    if stripped[0] == "[":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{path}: invalid JSON at line {exc.lineno} ({exc.msg}); expected {hint}: re-download it."
            ) from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}: line {number} is not valid JSON ({exc.msg}); expected {hint}: re-download it."
                ) from None
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise DataError(
                f"{path}: record {number} is a {type(record).__name__}, not an object; expected {hint}."
            )
    if not records:
        raise DataError(f"{path}: no records; expected {hint}.")
    return records


def numbered(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Give each item its position in the source as ``"id"`` (stable across runs, used to resume)."""
    return [dict(row, id=i) for i, row in enumerate(rows)]
