"""``contrastive-decoding data``: which benchmark files the harness reads, where, and fetching them.

``data list`` (the default) prints, for every file, its path inside a data folder, the benchmarks
that read it, its format, its upstream source and license, and whether it is present (in
``--data-dir``, or in the folders ``eval`` searches by default). ``data get BENCH ... --to DIR``
downloads the files (Hugging Face Hub copies through ``datasets``/``huggingface_hub``, FACTOR from
its GitHub repository) and writes them in exactly the layout and format the harness reads, so that
``contrastive-decoding eval --data-dir DIR`` works afterwards.

The catalog below repeats each benchmark's :class:`~contrastive_decoding.eval.data.DataSource`
(path, Hub id) and adds what a user needs to fetch the file (format, license, download, the
published file's sha256), rather than importing the benchmark registry: ``data list`` then
depends on this module and ``eval/data.py`` only, and answers at once without torch.
``tests/eval/test_data_command.py`` checks that the catalog and the benchmarks agree.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import socket
import sys
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from contrastive_decoding.eval.data import DATA_DIR_ENV, _sha256, default_data_dirs
from contrastive_decoding.eval.errors import DataError, EvalError

__all__ = [
    "DATA_FILES",
    "DataFile",
    "add_data_parser",
    "files_for",
    "get_files",
    "list_files",
    "run_data_command",
]

#: Environment variables that make ``huggingface_hub``/``datasets`` read only the local cache.
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class DataFile:
    """One file a benchmark reads, and how ``data get`` makes it.

    Attributes:
        path: the file's path inside a data folder (``DataSource.local``).
        benchmarks: the benchmarks that read it.
        items: how many items the published file holds.
        format: what the harness reads, in one line.
        upstream: the publisher's repository and the file's path there.
        license: the data's license.
        hub: Hugging Face Hub dataset ``data get`` downloads (``None``: ``url`` instead).
        hub_config: the dataset configuration.
        hub_split: the split.
        hub_file: a raw file of the Hub dataset repository, copied as is (instead of rows).
        url: a direct download (used when there is no Hub copy).
        writer: Hub rows -> the file's bytes, in the published format (``None`` for raw copies).
        sha256: the file the published results in ``results/`` were made with.
        note: what a user should know about the downloaded copy (one sentence), or ``None``.
    """

    path: str
    benchmarks: tuple[str, ...]
    items: int
    format: str
    upstream: str
    license: str
    hub: str | None = None
    hub_config: str | None = None
    hub_split: str | None = None
    hub_file: str | None = None
    url: str | None = None
    writer: Callable[[Rows], bytes] | None = None
    sha256: str | None = None
    note: str | None = None

    def source(self) -> str:
        """Where ``data get`` takes the file from, in words."""
        if self.hub is None:
            return str(self.url)
        if self.hub_file is not None:
            return f"Hub dataset {self.hub}, file {self.hub_file}"
        return f"Hub dataset {self.hub} ({self.hub_config or 'default'} config, {self.hub_split} split)"


# ---------------------------------------------------------------- writers: Hub rows -> published bytes

_TFQA_COLUMNS = (
    "Type",
    "Category",
    "Question",
    "Best Answer",
    "Correct Answers",
    "Incorrect Answers",
    "Source",
)


def _truthfulqa_csv(rows: Rows) -> bytes:
    """TruthfulQA.csv from the Hub ``generation`` rows (answer lists joined by "; " as upstream)."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(_TFQA_COLUMNS)
    for row in rows:
        writer.writerow(
            [
                row.get("type", ""),
                row.get("category", ""),
                row["question"],
                row["best_answer"],
                "; ".join(row["correct_answers"]),
                "; ".join(row["incorrect_answers"]),
                row.get("source", ""),
            ]
        )
    return buffer.getvalue().encode("utf-8")


def _mc_targets(targets: Mapping[str, Any]) -> dict[str, Any]:
    """The Hub's ``{"choices": [...], "labels": [...]}`` as mc_task.json's ``{choice: label}``.

    A choice listed twice cannot be a key twice; such targets stay in the Hub's form, which the
    harness reads too.
    """
    choices, labels = list(targets["choices"]), [int(x) for x in targets["labels"]]
    if len(set(choices)) != len(choices):
        return {"choices": choices, "labels": labels}
    return dict(zip(choices, labels, strict=True))


def _mc_task_json(rows: Rows) -> bytes:
    """mc_task.json from the Hub ``multiple_choice`` rows (upstream's layout: indent 2, ASCII)."""
    records = [
        {
            "question": row["question"],
            "mc1_targets": _mc_targets(row["mc1_targets"]),
            "mc2_targets": _mc_targets(row["mc2_targets"]),
        }
        for row in rows
    ]
    return json.dumps(records, indent=2).encode("utf-8")


def _json_lines(ensure_ascii: bool) -> Callable[[Rows], bytes]:
    """JSON lines, one row per line; ``ensure_ascii`` as the publisher wrote the file."""

    def write(rows: Rows) -> bytes:
        return "".join(json.dumps(row, ensure_ascii=ensure_ascii) + "\n" for row in rows).encode("utf-8")

    return write


# ---------------------------------------------------------------- the catalog

_TFQA = "https://github.com/sylinrl/TruthfulQA"
_FACTOR_RAW = "https://raw.githubusercontent.com/AI21Labs/factor/main/data/{name}_factor.csv"
_FACTOR_FORMAT = (
    "CSV (UTF-8) with columns full_prefix, completion, contradiction_0, contradiction_1, "
    "contradiction_2; other columns are ignored"
)

#: Every file a benchmark reads, in ``list`` order.
DATA_FILES: tuple[DataFile, ...] = (
    DataFile(
        path="truthfulqa/TruthfulQA.csv",
        benchmarks=("tfqa-dola", "tfqa-gen", "tfqa-gen-lmeval"),
        items=817,
        format="CSV (UTF-8) with columns Question, Best Answer, Correct Answers, Incorrect Answers "
        "(answers separated by ';'); Type, Category, Source are ignored",
        upstream=f"{_TFQA} (TruthfulQA.csv)",
        license="Apache-2.0",
        hub="truthfulqa/truthful_qa",
        hub_config="generation",
        hub_split="validation",
        writer=_truthfulqa_csv,
        sha256="f9bd9e859cc102cb1f647f1064da7e009be752c416845cf9fa56e6eaae403a7d",
        # The Hub dataset was built from upstream commit 013686a (September 2021).
        note="the Hub copy holds TruthfulQA's original reference answers (upstream's "
        "data/v0/TruthfulQA.csv); the published results used upstream's TruthfulQA.csv as revised "
        "in October 2021 (same 817 questions, about 300 more reference answers), so their numbers "
        "can differ slightly",
    ),
    DataFile(
        path="truthfulqa/v0/mc_task.json",
        benchmarks=("tfqa-hf",),
        items=817,
        format="JSON list of {question, mc1_targets: {choice: 1|0} (the one true choice first), "
        "mc2_targets: {choice: 1|0}}; targets as {choices, labels} (the Hub's form) are read too",
        upstream=f"{_TFQA} (data/v0/mc_task.json)",
        license="Apache-2.0",
        hub="truthfulqa/truthful_qa",
        hub_config="multiple_choice",
        hub_split="validation",
        writer=_mc_task_json,
        sha256="6eb4125d25750c0145c4be2dce00440736684ab6f74ce6bff2139571cc758954",
    ),
    DataFile(
        path="factor/news_factor.csv",
        benchmarks=("factor-news",),
        items=1036,
        format=_FACTOR_FORMAT,
        upstream="https://github.com/AI21Labs/factor (data/news_factor.csv)",
        license="ODC-By 1.0 (derived from RefinedWeb; Common Crawl's terms of use apply too)",
        url=_FACTOR_RAW.format(name="news"),
        sha256="f4f3110a66bfca3a1decb88f14ce55b4e9656be80894bcd94216cc2c61be8260",
    ),
    DataFile(
        path="factor/expert_factor.csv",
        benchmarks=("factor-expert",),
        items=236,
        format=_FACTOR_FORMAT,
        upstream="https://github.com/AI21Labs/factor (data/expert_factor.csv)",
        license="MIT",
        url=_FACTOR_RAW.format(name="expert"),
        sha256="39cbceba9b43e713069a155e2028f6a2335b792983110b935a71ddb065766bde",
    ),
    DataFile(
        path="strategyqa/strategyqa_train.json",
        benchmarks=("strategyqa",),
        items=2290,
        format="JSON list of objects with question and answer (true/false); qid, facts, "
        "decomposition, ... are unused",
        upstream="https://storage.googleapis.com/ai2i/strategyqa/data/strategyqa_dataset.zip "
        "(strategyqa_train.json)",
        license="MIT (the authors' repository, https://github.com/eladsegal/strategyqa)",
        hub="voidful/StrategyQA",
        hub_file="strategyqa_train.json",
        sha256="5fbefbb143d2cb31edacb6e244b26763b7a146690f28eabebec759e1c4190284",
    ),
    DataFile(
        path="gsm8k/test.jsonl",
        benchmarks=("gsm8k",),
        items=1319,
        format="JSON lines: one object per line with question and answer (the solution, ending in '#### N')",
        upstream="https://github.com/openai/grade-school-math (grade_school_math/data/test.jsonl)",
        license="MIT",
        hub="openai/gsm8k",
        hub_config="main",
        hub_split="test",
        writer=_json_lines(ensure_ascii=True),
        sha256="3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14",
    ),
    DataFile(
        path="halueval/qa_data.json",
        benchmarks=("halueval", "halueval-noknowledge"),
        items=10000,
        format="JSON lines (despite the .json name): one object per line with knowledge, "
        "question, right_answer, hallucinated_answer",
        upstream="https://github.com/RUCAIBox/HaluEval (data/qa_data.json)",
        license="MIT",
        hub="pminervini/HaluEval",
        hub_config="qa",
        hub_split="data",
        writer=_json_lines(ensure_ascii=False),
        sha256="89ed139ec5e3a3169a0b30e45569ac1283846f76f27f7bb5e908ee6deed57e88",
    ),
)

_BENCHMARK_NAMES = tuple(name for f in DATA_FILES for name in f.benchmarks)


def files_for(names: Sequence[str]) -> list[DataFile]:
    """The files the named benchmarks read (``"all"``: every file), each once, in catalog order.

    Raises:
        EvalError: an unknown name (the message lists the valid ones).
    """
    unknown = [n for n in names if n != "all" and n not in _BENCHMARK_NAMES]
    if unknown:
        raise EvalError(
            f"BENCH {', '.join(map(repr, unknown))}: unknown; give benchmark names "
            f"({', '.join(_BENCHMARK_NAMES)}) or 'all'."
        )
    wanted = set(names)
    return [f for f in DATA_FILES if "all" in wanted or wanted.intersection(f.benchmarks)]


def _agreement(file: DataFile, path: Path) -> str:
    """Whether ``path`` is byte for byte the file the published results used."""
    if file.sha256 is None:
        return ""
    if _sha256(path) == file.sha256:
        return "same file as the published results"
    return f"differs from the published results' file (sha256 {file.sha256[:12]}...)"


# ---------------------------------------------------------------- data list


def _search_order() -> list[str]:
    """Where ``eval`` looks for a benchmark's file, in order, as lines."""
    lines = [
        "--data FILE (one benchmark's file, any name)",
        "--data-dir DIR (DIR/<path> below; nothing else is searched then)",
    ]
    for name in DATA_DIR_ENV:
        value = os.environ.get(name)
        lines.append(f"${name}/<path>" + (f" = {value}" if value else " (unset)"))
    checkout = default_data_dirs()[-1]
    lines.append(
        f"{checkout}/<path> (../shared/data beside the checkout; "
        + ("exists)" if checkout.is_dir() else "absent)")
    )
    lines.append("else the Hugging Face Hub copy (FACTOR has none), or --data hub to force it")
    return lines


def list_files(data_dir: str | None = None, stream: TextIO | None = None) -> int:
    """Print every benchmark file: layout, format, source, license, and whether it is present.

    Args:
        data_dir: look only in this folder (as ``eval --data-dir`` does); ``None``: the folders
            ``eval`` searches by default.
        stream: where to print (default: standard output).

    Returns:
        The number of files missing.

    Raises:
        EvalError: ``data_dir`` exists but is not a folder.
    """
    out = stream or sys.stdout
    if data_dir is not None:
        folders = [Path(data_dir).expanduser()]
        if folders[0].exists() and not folders[0].is_dir():
            raise EvalError(
                f"--data-dir {data_dir}: is a file; give the folder that holds truthfulqa/, gsm8k/, ..."
            )
    else:
        folders = default_data_dirs()

    print("Benchmark data. eval looks for each file in this order:", file=out)
    for i, line in enumerate(_search_order(), 1):
        print(f"  {i}. {line}", file=out)
    shown = data_dir if data_dir is not None else "DIR"
    print(f"\nLayout under {shown}/ (the path each benchmark reads):", file=out)
    width = max(len(f.path) for f in DATA_FILES)
    for f in DATA_FILES:
        print(f"  {f.path:<{width}}  {', '.join(f.benchmarks)}", file=out)

    missing = 0
    where = f"in {data_dir}" if data_dir is not None else "in the default folders"
    if data_dir is not None and not folders[0].exists():
        where += " (no such folder)"
    for f in DATA_FILES:
        found = next((d / f.path for d in folders if (d / f.path).is_file()), None)
        if found is not None:
            agreement = _agreement(f, found)
            status = f"present: {found}" + (f" ({agreement})" if agreement else "")
        else:
            missing += 1
            fallback = (
                f"eval would load the Hub copy {f.hub}"
                if f.hub and data_dir is None
                else "eval stops with an error"
            )
            status = f"missing {where} ({fallback})"
        print(f"\n{f.path}", file=out)
        print(f"  status:     {status}", file=out)
        print(f"  benchmarks: {', '.join(f.benchmarks)} ({f.items} items)", file=out)
        print(f"  format:     {f.format}", file=out)
        print(f"  upstream:   {f.upstream}", file=out)
        print(f"  license:    {f.license}", file=out)
        print(f"  data get:   {f.source()}", file=out)
        if f.note:
            print(f"  note:       {f.note}", file=out)

    target = data_dir if data_dir is not None else "DIR"
    if missing:
        print(
            f"\n{missing} of {len(DATA_FILES)} files missing {where}. Fetch them with "
            f"`contrastive-decoding data get all --to {target}` (or name benchmarks instead of all), "
            f"then run `contrastive-decoding eval --data-dir {target} ...`.",
            file=out,
        )
    else:
        print(f"\nAll {len(DATA_FILES)} files present {where}.", file=out)
    return missing


# ---------------------------------------------------------------- the fetch layer (replaced in tests)


def _hub_reachable() -> None:
    """Fail at once when the Hub's host cannot be reached, rather than after ``datasets``'
    retries (about 25 s offline). Skipped where a proxy is configured (the direct connection
    would fail while the proxy works) and in offline mode (only the local cache is read)."""
    if any(os.environ.get(name) for name in OFFLINE_ENV):
        return
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    parsed = urllib.parse.urlparse(endpoint)
    host, port = parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as exc:
        raise ConnectionError(f"cannot reach {host}:{port} ({exc})") from None


def _fetch_hub(dataset: str, config: str | None, split: str | None) -> Rows:
    """The rows of a Hub dataset's split, through ``datasets``."""
    _hub_reachable()
    import datasets

    return [dict(row) for row in datasets.load_dataset(dataset, config, split=split)]


def _fetch_hub_file(dataset: str, filename: str) -> Path:
    """A raw file of a Hub dataset repository, through ``huggingface_hub`` (its cached path)."""
    _hub_reachable()
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(dataset, filename, repo_type="dataset"))


def _fetch_url(url: str, dest: Path) -> None:
    """Download ``url`` into ``dest`` (any scheme ``urllib`` opens, ``file://`` included)."""
    with urllib.request.urlopen(url, timeout=60) as response, open(dest, "wb") as f:
        shutil.copyfileobj(response, f)


# ---------------------------------------------------------------- data get


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0][:200] if text else "") or type(exc).__name__


def _fetch_failure(file: DataFile, target: Path, exc: BaseException) -> str:
    """One line: what failed, why (offline mode or the network), and the manual alternative."""
    offline = [name for name in OFFLINE_ENV if os.environ.get(name)]
    if file.hub is not None and offline:
        why = (
            f"{'/'.join(offline)} is set, so only the local Hugging Face cache is read: unset it on a "
            "machine with network access"
        )
    elif file.hub is not None:
        why = "the Hugging Face Hub could not be reached or does not hold it: check the network (or proxy)"
    else:
        host = urllib.parse.urlparse(str(file.url)).hostname or str(file.url)
        why = f"{host} could not be reached: check the network (or proxy)"
    return (
        f"{file.path}: could not fetch {file.source()} ({type(exc).__name__}: {_first_line(exc)}); "
        f"{why}; or download it yourself from {file.upstream} and save it as {target} "
        f"(format: {file.format})."
    )


def _read_items(file: DataFile, path: Path) -> int:
    """How many items the harness's own reader finds in ``path`` (raises its DataError)."""
    from contrastive_decoding.eval.benchmarks import BENCHMARKS

    return len(BENCHMARKS[file.benchmarks[0]].read_file(path))


def _install(part: Path, target: Path, force: bool) -> None:
    """Move the finished ``part`` file to ``target`` atomically; never replace an existing file
    unless ``force`` (a hard link fails if the target appeared meanwhile)."""
    if force:
        os.replace(part, target)
        return
    try:
        os.link(part, target)
    except FileExistsError:
        raise DataError(
            f"{target}: appeared while downloading; kept it (pass --force to replace it)."
        ) from None
    except OSError:  # a filesystem without hard links
        if target.exists():
            raise DataError(f"{target}: exists; kept it (pass --force to replace it).") from None
        os.replace(part, target)
        return
    part.unlink()


def _get_one(file: DataFile, target: Path, force: bool) -> str:
    """Download one file to ``target`` (atomically, checked by the harness's reader); the line
    to print. Raises whatever the fetch or the check raised."""
    part = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        if file.hub is None:
            _fetch_url(str(file.url), part)
        elif file.hub_file is not None:
            shutil.copyfile(_fetch_hub_file(file.hub, file.hub_file), part)
        else:
            assert file.writer is not None  # every catalog entry with Hub rows names its writer
            rows = _fetch_hub(file.hub, file.hub_config, file.hub_split)
            try:
                content = file.writer(rows)
            except (KeyError, TypeError, ValueError) as exc:  # the Hub copy changed its fields
                raise DataError(
                    f"{file.path}: the rows of {file.source()} are not in the form expected "
                    f"({type(exc).__name__}: {_first_line(exc)}); nothing was written; download it "
                    f"yourself from {file.upstream} and save it as {target} (format: {file.format})."
                ) from None
            part.write_bytes(content)
        with open(part, "rb") as f:
            os.fsync(f.fileno())
        try:
            count = _read_items(file, part)
        except DataError as exc:
            raise DataError(
                f"{file.path}: the download from {file.source()} does not read as the harness "
                f"expects ({exc}); nothing was written."
            ) from None
        _install(part, target, force)
    finally:
        part.unlink(missing_ok=True)
    parts = [f"{count} items"]
    if count != file.items:
        parts.append(f"the published file has {file.items}")
    agreement = _agreement(file, target)
    if agreement:
        parts.append(agreement)
    line = f"wrote {target} ({'; '.join(parts)}; from {file.source()}; license: {file.license})"
    if file.note and agreement != "same file as the published results":
        line += f"\n  note: {file.note}"
    return line


def get_files(names: Sequence[str], to: str, force: bool = False, stream: TextIO | None = None) -> list[Path]:
    """Download the named benchmarks' files into ``to``, laid out as ``eval --data-dir`` reads.

    Existing files are kept unless ``force``. Each file is written to a temporary name beside
    its target, read back with the benchmark's own reader, then moved into place, so a failed
    or interrupted download leaves nothing half-written.

    Args:
        names: benchmark names, or ``"all"``.
        to: the data folder to fill (created if needed).
        force: replace files that exist.
        stream: where to print one line per file (default: standard output).

    Returns:
        The files written.

    Raises:
        EvalError: an unknown benchmark, ``to`` is not a folder, or files could not be fetched
            (after trying every file; each failure was printed, naming the manual alternative).
    """
    out = stream or sys.stdout
    files = files_for(names)
    root = Path(to).expanduser()
    if root.exists() and not root.is_dir():
        raise EvalError(f"--to {to}: is a file; give a folder to hold truthfulqa/, gsm8k/, ...")
    written: list[Path] = []
    failures: list[str] = []
    for file in files:
        target = root / file.path
        if target.exists() and not force:
            print(f"kept {target}: it exists (pass --force to replace it)", file=out)
            continue
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise EvalError(f"--to {to}: cannot create {target.parent} ({exc.strerror or exc}).") from None
        try:
            print(_get_one(file, target, force), file=out, flush=True)
            written.append(target)
        except DataError as exc:
            failures.append(str(exc))
        except Exception as exc:  # noqa: BLE001 - any fetch failure becomes one actionable line
            failures.append(_fetch_failure(file, target, exc))
    for line in failures:
        print(f"failed: {line}", file=sys.stderr)
    if failures:
        raise EvalError(
            f"{len(failures)} of {len(files)} files could not be fetched (each is named above with "
            f"its manual download); `contrastive-decoding data list --data-dir {to}` shows what is there."
        )
    print(f"done: run `contrastive-decoding eval --data-dir {to} --benchmark ...`", file=out)
    return written


# ---------------------------------------------------------------- the CLI


def add_data_parser(subparsers: Any) -> None:
    """Add the ``data`` command (``list``, the default, and ``get``) to the CLI's subparsers.

    Args:
        subparsers: the object ``ArgumentParser.add_subparsers`` returned.
    """
    data = subparsers.add_parser(
        "data",
        help="benchmark data: list the files, their layout, sources, licenses; get downloads them",
        description="Benchmark data files: `data list` (the default) shows each file's path under a "
        "data folder, format, upstream source, license and whether it is present; `data get BENCH "
        "--to DIR` downloads files so that `eval --data-dir DIR` finds them.",
    )
    data.add_argument(
        "--data-dir", default=None, metavar="DIR", help="look only in this folder (as eval --data-dir)"
    )
    actions = data.add_subparsers(dest="data_action", metavar="{list,get}")
    ls = actions.add_parser(
        "list", help="(the default) every file: layout, format, source, license, present or not"
    )
    # SUPPRESS: `data --data-dir D list` keeps D (a subparser's default would overwrite it).
    ls.add_argument("--data-dir", default=argparse.SUPPRESS, metavar="DIR", help="look only in this folder")
    get = actions.add_parser("get", help="download benchmark files into DIR, laid out as eval reads them")
    get.add_argument(
        "benchmarks",
        nargs="+",
        metavar="BENCH",
        help=f"benchmark names ({', '.join(_BENCHMARK_NAMES)}) or all",
    )
    get.add_argument("--to", required=True, metavar="DIR", help="data folder to fill (created if needed)")
    get.add_argument("--force", action="store_true", help="replace files that exist (default: keep them)")


def run_data_command(args: argparse.Namespace) -> int:
    """Run ``data list`` or ``data get`` from parsed arguments; the exit status (0).

    Raises:
        EvalError: a usage problem or a failed download (the CLI prints it as one line).
    """
    if getattr(args, "data_action", None) == "get":
        get_files(args.benchmarks, args.to, force=args.force)
    else:
        list_files(getattr(args, "data_dir", None))
    return 0
