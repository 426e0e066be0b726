"""``contrastive-decoding data``: the file catalog agrees with the benchmarks and the published
results; ``data list`` reports layout, formats, sources, licenses and presence as the harness's own
resolver finds them, without torch; ``data get`` (through a local mirror: the fetch layer replaced by
rows built from handmade records or from ../shared/data, FACTOR through a ``file://`` URL) writes
files that the harness's readers read as the reference files, atomically, never overwriting unless
``--force``, with one actionable line when offline."""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from contrastive_decoding.eval import BENCHMARKS, EvalError
from contrastive_decoding.eval import data_command as dc
from contrastive_decoding.eval.cli import _Parser
from contrastive_decoding.eval.data import resolve_data
from contrastive_decoding.eval.runner import load_items
from evalkit import (
    FACTOR_ROWS,
    GSM8K_RECORDS,
    HALUEVAL_RECORDS,
    MC_RECORDS,
    TFQA_ROWS,
    WRITERS,
    shared_file,
    write_factor_csv,
    write_strategyqa_json,
)

ROOT = Path(__file__).resolve().parents[2]
DOCS_PAGE = ROOT / "docs" / "harness" / "data.md"

# The fields each reader requires (eval/benchmarks/*.py): every format line must name them.
REQUIRED_FIELDS = {
    "truthfulqa/TruthfulQA.csv": ("Question", "Best Answer", "Correct Answers", "Incorrect Answers"),
    "truthfulqa/v0/mc_task.json": ("question", "mc1_targets", "mc2_targets"),
    "factor/news_factor.csv": ("full_prefix", "completion", "contradiction_0", "contradiction_2"),
    "factor/expert_factor.csv": ("full_prefix", "completion", "contradiction_0", "contradiction_2"),
    "strategyqa/strategyqa_train.json": ("question", "answer"),
    "gsm8k/test.jsonl": ("question", "answer", "####"),
    "halueval/qa_data.json": ("knowledge", "question", "right_answer", "hallucinated_answer"),
}


def run(argv: list[str]) -> int:
    """``contrastive-decoding data ...`` through a parser built as the CLI builds its own."""
    parser = _Parser(prog="contrastive-decoding")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    dc.add_data_parser(sub)
    args = parser.parse_args(argv)
    assert args.command == "data"
    return dc.run_data_command(args)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def catalog_file(path: str) -> dc.DataFile:
    return next(f for f in dc.DATA_FILES if f.path == path)


def hub_generation_rows(rows: list[dict[str, str]]) -> list[dict]:
    """TruthfulQA.csv rows as the Hub's ``generation`` config holds them (its loading script
    splits the answer columns on ";" and strips each)."""
    return [
        {
            "type": r["Type"],
            "category": r["Category"],
            "question": r["Question"],
            "best_answer": r["Best Answer"],
            "correct_answers": [a.strip() for a in r["Correct Answers"].split(";")],
            "incorrect_answers": [a.strip() for a in r["Incorrect Answers"].split(";")],
            "source": r["Source"],
        }
        for r in rows
    ]


def hub_mc_rows(records: list[dict]) -> list[dict]:
    """mc_task.json records as the Hub's ``multiple_choice`` config holds them."""
    return [
        {
            "question": r["question"],
            **{
                key: {"choices": list(r[key]), "labels": list(r[key].values())}
                for key in ("mc1_targets", "mc2_targets")
            },
        }
        for r in records
    ]


class Mirror:
    """Stands in for the Hub and GitHub: ``rows[(dataset, config, split)]``, ``files[(dataset,
    filename)]``, and ``urls[path]`` (a local file served through urllib as ``file://``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rows: dict[tuple, list[dict]] = {}
        self.files: dict[tuple, Path] = {}
        self.calls: list[tuple] = []
        self._monkeypatch = monkeypatch
        monkeypatch.setattr(dc, "_fetch_hub", self._fetch_hub)
        monkeypatch.setattr(dc, "_fetch_hub_file", self._fetch_hub_file)

    def _fetch_hub(self, dataset, config, split):
        self.calls.append((dataset, config, split))
        return [dict(r) for r in self.rows[(dataset, config, split)]]

    def _fetch_hub_file(self, dataset, filename):
        self.calls.append((dataset, filename))
        return self.files[(dataset, filename)]

    def serve_url(self, catalog_path: str, local: Path) -> None:
        """Point the catalog entry's download at ``local`` through a ``file://`` URL."""
        files = tuple(
            dataclasses.replace(f, url=local.resolve().as_uri()) if f.path == catalog_path else f
            for f in dc.DATA_FILES
        )
        self._monkeypatch.setattr(dc, "DATA_FILES", files)


def synthetic_mirror(monkeypatch, folder: Path) -> Mirror:
    """The handmade records of ``evalkit`` in every source's form."""
    folder.mkdir()
    mirror = Mirror(monkeypatch)
    mirror.rows[("truthfulqa/truthful_qa", "generation", "validation")] = hub_generation_rows(TFQA_ROWS)
    mirror.rows[("truthfulqa/truthful_qa", "multiple_choice", "validation")] = hub_mc_rows(MC_RECORDS)
    mirror.rows[("openai/gsm8k", "main", "test")] = GSM8K_RECORDS
    mirror.rows[("pminervini/HaluEval", "qa", "data")] = HALUEVAL_RECORDS
    mirror.files[("voidful/StrategyQA", "strategyqa_train.json")] = write_strategyqa_json(folder)
    factor = write_factor_csv(folder)
    mirror.serve_url("factor/news_factor.csv", factor)
    mirror.serve_url("factor/expert_factor.csv", factor)
    return mirror


def no_leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.endswith(".part")]


# ---------------------------------------------------------------- the catalog


def test_catalog_agrees_with_every_benchmark_source():
    listed = [name for f in dc.DATA_FILES for name in f.benchmarks]
    assert sorted(listed) == sorted(BENCHMARKS)  # every benchmark, once
    for file in dc.DATA_FILES:
        for name in file.benchmarks:
            source = BENCHMARKS[name].source
            assert file.path == source.local, name
            assert (file.hub, file.hub_file) == (source.hub, source.hub_file), name
            if file.hub_file is None and file.hub is not None:
                assert (file.hub_config, file.hub_split) == (source.hub_config, source.hub_split), name
            if file.hub is None:  # downloaded from the publisher: the same file name
                assert file.url.endswith("/" + Path(source.local).name), name
        missing = [field for field in REQUIRED_FIELDS[file.path] if field not in file.format]
        assert missing == [], f"{file.path}: the format line does not name {missing}"


@pytest.mark.parametrize("file", dc.DATA_FILES, ids=lambda f: f.path)
def test_catalog_sha256_is_the_published_results_file(file):
    recorded = set()
    for name in file.benchmarks:
        for summary in glob.glob(str(ROOT / "results" / name / "**" / "summary.json"), recursive=True):
            data = json.loads(Path(summary).read_text(encoding="utf-8")).get("data") or {}
            if data.get("kind") == "file" and data["location"].endswith(file.path):
                recorded.add(data["sha256"])
    if not recorded:
        pytest.skip(f"no run under results/ read {file.path} from a file")
    assert recorded == {file.sha256}


@pytest.mark.parametrize("file", dc.DATA_FILES, ids=lambda f: f.path)
def test_catalog_counts_match_the_real_files(file):
    path = shared_file(file.path)
    assert len(BENCHMARKS[file.benchmarks[0]].read_file(path)) == file.items
    assert sha256(path) == file.sha256


def test_files_for_names_and_all():
    assert [f.path for f in dc.files_for(["tfqa-gen", "tfqa-dola"])] == ["truthfulqa/TruthfulQA.csv"]
    assert len(dc.files_for(["all"])) == len(dc.DATA_FILES)
    with pytest.raises(EvalError) as exc:
        dc.files_for(["gsm8k", "gsm9k"])
    assert "'gsm9k'" in str(exc.value) and "factor-news" in str(exc.value) and "all" in str(exc.value)


# ---------------------------------------------------------------- data list


def test_list_in_a_data_dir(tmp_path, capsys):
    (tmp_path / "gsm8k").mkdir()
    WRITERS["gsm8k"](tmp_path / "gsm8k")
    (tmp_path / "factor").mkdir()
    write_factor_csv(tmp_path / "factor")  # news_factor.csv
    assert run(["data", "list", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    blocks = {b.split("\n", 1)[0]: b for b in out.split("\n\n")}
    for file in dc.DATA_FILES:
        block = blocks[file.path]
        present = file.path in ("gsm8k/test.jsonl", "factor/news_factor.csv")
        if present:  # the handmade file is not the published one
            assert f"present: {tmp_path / file.path} (differs from the published" in block
        else:  # eval --data-dir does not fall back to the Hub
            assert f"missing in {tmp_path} (eval stops with an error)" in block
        assert file.license in block and file.upstream in block and file.format in block
        assert f"({file.items} items)" in block
        assert re.search(rf"^  {re.escape(file.path)} +{re.escape(', '.join(file.benchmarks))}$", out, re.M)
    assert f"5 of {len(dc.DATA_FILES)} files missing in {tmp_path}" in out
    assert f"data get all --to {tmp_path}" in out


def test_list_default_folders_agree_with_the_resolver(tmp_path, monkeypatch, capsys):
    env_dir = tmp_path / "env"
    (env_dir / "gsm8k").mkdir(parents=True)
    WRITERS["gsm8k"](env_dir / "gsm8k")
    monkeypatch.setenv("CD_DATA_DIR", str(env_dir))
    monkeypatch.delenv("CD_SHARED_DATA", raising=False)
    monkeypatch.setattr("contrastive_decoding.eval.data._CHECKOUT_DATA", tmp_path / "absent")
    assert run(["data"]) == 0  # `list` is the default action
    out = capsys.readouterr().out
    assert f"$CD_DATA_DIR/<path> = {env_dir}" in out and "$CD_SHARED_DATA/<path> (unset)" in out
    assert f"{tmp_path / 'absent'}/<path> (../shared/data beside the checkout; absent)" in out
    blocks = {b.split("\n", 1)[0]: b for b in out.split("\n\n")}
    for file in dc.DATA_FILES:
        name = file.benchmarks[0]
        try:
            resolved = resolve_data(BENCHMARKS[name].source, name)
        except EvalError:
            resolved = None
        block = blocks[file.path]
        if resolved is not None and resolved.kind == "file":
            assert f"present: {resolved.location}" in block
        elif resolved is not None:  # the harness would go to the Hub
            assert f"eval would load the Hub copy {file.hub}" in block
        else:
            assert "eval stops with an error" in block


def test_list_data_dir_before_or_after_the_action(tmp_path, capsys):
    run(["data", "--data-dir", str(tmp_path), "list"])
    first = capsys.readouterr().out
    run(["data", "list", "--data-dir", str(tmp_path)])
    assert capsys.readouterr().out == first
    assert f"missing in {tmp_path}" in first


def test_list_rejects_a_file_as_data_dir(tmp_path):
    path = tmp_path / "f"
    path.write_text("x")
    with pytest.raises(EvalError, match=r"^--data-dir .*: is a file"):
        run(["data", "list", "--data-dir", str(path)])


def test_list_imports_no_torch(tmp_path):
    # The package's __init__ is stood in for (its own laziness is the CLI's startup test's
    # concern), so this checks what data_command and `data list` themselves import.
    location = importlib.util.find_spec("contrastive_decoding.eval").submodule_search_locations[0]
    code = f"""
import sys, types, argparse
import contrastive_decoding
package = types.ModuleType("contrastive_decoding.eval")
package.__path__ = [{location!r}]
sys.modules["contrastive_decoding.eval"] = package
from contrastive_decoding.eval.data_command import add_data_parser, run_data_command
parser = argparse.ArgumentParser()
add_data_parser(parser.add_subparsers(dest="command"))
run_data_command(parser.parse_args(["data", "list", "--data-dir", {str(tmp_path)!r}]))
heavy = [m for m in ("torch", "transformers", "datasets", "huggingface_hub") if m in sys.modules]
print("HEAVY", heavy)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout
    assert "truthfulqa/v0/mc_task.json" in done.stdout


# ---------------------------------------------------------------- data get, through a mirror


def test_get_all_from_a_mirror_is_what_eval_reads(tmp_path, monkeypatch, capsys):
    synthetic_mirror(monkeypatch, tmp_path / "mirror")
    out_dir = tmp_path / "data"
    assert run(["data", "get", "all", "--to", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    reference_dir = tmp_path / "reference"
    for name, benchmark in BENCHMARKS.items():
        (reference_dir / name).mkdir(parents=True)
        reference = benchmark.read_file(WRITERS[name](reference_dir / name))
        # What `eval --data-dir DIR` does: resolve the file there, then load its items.
        resolved = resolve_data(benchmark.source, name, data_dir=str(out_dir))
        assert resolved.kind == "file" and resolved.location == str(
            (out_dir / benchmark.source.local).resolve()
        )
        assert load_items(benchmark, resolved) == reference, name
    for file in dc.DATA_FILES:
        assert f"wrote {out_dir / file.path} (" in printed
        assert f"license: {file.license}" in printed
    assert "done: run `contrastive-decoding eval --data-dir" in printed
    assert no_leftovers(out_dir) == []


def _shared_mirror(file: dc.DataFile, monkeypatch, folder: Path) -> tuple[Mirror, Path]:
    """A mirror serving ``file`` from ../shared/data (skipped when absent); and the reference file
    the written file must read as."""
    mirror = Mirror(monkeypatch)
    key = (file.hub, file.hub_config, file.hub_split)
    if file.path == "truthfulqa/TruthfulQA.csv":
        # The Hub copy is the original release: upstream's data/v0/TruthfulQA.csv.
        reference = shared_file("truthfulqa/v0/TruthfulQA.csv")
        with open(reference, encoding="utf-8-sig", newline="") as f:
            mirror.rows[key] = hub_generation_rows(list(csv.DictReader(f)))
        return mirror, reference
    reference = shared_file(file.path)
    if file.path == "truthfulqa/v0/mc_task.json":
        hub_form = shared_file("truthfulqa/v0/truthful_qa_multiple_choice_validation.jsonl")
        mirror.rows[key] = [json.loads(line) for line in hub_form.read_text(encoding="utf-8").splitlines()]
    elif file.hub is None:
        mirror.serve_url(file.path, reference)
    elif file.hub_file is not None:
        mirror.files[(file.hub, file.hub_file)] = reference
    else:
        mirror.rows[key] = [json.loads(line) for line in reference.read_text(encoding="utf-8").splitlines()]
    return mirror, reference


@pytest.mark.parametrize("file", dc.DATA_FILES, ids=lambda f: f.path)
def test_get_from_the_real_files(file, tmp_path, monkeypatch, capsys):
    _, reference = _shared_mirror(file, monkeypatch, tmp_path)
    out_dir = tmp_path / "data"
    name = file.benchmarks[0]
    assert run(["data", "get", name, "--to", str(out_dir)]) == 0
    printed = capsys.readouterr().out
    written = out_dir / file.path
    benchmark = BENCHMARKS[name]
    assert benchmark.read_file(written) == benchmark.read_file(reference)
    if file.path == "truthfulqa/TruthfulQA.csv":  # the Hub's older answers: said so
        assert "differs from the published results' file" in printed and "note: " in printed
    else:  # rows written back in the publisher's format give the very file
        assert sha256(written) == sha256(reference) == file.sha256
        assert "same file as the published results" in printed
    assert f"({file.items} items;" in printed


def test_get_keeps_existing_files_unless_forced(tmp_path, monkeypatch, capsys):
    mirror = synthetic_mirror(monkeypatch, tmp_path / "mirror")
    target = tmp_path / "data" / "gsm8k" / "test.jsonl"
    target.parent.mkdir(parents=True)
    target.write_text("mine\n", encoding="utf-8")
    run(["data", "get", "gsm8k", "--to", str(tmp_path / "data")])
    assert f"kept {target}: it exists (pass --force to replace it)" in capsys.readouterr().out
    assert target.read_text(encoding="utf-8") == "mine\n" and mirror.calls == []
    run(["data", "get", "gsm8k", "--to", str(tmp_path / "data"), "--force"])
    assert [g["gold"] for g in BENCHMARKS["gsm8k"].read_file(target)] == ["5", "600", "-3"]
    assert mirror.calls == [("openai/gsm8k", "main", "test")]


def test_get_writes_nothing_when_the_download_does_not_read(tmp_path, monkeypatch, capsys):
    mirror = synthetic_mirror(monkeypatch, tmp_path / "mirror")
    mirror.rows[("openai/gsm8k", "main", "test")] = [{"question": "q", "solution": "#### 1"}]
    out_dir = tmp_path / "data"
    with pytest.raises(EvalError, match=r"^1 of 2 files could not be fetched") as exc:
        run(["data", "get", "gsm8k", "halueval", "--to", str(out_dir)])
    assert f"data list --data-dir {out_dir}" in str(exc.value)
    err = capsys.readouterr().err
    assert "gsm8k/test.jsonl: the download from Hub dataset openai/gsm8k" in err
    assert "'answer'" in err and "nothing was written" in err
    assert not (out_dir / "gsm8k" / "test.jsonl").exists()
    assert (out_dir / "halueval" / "qa_data.json").is_file()  # the other file still came
    assert no_leftovers(out_dir) == []


def test_get_hub_rows_with_other_fields_are_named_not_blamed_on_the_network(tmp_path, monkeypatch, capsys):
    mirror = synthetic_mirror(monkeypatch, tmp_path / "mirror")
    rows = hub_generation_rows(TFQA_ROWS)
    for row in rows:
        row["best"] = row.pop("best_answer")  # as if the Hub copy renamed a field
    mirror.rows[("truthfulqa/truthful_qa", "generation", "validation")] = rows
    out_dir = tmp_path / "data"
    with pytest.raises(EvalError):
        run(["data", "get", "tfqa-dola", "--to", str(out_dir)])
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("failed: ")]
    assert "are not in the form expected (KeyError: 'best_answer')" in line
    assert "network" not in line and f"save it as {out_dir / 'truthfulqa' / 'TruthfulQA.csv'}" in line
    assert not (out_dir / "truthfulqa" / "TruthfulQA.csv").exists() and no_leftovers(out_dir) == []


def test_get_interrupted_download_leaves_nothing(tmp_path, monkeypatch, capsys):
    def broken(url, dest):
        dest.write_bytes(b"full_prefix,completion\n")  # a partial file, then the connection drops
        raise ConnectionResetError("Connection reset by peer")

    monkeypatch.setattr(dc, "_fetch_url", broken)
    out_dir = tmp_path / "data"
    with pytest.raises(EvalError):
        run(["data", "get", "factor-expert", "--to", str(out_dir)])
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("failed: "))
    assert "ConnectionResetError: Connection reset by peer" in line
    assert "raw.githubusercontent.com could not be reached: check the network" in line
    assert f"save it as {out_dir / 'factor' / 'expert_factor.csv'}" in line
    assert "https://github.com/AI21Labs/factor (data/expert_factor.csv)" in line
    assert not (out_dir / "factor" / "expert_factor.csv").exists() and no_leftovers(out_dir) == []


def test_get_offline_names_the_variable_and_the_manual_download(tmp_path, monkeypatch, capsys):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)  # tests/test_lm_eval.py sets it
    # A Hub id nobody has cached: the real fetch layer fails at once in offline mode.
    files = tuple(
        dataclasses.replace(f, hub="contrastive-decoding-tests/absent") if f.path == "gsm8k/test.jsonl" else f
        for f in dc.DATA_FILES
    )
    monkeypatch.setattr(dc, "DATA_FILES", files)
    with pytest.raises(EvalError):
        run(["data", "get", "gsm8k", "--to", str(tmp_path)])
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("failed: ")]
    assert "could not fetch Hub dataset contrastive-decoding-tests/absent" in line
    assert "HF_HUB_OFFLINE is set, so only the local Hugging Face cache is read" in line
    assert "https://github.com/openai/grade-school-math" in line
    assert f"save it as {tmp_path / 'gsm8k' / 'test.jsonl'}" in line and "format: JSON lines" in line


def test_get_unreachable_hub_fails_before_retrying(tmp_path, monkeypatch, capsys):
    import socket

    for name in (*dc.OFFLINE_ENV, "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)

    def no_network(address, timeout=None):
        raise OSError("[Errno -2] Name or service not known")

    def must_not_run(*args, **kwargs):
        raise AssertionError("datasets was called although the Hub is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    if importlib.util.find_spec("datasets") is not None:
        import datasets

        monkeypatch.setattr(datasets, "load_dataset", must_not_run)
    with pytest.raises(EvalError):
        run(["data", "get", "halueval", "--to", str(tmp_path)])
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("failed: ")]
    assert "cannot reach huggingface.co:443" in line
    assert "the Hugging Face Hub could not be reached or does not hold it: check the network" in line
    assert "https://github.com/RUCAIBox/HaluEval (data/qa_data.json)" in line


def test_get_usage_errors(tmp_path):
    with pytest.raises(EvalError, match=r"BENCH 'nope': unknown"):
        run(["data", "get", "nope", "--to", str(tmp_path)])
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(EvalError, match=r"^--to .*: is a file"):
        run(["data", "get", "gsm8k", "--to", str(a_file)])
    with pytest.raises(EvalError, match="--to"):
        run(["data", "get", "gsm8k"])


def test_the_command_the_missing_data_error_names_works(tmp_path, monkeypatch, capsys):
    synthetic_mirror(monkeypatch, tmp_path / "mirror")
    benchmark = BENCHMARKS["factor-news"]
    data_dir = tmp_path / "data"
    with pytest.raises(EvalError) as exc:
        resolve_data(benchmark.source, "factor-news", data_dir=str(data_dir))
    command = re.search(r"`contrastive-decoding (data get \S+ --to \S+)`", str(exc.value))
    assert command is not None, str(exc.value)
    run(command.group(1).split())
    resolved = resolve_data(benchmark.source, "factor-news", data_dir=str(data_dir))
    assert [it["prefix"] for it in load_items(benchmark, resolved)] == [r["full_prefix"] for r in FACTOR_ROWS]


# ---------------------------------------------------------------- the docs page


def test_docs_page_names_every_file_source_and_license():
    if not DOCS_PAGE.is_file():
        pytest.fail(f"{DOCS_PAGE} is missing: it documents the data layout and `data get`")
    text = DOCS_PAGE.read_text(encoding="utf-8")
    for file in dc.DATA_FILES:
        assert f"`{file.path}`" in text, file.path
        assert file.upstream.split(" ")[0] in text, file.upstream
        assert file.license.split(" (")[0] in text, file.license
        assert (file.hub or file.url) in text, file.path
    assert "contrastive-decoding data get" in text and "contrastive-decoding data list" in text
