"""Every record names its run: a folder's records are adopted only by the run that wrote them.

Each line of ``items*.jsonl`` carries ``run_id``, a short hash of the run's ``identity`` (the
settings ``run.json`` holds: benchmark, model, strategy and parameters, protocol, generation
settings, judge, data hash). A run that finds records of another run in its ``--out`` folder stops
with one line (status 2) and writes nothing, even when ``run.json`` was deleted. Records written
before the field existed (the committed ``results/``) are trusted on ``run.json``'s word as
before; without ``run.json`` they are refused, with the way out.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from contrastive_decoding.eval.cli import main
from contrastive_decoding.eval.records import RUN_ID_FIELD, item_files, run_id
from evalkit import (
    one_thread,  # noqa: F401 - autouse fixture
    read_jsonl,
    tfqa_hf_argv,
    tiny_model_dir,
    write_mc_json,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(tiny_model_dir(str(tmp_path_factory.mktemp("model"))))


@pytest.fixture
def data(tmp_path) -> Path:
    return write_mc_json(tmp_path)


_argv = tfqa_hf_argv


DOLA = ("--strategy", "dola", "--param", "dola_layers=high")


def _bad(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` but the run locks (hidden, no result: see eval/README.md)."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")]
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def _forget_settings(out: Path) -> None:
    """What the issue did: delete run.json and the summaries, keep the records."""
    for name in ("run.json", "summary.json", "summary.md"):
        (out / name).unlink()


def _strip_run_ids(out: Path) -> None:
    """Make the folder's records look like ones written before records carried their run."""
    for path in item_files(out):
        rows = [{k: v for k, v in r.items() if k != RUN_ID_FIELD} for r in read_jsonl(path)]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_every_record_names_its_run(tmp_path, model_dir, data):
    out = tmp_path / "R"
    assert main(_argv(model_dir, data, out, *DOLA)) == 0
    identity = json.loads((out / "run.json").read_text())["identity"]
    records = read_jsonl(out / "items.jsonl")
    assert len(records) == 3 and {r[RUN_ID_FIELD] for r in records} == {run_id(identity)}
    # Sharded runs too, each shard file.
    sharded = tmp_path / "S"
    for shard in ("0/2", "1/2"):
        assert main(_argv(model_dir, data, sharded, *DOLA, "--shard", shard)) == 0
    files = item_files(sharded)
    assert [p.name for p in files] == ["items.shard0-of-2.jsonl", "items.shard1-of-2.jsonl"]
    assert {r[RUN_ID_FIELD] for p in files for r in read_jsonl(p)} == {run_id(identity)}
    # The id depends on every setting that shapes results, and on nothing else.
    assert run_id(identity) == run_id(json.loads(json.dumps(identity)))
    assert run_id(identity) != run_id({**identity, "strategy_params": {}})
    assert len(run_id(identity)) == 16


def test_folder_without_run_json_refuses_another_strategys_records(tmp_path, model_dir, data, capsys):
    # The issue: DoLa into R, delete run.json and the summaries, SLED into R gave exit 0 and a
    # summary labelled sled holding DoLa's numbers.
    out = tmp_path / "R"
    assert main(_argv(model_dir, data, out, *DOLA)) == 0
    _forget_settings(out)
    before = _snapshot(out)
    line = _bad(_argv(model_dir, data, out, "--strategy", "sled"), capsys)
    assert f"--out {out}" in line and "items.jsonl" in line and "another run" in line, line
    assert "another --out" in line  # the way out
    assert _snapshot(out) == before  # no run.json, no summary, no record added
    # The same holds when the folder keeps a run.json of the right settings but the records came
    # from elsewhere (copied in by hand).
    other = tmp_path / "other"
    assert main(_argv(model_dir, data, other, "--strategy", "sled")) == 0
    shutil.copy(out / "items.jsonl", other / "items.jsonl")
    (other / "summary.json").unlink()
    before = _snapshot(other)
    line = _bad(_argv(model_dir, data, other, "--strategy", "sled"), capsys)
    assert "another run" in line and "items.jsonl" in line, line
    assert _snapshot(other) == before


def test_a_shard_file_of_another_run_is_refused(tmp_path, model_dir, data, capsys):
    out = tmp_path / "R"
    assert main(_argv(model_dir, data, out, *DOLA, "--shard", "0/2")) == 0
    (out / "run.json").unlink()
    before = _snapshot(out)
    line = _bad(_argv(model_dir, data, out, "--strategy", "sled", "--shard", "1/2"), capsys)
    assert "items.shard0-of-2.jsonl" in line and "another run" in line, line
    assert _snapshot(out) == before


def test_own_records_resume_without_run_json(tmp_path, model_dir, data, capsys):
    reference = tmp_path / "reference"
    assert main(_argv(model_dir, data, reference, *DOLA)) == 0
    out = tmp_path / "R"
    assert main(_argv(model_dir, data, out, *DOLA, "--limit", "2")) == 0
    (out / "run.json").unlink()
    first = (out / "items.jsonl").read_text()
    assert main(_argv(model_dir, data, out, *DOLA)) == 0  # the records name this run: resumed
    assert (out / "items.jsonl").read_text().startswith(first)
    assert (out / "run.json").is_file()
    ours, theirs = (json.loads((f / "summary.json").read_text()) for f in (out, reference))
    assert ours["metrics"] == theirs["metrics"] and ours["strategy"] == "dola"


def test_legacy_records_resume_with_run_json(tmp_path, model_dir, data, capsys):
    """Records without run_id (written before the field) resume as before: run.json vouches."""
    reference = tmp_path / "reference"
    assert main(_argv(model_dir, data, reference, *DOLA)) == 0
    out = tmp_path / "R"
    assert main(_argv(model_dir, data, out, *DOLA, "--limit", "2")) == 0
    _strip_run_ids(out)
    assert main(_argv(model_dir, data, out, *DOLA)) == 0
    records = read_jsonl(out / "items.jsonl")
    assert [RUN_ID_FIELD in r for r in records] == [False, False, True]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"] == json.loads((reference / "summary.json").read_text())["metrics"]
    # Other settings are still refused by run.json, as before.
    assert "other settings" in _bad(_argv(model_dir, data, out, "--strategy", "sled"), capsys)
    # compare and table read legacy folders as before.
    _strip_run_ids(reference)
    assert main(["compare", str(reference), str(out)]) == 0
    assert main(["table", str(reference), str(out)]) == 0
    assert "| tfqa-hf |" in capsys.readouterr().out


def test_legacy_records_without_run_json_are_not_adopted(tmp_path, model_dir, data, capsys):
    out = tmp_path / "R"
    assert main(_argv(model_dir, data, out, *DOLA)) == 0
    _strip_run_ids(out)
    _forget_settings(out)
    before = _snapshot(out)
    for argv in (_argv(model_dir, data, out, "--strategy", "sled"), _argv(model_dir, data, out, *DOLA)):
        line = _bad(argv, capsys)
        assert f"--out {out}" in line and "run.json" in line and "items.jsonl" in line, line
        assert "restore" in line and "another --out" in line  # how to proceed
        assert _snapshot(out) == before


def test_compare_refuses_records_that_are_not_the_summarys(tmp_path, model_dir, data, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(_argv(model_dir, data, a)) == 0
    assert main(_argv(model_dir, data, b, *DOLA)) == 0
    shutil.copy(a / "items.jsonl", b / "items.jsonl")  # b's summary says dola, its records are a's
    before = _snapshot(tmp_path)
    line = _bad(["compare", str(a), str(b)], capsys)
    assert str(b) in line and "another run" in line, line
    assert _snapshot(tmp_path) == before


def test_committed_results_still_table_and_compare(capsys):
    """The committed results hold records without run_id; they are read as before."""
    folder = REPO / "results" / "tfqa-hf" / "smollm2"
    runs = sorted(p for p in folder.glob("*") if (p / "summary.json").is_file()) if folder.is_dir() else []
    if len(runs) < 2:
        pytest.skip(f"{folder} holds fewer than two finished runs")
    before = _snapshot(folder)
    assert main(["table", *map(str, runs)]) == 0
    assert main(["compare", str(runs[0]), str(runs[1]), "--bootstrap", "100"]) == 0
    assert "| tfqa-hf |" in capsys.readouterr().out
    assert _snapshot(folder) == before
