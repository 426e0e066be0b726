"""Hostile input to ``contrastive-decoding eval``: every bad value stops the run with one line
(``error: ...``, status 2) naming the argument, before anything is written that would block the
corrected command; non-finite scores never become metrics; one writer per ``--out`` (per shard).

Everything runs on the tiny random Llama of ``evalkit`` saved as a model folder (no Hub).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from contrastive_decoding.eval import EvalError, RunConfig, StrategyEntry, run_eval
from contrastive_decoding.eval.cli import main
from contrastive_decoding.eval.records import item_files
from contrastive_decoding.eval.strategies import check_strategy, parse_params
from evalkit import (
    char_tokenizer,
    one_thread,  # noqa: F401 - autouse fixture
    read_jsonl,
    tfqa_hf_argv,
    tiny_model,
    tiny_model_dir,
    write_gsm8k_jsonl,
    write_mc_json,
)

from contrastive_decoding import DoLa

TOKENIZER = char_tokenizer()
REPO = Path(__file__).resolve().parents[2]
# The lock files the harness keeps in a run folder (documented in eval/README.md).
FOLDER_LOCK = ".contrastive-decoding.lock"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(tiny_model_dir(str(tmp_path_factory.mktemp("model"))))


@pytest.fixture
def data(tmp_path) -> Path:
    return write_mc_json(tmp_path)


_argv = tfqa_hf_argv


def _bad(argv: list[str], capsys) -> str:
    """Run ``main`` expecting status 2 and exactly one ``error:`` line; return that line."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def _leftovers(out: Path) -> list[str]:
    """What a failed run left in ``out`` (ignoring nothing: the lock file counts too)."""
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


def _complete(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["n_items"] == len(read_jsonl(out / "items.jsonl"))
    return summary


# ------------------------------------------------------------------ A1: parameters, before loading


@pytest.mark.parametrize(
    "extra, names",
    [
        # The case: a NaN beta gave exit 0 and mc1 = 100 (argmax over NaN picks index 0).
        (["--strategy", "layercake", "--param", "beta=NaN"], ["--param beta=nan", "finite"]),
        (["--strategy", "layercake", "--param", "beta=nan"], ["--param beta='nan'", "finite"]),
        (["--strategy", "layercake", "--param", "beta=-Infinity"], ["--param beta=-inf", "finite"]),
        (["--strategy", "layercake", "--param", "beta=1e999"], ["--param beta=inf", "finite"]),
        (["--strategy", "layercake", "--param", "beta=abc"], ["--param beta='abc'", "a number"]),
        (["--strategy", "layercake", "--param", "beta="], ["--param beta=''", "a number"]),
        (["--strategy", "dola", "--param", "relative_top=Infinity"], ["--param relative_top=inf", "finite"]),
        (
            ["--strategy", "layercake", "--param", "punctuation_layers=[NaN, 0.2]"],
            ["--param punctuation_layers=", "finite"],
        ),
        (["--strategy", "dola", "--param", "final_norm=yes"], ["--param final_norm='yes'", "true or false"]),
        (
            ["--strategy", "dola", "--param", "min_tokens_to_keep=1.5"],
            ["--param min_tokens_to_keep=1.5", "integer"],
        ),
        (["--strategy", "deco", "--param", "top_k=true"], ["--param top_k=True", "integer"]),
        # A range the strategy class itself checks, surfaced before the model loads.
        (["--strategy", "dola", "--param", "relative_top=5"], ["--strategy dola", "relative_top"]),
        (["--strategy", "dola-high", "--param", "relative_top=-0.5"], ["relative_top"]),
        (["--repetition-penalty", "nan"], ["--repetition-penalty", "finite"]),
        (["--repetition-penalty", "inf"], ["--repetition-penalty", "finite"]),
        (["--repetition-penalty", "0"], ["--repetition-penalty", "> 0"]),
        (["--repetition-penalty", "abc"], ["--repetition-penalty", "abc"]),
        (["--bootstrap", "nan"], ["--bootstrap", "nan"]),
        (["--bootstrap", "10"], ["--bootstrap", "100"]),
        (["--seed", "-1"], ["--seed", "-1"]),
        (["--threads", "0"], ["--threads", "0"]),
        (["--batch-size", "-3"], ["--batch-size", "-3"]),
        (["--max-new-tokens", "0"], ["--max-new-tokens"]),
        (["--limit", "1.5"], ["--limit", "1.5"]),
        (["--dtype", "float33"], ["--dtype", "float33"]),
        (["--device", "banana"], ["--device", "banana"]),
    ],
)
def test_bad_numbers_stop_before_anything_is_written(tmp_path, model_dir, data, capsys, extra, names):
    out = tmp_path / "out"
    line = _bad(_argv(model_dir, data, out, *extra), capsys)
    for name in names:
        assert name in line, line
    assert not out.exists()  # checked before the model loads: not even the folder was made


def test_nan_beta_then_the_corrected_command_runs(tmp_path, model_dir, data, capsys):
    out = tmp_path / "out"
    line = _bad(_argv(model_dir, data, out, "--strategy", "layercake", "--param", "beta=NaN"), capsys)
    assert line == "error: --param beta=nan: must be a finite number (NaN and infinities are refused)."
    assert (
        main(_argv(model_dir, data, out, "--strategy", "layercake", "--param", "beta=0.5", "--limit", "1"))
        == 0
    )
    summary = _complete(out)
    assert summary["strategy_params"]["beta"] == 0.5
    assert all(math.isfinite(m["mean"]) for m in summary["metrics"].values())


def test_registry_checks_parameters_given_through_the_api(tmp_path, data):
    # No model is given and cfg.model names nothing loadable: the parameter error must come first.
    cfg = RunConfig(
        benchmark="tfqa-hf",
        out=str(tmp_path / "o"),
        model=str(tmp_path / "no-model"),
        strategy="sled",
        params={"evolution_rate": float("inf")},
        data=str(data),
    )
    with pytest.raises(EvalError, match=r"--param evolution_rate=inf: must be a finite number"):
        run_eval(cfg)
    with pytest.raises(EvalError, match="--param weight"):
        check_strategy("lol", {"weight": [float("nan")]})
    with pytest.raises(EvalError, match="--param suppression"):
        check_strategy("lol", {"suppression": {"bias": float("-inf")}})
    assert check_strategy("layercake", {"beta": 1}) == ("layercake", {"beta": 1})  # ints are numbers
    assert parse_params(["beta=NaN"])["beta"] != parse_params(["beta=NaN"])["beta"]  # parsed, refused later
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ B: depth-dependent parameters


@pytest.mark.parametrize(
    "strategy, name, bad, fixed",
    [
        ("dola", "dola_layers", "99", "2"),
        ("dola", "dola_layers", "[1,99]", "[1,2]"),
        ("layercake", "punctuation_layers", "[99]", "[1]"),
        ("acd", "layer", "99", "2"),
        ("vista", "late_layers", "[90,99]", "[4,5]"),
        ("activation", "info_layer", "99", "4"),
    ],
)
def test_layers_beyond_the_model_stop_before_run_json(
    tmp_path, model_dir, data, capsys, strategy, name, bad, fixed
):
    out = tmp_path / "out"
    line = _bad(_argv(model_dir, data, out, "--strategy", strategy, "--param", f"{name}={bad}"), capsys)
    assert f"--param {name}=" in line and "99" in line, line
    assert _leftovers(out) == []  # no run.json, no items file, no lock file, no folder
    # The corrected command runs in the same folder.
    assert (
        main(
            _argv(model_dir, data, out, "--strategy", strategy, "--param", f"{name}={fixed}", "--limit", "1")
        )
        == 0
    )
    _complete(out)


def test_bad_layer_in_an_existing_run_folder_leaves_it_as_it_was(tmp_path, model_dir, data, capsys):
    out = tmp_path / "out"
    assert (
        main(_argv(model_dir, data, out, "--strategy", "dola", "--param", "dola_layers=[2]", "--limit", "1"))
        == 0
    )
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _bad(
        _argv(model_dir, data, out, "--strategy", "dola", "--param", "dola_layers=[99]", "--limit", "1"),
        capsys,
    )
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# ------------------------------------------------------------------ B: the output folder and data


def test_out_is_a_file(tmp_path, model_dir, data, capsys):
    out = tmp_path / "results.txt"
    out.write_text("keep me")
    line = _bad(_argv(model_dir, data, out), capsys)
    assert f"--out {out}" in line and "is a file" in line
    assert out.read_text() == "keep me"
    line = _bad(_argv(model_dir, data, out / "run"), capsys)
    assert f"--out {out / 'run'}" in line and f"{out} is a file" in line


@pytest.mark.parametrize("place", ["/proc/self/hostile-out", "/sys/hostile-out"])
def test_out_in_an_unwritable_place(tmp_path, model_dir, data, capsys, place):
    if os.access(Path(place).parent, os.W_OK) and place.startswith("/proc"):
        pytest.skip(f"{Path(place).parent} is writable here")
    line = _bad(_argv(model_dir, data, Path(place)), capsys)
    assert f"--out {place}" in line and ("not writable" in line or "cannot create" in line), line
    assert not Path(place).exists()


def test_data_that_is_a_folder_or_empty(tmp_path, model_dir, capsys):
    out = tmp_path / "out"
    line = _bad(_argv(model_dir, tmp_path, out), capsys)
    assert f"--data {tmp_path}" in line
    empty = tmp_path / "mc_task.json"
    empty.write_text("")
    assert "is empty" in _bad(_argv(model_dir, empty, out), capsys)
    assert not out.exists()


def test_bad_judge_leaves_nothing_that_blocks_the_fix(tmp_path, model_dir, capsys):
    from evalkit import write_tfqa_csv

    data = write_tfqa_csv(tmp_path)
    out = tmp_path / "out"
    base = [
        "eval",
        "-b",
        "tfqa-gen",
        "-m",
        model_dir,
        "--data",
        str(data),
        "--out",
        str(out),
        "--no-progress",
        "--max-new-tokens",
        "2",
        "--limit",
        "1",
    ]
    line = _bad([*base, "--judge", str(tmp_path / "no-judge")], capsys)
    assert "--judge" in line and "no-judge" in line
    assert _leftovers(out) == []
    assert main([*base, "--judge", model_dir]) == 0
    assert "true" in _complete(out)["metrics"]


def test_leftover_settings_without_records_do_not_block(tmp_path, model_dir, data, capsys):
    # What an earlier version left after a crash before the first item: run.json of other
    # settings and an empty items file. Nothing was recorded, so nothing can be mixed.
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"identity": {"benchmark": "tfqa-hf", "strategy": "vista"}}))
    (out / "items.jsonl").write_text("")
    assert main(_argv(model_dir, data, out, "--limit", "1")) == 0
    assert json.loads((out / "run.json").read_text())["strategy"] == "baseline"
    # With records there, other settings are still refused.
    line = _bad(_argv(model_dir, data, out, "--limit", "1", "--strategy", "dola-low"), capsys)
    assert "other settings" in line and f"--out {out}" in line


# ------------------------------------------------------------------ A2: non-finite scores


def _poison_scores(monkeypatch, question: str, value: float) -> None:
    """Make the scorer return ``value`` for the first answer of one question (as a strategy with a
    NaN parameter, or a float16 overflow, would)."""
    # The benchmarks call the package's scorer (imported when they first score, not with them).
    import contrastive_decoding as base

    real = base.score_continuations

    def scorer(model, tokenizer, prompt, continuations, **kw):
        scores = real(model, tokenizer, prompt, continuations, **kw)
        if prompt.endswith(f"Q: {question}\nA:"):
            scores[0].total = value
        return scores

    monkeypatch.setattr(base, "score_continuations", scorer)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_scores_fail_the_item(tmp_path, model_dir, data, capsys, monkeypatch, value):
    from evalkit import MC_RECORDS

    out = tmp_path / "out"
    _poison_scores(monkeypatch, MC_RECORDS[1]["question"], value)
    line = _bad(_argv(model_dir, data, out, "--strategy", "dola-high"), capsys)
    assert "--strategy dola" in line and "item 1" in line and "non-finite" in line, line
    assert [r["id"] for r in read_jsonl(out / "items.jsonl")] == [0]  # item 1 is not done
    assert not (out / "summary.json").exists() and not (out / "summary.md").exists()
    monkeypatch.undo()
    # The next run redoes item 1 and completes (nothing poisoned was kept).
    assert main(_argv(model_dir, data, out, "--strategy", "dola-high")) == 0
    assert [r["id"] for r in read_jsonl(out / "items.jsonl")] == [0, 1, 2]
    _complete(out)


def test_nan_on_the_first_item_leaves_nothing_that_blocks_the_fix(
    tmp_path, model_dir, data, capsys, monkeypatch
):
    from evalkit import MC_RECORDS

    out = tmp_path / "out"
    _poison_scores(monkeypatch, MC_RECORDS[0]["question"], float("nan"))
    assert "item 0" in _bad(_argv(model_dir, data, out, "--strategy", "vista"), capsys)
    monkeypatch.undo()
    # The user changes the strategy: the folder holds no record, so the new settings are taken.
    assert main(_argv(model_dir, data, out, "--strategy", "dola-low", "--limit", "1")) == 0
    assert _complete(out)["strategy"] == "dola"


class _NaNRow(DoLa):
    """DoLa whose contrast is NaN in the second row of every generation step."""

    def step(self, inputs):
        out = super().step(inputs)
        if out.scores.shape[0] > 1:
            out.scores[1] = float("nan")
        return out


def test_non_finite_generation_scores_fail_the_batch(tmp_path, registry):
    from contrastive_decoding.eval import register

    register(StrategyEntry.for_class("nan-row", _NaNRow))
    data = write_gsm8k_jsonl(tmp_path)
    cfg = RunConfig(
        benchmark="gsm8k",
        out=str(tmp_path / "o"),
        data=str(data),
        strategy="nan-row",
        batch_size=2,
        max_new_tokens=3,
        progress=False,
    )
    with pytest.raises(EvalError, match=r"--strategy nan-row: item 1 \(gsm8k\)") as exc:
        run_eval(cfg, model=tiny_model(), tokenizer=TOKENIZER)
    assert "\n" not in str(exc.value)
    # The failing batch (items 0 and 1) is not recorded, nothing ran after it, and with no record
    # at all the folder this run made is taken back (so any corrected command can use it).
    assert not (tmp_path / "o").exists()


def test_summary_refuses_a_non_finite_record(tmp_path, model_dir, data, capsys):
    # A records file from a run made before the check, holding a NaN metric.
    out = tmp_path / "out"
    assert main(_argv(model_dir, data, out)) == 0
    records = read_jsonl(out / "items.jsonl")
    records[2]["metrics"]["mc2"] = float("nan")
    (out / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "summary.json").unlink()
    line = _bad(_argv(model_dir, data, out), capsys)
    assert "item 2" in line and "mc2" in line and "items.jsonl" in line
    assert not (out / "summary.json").exists()


# ------------------------------------------------------------------ C: one writer per --out


def test_second_writer_is_refused_at_once(tmp_path, model_dir, data, capsys):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / FOLDER_LOCK, "a") as held:  # another process's run, as the OS sees it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        line = _bad(_argv(model_dir, data, out, "--model", str(tmp_path / "not-loaded")), capsys)
    # Refused before the model was even looked at (that model path does not exist).
    assert f"--out {out}" in line and "another process" in line, line
    assert _leftovers(out) == [FOLDER_LOCK]
    assert main(_argv(model_dir, data, out)) == 0  # released: the run goes ahead
    _complete(out)


def test_lock_file_is_no_result(tmp_path, model_dir, data, capsys):
    out = tmp_path / "out"
    assert main(_argv(model_dir, data, out)) == 0
    assert (out / FOLDER_LOCK).exists()
    assert item_files(out) == [out / "items.jsonl"]
    capsys.readouterr()
    assert main(["table", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.out.count("| tfqa-hf |") == 1 and printed.err == ""
    assert main(["compare", str(out), str(out)]) == 0
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for name in (FOLDER_LOCK, ".contrastive-decoding.shard0-of-2.lock"):
        path = f"results/tfqa-hf/x/baseline/{name}"
        done = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO)
        assert done.returncode == 0, f"{path} is not ignored by git"


_DRIVER = textwrap.dedent(
    """
    import sys, threading
    from contrastive_decoding.eval import BENCHMARKS
    from contrastive_decoding.eval.cli import main

    bench = BENCHMARKS["tfqa-hf"]
    original, calls = bench.evaluate, []

    def evaluate(ctx, items):
        calls.append(1)
        if len(calls) == 2:
            threading.Event().wait()  # hold the run, and its lock, until killed
        return original(ctx, items)

    object.__setattr__(bench, "evaluate", evaluate)
    sys.exit(main(sys.argv[1:]))
    """
)


def _start_held_run(tmp_path: Path, argv: list[str], items: Path) -> subprocess.Popen:
    """A CLI run in another process that records one item and then waits until killed."""
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [sys.executable, str(script), *argv, "--threads", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 300  # waiting for the child, not measuring it
    while not (items.exists() and items.read_text().count("\n") >= 1):
        if proc.poll() is not None:
            pytest.fail(f"the held run exited early: {proc.communicate()[1].decode()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the held run recorded no item")
        time.sleep(0.2)
    return proc


def _kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL


def test_kill9_releases_the_lock_and_resume_completes(tmp_path, model_dir, data, capsys):
    reference = tmp_path / "reference"
    assert main(_argv(model_dir, data, reference)) == 0
    out = tmp_path / "out"
    proc = _start_held_run(tmp_path, _argv(model_dir, data, out), out / "items.jsonl")
    try:
        line = _bad(_argv(model_dir, data, out), capsys)
        assert f"--out {out}" in line and "another process" in line and str(proc.pid) in line
    finally:
        _kill9(proc)
    assert [r["id"] for r in read_jsonl(out / "items.jsonl")] == [0]
    assert main(_argv(model_dir, data, out)) == 0  # the OS released the lock with the process
    assert sorted(r["id"] for r in read_jsonl(out / "items.jsonl")) == [0, 1, 2]
    assert _complete(out)["metrics"] == _complete(reference)["metrics"]


def test_shards_run_in_parallel_but_not_twice(tmp_path, model_dir, data, capsys, monkeypatch):
    out = tmp_path / "out"
    proc = _start_held_run(
        tmp_path, _argv(model_dir, data, out, "--shard", "0/2"), out / "items.shard0-of-2.jsonl"
    )
    try:
        # Shard 0 (items 0 and 2) is busy; shard 1 goes ahead beside it.
        assert main(_argv(model_dir, data, out, "--shard", "1/2")) == 0
        assert "this shard is done" in capsys.readouterr().out
        monkeypatch.setenv("WORLD_SIZE", "2")  # the accelerate / torchrun path: rank from the environment
        monkeypatch.setenv("RANK", "1")
        assert main(_argv(model_dir, data, out)) == 0
        monkeypatch.setenv("RANK", "0")
        assert "shard 0/2" in _bad(_argv(model_dir, data, out), capsys)
        monkeypatch.delenv("WORLD_SIZE")
        monkeypatch.delenv("RANK")
        # The same shard twice, or an unsharded run over the busy folder, is refused.
        line = _bad(_argv(model_dir, data, out, "--shard", "0/2"), capsys)
        assert f"--out {out}: shard 0/2" in line and str(proc.pid) in line
        assert "another process" in _bad(_argv(model_dir, data, out), capsys)
    finally:
        _kill9(proc)
    assert not (out / "summary.json").exists()
    assert main(_argv(model_dir, data, out, "--shard", "0/2")) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["n_items"] == 3 and summary["shards"] == 2
    records = [r for f in item_files(out) for r in read_jsonl(f)]
    assert sorted(r["id"] for r in records) == [0, 1, 2]


# ------------------------------------------------------------------ round two: every subcommand
# Each bad path or value gives one line naming the argument and the fix, status 2, and writes
# nothing (no file created or changed anywhere under the test's folders).


def _tree(*roots: Path) -> dict[str, bytes]:
    """Every file under ``roots`` with its bytes (the run locks, hidden and no result, left out)."""
    files = {}
    for root in roots:
        if root.is_file():
            files[str(root)] = root.read_bytes()
        for p in sorted(root.rglob("*")) if root.is_dir() else []:
            if p.is_file() and not p.name.endswith(".lock"):
                files[str(p)] = p.read_bytes()
    return files


def _refused(argv: list[str], capsys, names: list[str], *roots: Path) -> str:
    """``_bad``, checking that the line names each of ``names`` and that nothing under ``roots``
    was written."""
    before = _tree(*roots)
    line = _bad(argv, capsys)
    for name in names:
        assert name in line, (name, line)
    assert _tree(*roots) == before, "something was written"
    return line


@pytest.fixture(scope="module")
def finished(tmp_path_factory, model_dir) -> Path:
    """A finished tfqa-hf baseline run (do not change it: copy it first)."""
    root = tmp_path_factory.mktemp("finished")
    out = root / "run"
    assert main(_argv(model_dir, write_mc_json(root), out)) == 0
    return out


def _copy_run(finished: Path, tmp_path: Path, name: str = "run") -> Path:
    copy = tmp_path / name
    shutil.copytree(finished, copy, ignore=shutil.ignore_patterns("*.lock"))
    return copy


# ------------------------------------------------------------------ C: tracebacks become one line


@pytest.mark.parametrize("content", ['[{"a": 1}]', "question,answer\nx,y\n", '{"metrics": {}}', "\x00\xff"])
def test_compare_or_table_given_a_file(tmp_path, finished, capsys, content):
    other = tmp_path / "somefile.json"
    other.write_bytes(content.encode("latin-1"))
    line = _refused(
        ["compare", str(finished), str(other)], capsys, [str(other), "not a run folder"], tmp_path
    )
    assert "give the folder" in line
    line = _refused(["table", str(other)], capsys, [str(other), "not a run folder"], tmp_path, finished)
    assert "give a finished run's folder" in line
    _refused(["answers", str(other)], capsys, [str(other), "not a run folder"], tmp_path)
    _refused(["analyze", str(other)], capsys, [str(other), "not a run folder"], tmp_path)


@pytest.mark.parametrize("command", ["compare", "table", "plot", "answers", "analyze"])
def test_truncated_summary(tmp_path, finished, capsys, command):
    run = _copy_run(finished, tmp_path)
    text = (run / "summary.json").read_text()
    (run / "summary.json").write_text(text[: len(text) // 2])
    argv = [command, str(run), str(run)] if command == "compare" else [command, str(run)]
    if command == "plot":
        argv += ["--out", str(tmp_path / "plots")]
    line = _refused(argv, capsys, [str(run / "summary.json"), "not valid JSON", "rerun"], tmp_path)
    assert "records are kept" in line
    if command == "answers":
        return  # reads no metrics
    # A summary that parses but is cut short of its metrics is refused the same way.
    (run / "summary.json").write_text(
        json.dumps({"benchmark": "tfqa-hf", "strategy_label": "x", "n_items": 3})
    )
    _refused(argv, capsys, [str(run / "summary.json"), "'metrics'", "rerun"], tmp_path)


@pytest.mark.parametrize("value", ["0", "-5", "99"])
def test_compare_bootstrap_too_small(tmp_path, finished, capsys, value):
    _refused(
        [
            "compare",
            str(finished),
            str(finished),
            "--bootstrap",
            value,
            "--json",
            str(tmp_path / "rows.json"),
        ],
        capsys,
        [f"--bootstrap {value}", ">= 100"],
        tmp_path,
        finished,
    )


@pytest.mark.parametrize("command", ["compare", "analyze"])
@pytest.mark.parametrize("where", ["folder", "read-only", "no parent"])
def test_json_out_that_cannot_be_written(tmp_path, finished, capsys, command, where):
    target = {
        "folder": tmp_path,
        "read-only": Path("/sys/hostile-rows.json"),
        "no parent": tmp_path / "absent" / "rows.json",
    }[where]
    if where == "read-only" and not Path("/sys").is_dir():
        pytest.skip("no /sys here")
    runs = [str(finished), str(finished)] if command == "compare" else [str(finished)]
    line = _refused([command, *runs, "--json", str(target)], capsys, [f"--json {target}"], tmp_path, finished)
    assert {"folder": "is a folder", "read-only": "not writable", "no parent": "does not exist"}[
        where
    ] in line
    assert not (tmp_path / "absent").exists()


def test_json_write_failure_is_one_line(tmp_path, finished, capsys, monkeypatch):
    """A write that fails after the checks (a full disk) is one line too, and leaves no file."""
    import errno

    real = Path.write_text

    def full(self, *args, **kwargs):
        if self.name == "rows.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    monkeypatch.setattr("os.replace", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    target = tmp_path / "rows.json"
    _refused(
        ["compare", str(finished), str(finished), "--json", str(target)], capsys, ["--json", "disk is full"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["plot", "inspect"])
@pytest.mark.parametrize("where", ["file", "under a file", "read-only"])
def test_out_folder_of_plot_and_inspect(tmp_path, finished, model_dir, capsys, command, where):
    blocker = tmp_path / "plots.png"
    blocker.write_text("keep me")
    target = {"file": blocker, "under a file": blocker / "sub", "read-only": Path("/sys/hostile-plots")}[
        where
    ]
    if where == "read-only" and not Path("/sys").is_dir():
        pytest.skip("no /sys here")
    if command == "plot":
        argv = ["plot", str(finished), "--out", str(target)]
    else:  # checked before the model loads: the model path does not exist
        argv = [
            "inspect",
            "-m",
            str(tmp_path / "no-model"),
            "--text",
            "Q: Is it? A: Yes.",
            "--out",
            str(target),
        ]
    line = _refused(argv, capsys, [f"--out {target}"], tmp_path, finished)
    assert {"file": "is a file", "under a file": "is a file", "read-only": "not writable"}[where] in line
    assert blocker.read_text() == "keep me" and not Path("/sys/hostile-plots").exists()


@pytest.fixture(scope="module")
def short_model_dir(tmp_path_factory) -> Path:
    """A tiny GPT-2 with 32 learned positions (a longer input indexes past its position table)."""
    from conftest import build_model

    path = tmp_path_factory.mktemp("short") / "gpt2-32"
    build_model("gpt2", vocab_size=len(TOKENIZER), n_positions=32).save_pretrained(path)
    TOKENIZER.save_pretrained(path)
    return path


def test_inspect_text_longer_than_the_models_positions(tmp_path, short_model_dir, capsys):
    out = tmp_path / "map"
    argv = ["inspect", "-m", str(short_model_dir), "--device", "cpu", "--out", str(out)]
    line = _refused([*argv, "--text", "x" * 40], capsys, ["--text", "41 tokens", "32 positions"], tmp_path)
    assert "shorten" in line and not out.exists()
    assert main([*argv, "--text", "x" * 20]) == 0  # within the positions: the map is written
    assert (out / "layer_map.json").is_file()


_HOLD_AFTER_FIRST = {"calls": 0}


def _interrupt_on_second_batch(monkeypatch, exc: BaseException) -> None:
    from contrastive_decoding.eval import runner

    original, calls = runner._evaluate_checked, []

    def evaluate(benchmark, ctx, batch, strategy):
        calls.append(1)
        if len(calls) == 2:
            raise exc
        return original(benchmark, ctx, batch, strategy)

    monkeypatch.setattr(runner, "_evaluate_checked", evaluate)


def test_ctrl_c_during_eval_says_how_to_resume(tmp_path, model_dir, data, capsys, monkeypatch):
    reference = tmp_path / "reference"
    assert main(_argv(model_dir, data, reference)) == 0
    out = tmp_path / "out"
    _interrupt_on_second_batch(monkeypatch, KeyboardInterrupt())
    capsys.readouterr()
    assert main(_argv(model_dir, data, out)) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("interrupted:"), err
    assert "1 of 3 items" in err[0] and str(out) in err[0] and "rerun the same command" in err[0]
    assert [r["id"] for r in read_jsonl(out / "items.jsonl")] == [0] and not (out / "summary.json").exists()
    monkeypatch.undo()
    assert main(_argv(model_dir, data, out)) == 0
    assert _complete(out)["metrics"] == _complete(reference)["metrics"]


def test_ctrl_c_before_the_first_record_leaves_nothing(tmp_path, model_dir, data, capsys, monkeypatch):
    from contrastive_decoding.eval import runner

    def interrupt(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "_evaluate_checked", interrupt)
    out = tmp_path / "out"
    assert main(_argv(model_dir, data, out)) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no item was recorded" in err[0], err
    assert not out.exists()


def test_disk_full_while_recording_keeps_what_was_written(tmp_path, model_dir, data, capsys, monkeypatch):
    import errno

    from contrastive_decoding.eval.records import RecordWriter

    reference = tmp_path / "reference"
    assert main(_argv(model_dir, data, reference)) == 0
    out = tmp_path / "out"
    real, written = RecordWriter.write, []

    def write(self, record):
        if written:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(record["id"])
        real(self, record)

    monkeypatch.setattr(RecordWriter, "write", write)
    line = _bad(_argv(model_dir, data, out), capsys)
    assert str(out / "items.jsonl") in line and "disk is full" in line and "1 item(s) recorded" in line, line
    assert "rerun the same command" in line
    assert [r["id"] for r in read_jsonl(out / "items.jsonl")] == [0] and not (out / "summary.json").exists()
    monkeypatch.undo()
    assert main(_argv(model_dir, data, out)) == 0
    assert _complete(out)["metrics"] == _complete(reference)["metrics"]


def test_disk_full_mid_line_leaves_no_partial_line(tmp_path, model_dir, data, capsys, monkeypatch):
    """The write reached the file but its sync failed: the line is cut off again, the items before
    it stay, and the resumed run completes."""
    import errno

    from contrastive_decoding.eval import records

    out = tmp_path / "out"
    real, syncs = os.fsync, []

    def fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("items.jsonl"):
            syncs.append(fd)
            if len(syncs) == 2:  # the second record's line is in the file, its sync fails
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(records.os, "fsync", fsync)
    assert "disk is full" in _bad(_argv(model_dir, data, out), capsys)
    monkeypatch.undo()
    text = (out / "items.jsonl").read_text()
    assert text.endswith("\n") and [r["id"] for r in read_jsonl(out / "items.jsonl")] == [0]
    assert main(_argv(model_dir, data, out)) == 0
    _complete(out)


# ------------------------------------------------------------------ D: unclear errors made clear


def test_inspect_dola_layers_bogus_names_the_buckets(tmp_path, capsys):
    out = tmp_path / "map"
    argv = ["inspect", "-m", str(tmp_path / "no-model"), "--text", "Q: A:", "--out", str(out)]
    line = _refused(
        [*argv, "--dola-layers", "bogus"], capsys, ["--dola-layers 'bogus'", "high", "low"], tmp_path
    )
    assert "0,2,4" in line
    assert "--layers" in _refused([*argv, "--layers", "1-x"], capsys, ["'1-x'"], tmp_path)


def test_lm_eval_tasks_refuses_data_that_is_not_truthfulqa(tmp_path, capsys):
    from contrastive_decoding.integrations import lm_eval_available

    if not lm_eval_available():
        pytest.skip("lm-eval is not installed")
    folder = tmp_path / "tasks"
    gsm8k = write_gsm8k_jsonl(tmp_path)
    line = _refused(
        ["lm-eval-tasks", str(folder), "--data", str(gsm8k)], capsys, [f"--data {gsm8k}"], tmp_path
    )
    assert "line 1" in line and "mc2_targets" in line and "multiple_choice" in line
    # TruthfulQA's v0 mc_task.json (answers as keys) is not the Hub's multiple_choice layout either.
    v0 = write_mc_json(tmp_path)
    line = _refused(["lm-eval-tasks", str(folder), "--data", str(v0)], capsys, [f"--data {v0}"], tmp_path)
    assert "choices" in line and "labels" in line
    for text in (
        "",
        "not json\n",
        '{"question": "Q?", "mc2_targets": {"choices": ["a"], "labels": [1, 0]}}\n',
    ):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        _refused(["lm-eval-tasks", str(folder), "--data", str(bad)], capsys, [f"--data {bad}"], tmp_path)
    assert not folder.exists()
    good = write_mc_json(tmp_path, jsonl=True)  # the Hub's layout, as JSON lines
    assert main(["lm-eval-tasks", str(folder), "--data", str(good)]) == 0
    assert (folder / "truthfulqa_mc2_stable.yaml").is_file()


@pytest.fixture(scope="module")
def spaced_model_dir(tmp_path_factory) -> Path:
    """The tiny model with a tokenizer whose tokens decode with spaces between them, which
    transformers' StopStringCriteria cannot read (its vocabulary check raises ValueError)."""
    from conftest import char_tokenizer as spaced_tokenizer

    path = tmp_path_factory.mktemp("spaced") / "tiny-spaced"
    tiny_model().save_pretrained(path)
    spaced_tokenizer().save_pretrained(path)
    return path


def test_gsm8k_with_a_tokenizer_stop_strings_cannot_read(tmp_path, spaced_model_dir, capsys):
    from conftest import char_tokenizer as spaced_tokenizer
    from transformers import StopStringCriteria

    with pytest.raises(ValueError):  # the transformers limitation this test is about
        StopStringCriteria(spaced_tokenizer(), ["Q:"])
    out = tmp_path / "out"
    data = write_gsm8k_jsonl(tmp_path)
    argv = ["eval", "-b", "gsm8k", "-m", str(spaced_model_dir), "--data", str(data), "--out", str(out)]
    assert main([*argv, "--no-progress", "--max-new-tokens", "4", "--batch-size", "2"]) == 0
    assert json.loads((out / "summary.json").read_text())["n_items"] == 3


def test_decoded_text_stop_matches_stop_string_criteria(monkeypatch):
    """The fallback stops every row where StopStringCriteria stops it: same texts, same tokens."""
    from contrastive_decoding.eval import generation
    from contrastive_decoding.eval.strategies import build_strategy

    model = tiny_model()
    strategy = build_strategy(model, "baseline", {}, tokenizer=TOKENIZER)
    prompts = ["Q: What is 2+2?\nA:", "Q: Is the sky blue?\nA: The", "Q: Hi\nA:"]
    free = generation.generate_batch(model, TOKENIZER, prompts, strategy, 12)
    # Stop strings the model does produce, at different steps in different rows.
    stop = sorted({g.text[3:5] for g in free if len(g.text) >= 5} | {free[0].text[6:8]})
    real = generation.generate_batch(model, TOKENIZER, prompts, strategy, 12, stop=stop)

    def unreadable(tokenizer, stop_strings):
        raise ValueError("substring not found")

    monkeypatch.setattr(generation, "StopStringCriteria", unreadable)
    fallback = generation.generate_batch(model, TOKENIZER, prompts, strategy, 12, stop=stop)
    assert [(g.text, g.n_tokens) for g in fallback] == [(g.text, g.n_tokens) for g in real]
    assert any(g.n_tokens < f.n_tokens for g, f in zip(real, free, strict=True))  # a stop did stop a row


# ------------------------------------------------------------------ E: more hostile input, every subcommand


@pytest.fixture
def tune_args(tmp_path, data) -> list[str]:
    # A model path that does not exist: each case must be refused before the model loads.
    return ["tune", "-b", "tfqa-hf", "-s", "dola", "-m", str(tmp_path / "no-model"), "--data", str(data)]


@pytest.mark.parametrize(
    "case",
    [
        "compare seed",
        "compare absent run",
        "compare one run is a file",
        "plot metric",
        "plot absent run",
        "table absent run",
        "answers scoring run",
        "analyze limit",
        "inspect prompt-len",
        "inspect layers",
        "inspect layers bucket",
        "inspect divergence",
        "inspect absent model",
        "inspect threads",
        "inspect dtype",
        "inspect device",
        "tune folds",
        "tune bootstrap",
        "tune seed",
        "tune limit",
        "tune out file",
        "tune reuse absent",
        "tune report",
        "tune metric",
        "tune dtype",
        "tune device",
        "tune grid name",
        "tune baseline unknown",
        "lm-eval-tasks dir is a file",
        "lm-eval-tasks data absent",
        "eval data-dir is a file",
        "eval judge-info without judge",
        "import missing",
    ],
)
def test_hostile_subcommands(tmp_path, finished, model_dir, tune_args, capsys, case):
    blocker = tmp_path / "blocker.txt"
    blocker.write_text("keep me")
    absent = tmp_path / "absent"
    inspect = ["inspect", "-m", model_dir, "--text", "Q: Is it? A: Yes.", "--out", str(tmp_path / "map")]
    tune_out = ["--grid", "dola_layers=high,low", "--out", str(tmp_path / "tune")]
    argv, names = {
        "compare seed": (["compare", str(finished), str(finished), "--seed", "-1"], ["--seed -1"]),
        "compare absent run": (["compare", str(finished), str(absent)], [str(absent), "no such folder"]),
        "compare one run is a file": (["compare", str(blocker), str(finished)], [str(blocker), "is a file"]),
        "plot metric": (
            ["plot", str(finished), "--metric", "bleu", "--out", str(tmp_path / "p")],
            ["--metric bleu"],
        ),
        "plot absent run": (["plot", str(absent), "--out", str(tmp_path / "p")], [str(absent)]),
        "table absent run": (["table", str(absent)], [str(absent), "no such folder"]),
        "answers scoring run": (["answers", str(finished)], [str(finished), "scored, not generated"]),
        "analyze limit": (["analyze", str(finished), "--limit", "0"], ["--limit 0"]),
        "inspect prompt-len": ([*inspect, "--prompt-len", "-1"], ["--prompt-len"]),
        "inspect layers": ([*inspect, "--layers", "99"], ["--layers", "99"]),
        "inspect layers bucket": ([*inspect, "--layers", "high"], ["--layers high", "--dola-layers"]),
        "inspect divergence": ([*inspect, "--divergence", "kl"], ["--divergence", "'kl'"]),
        "inspect absent model": ([*inspect, "-m", str(absent)], [f"--model {absent}"]),
        "inspect threads": ([*inspect, "--threads", "0"], ["--threads 0"]),
        "inspect dtype": ([*inspect, "--dtype", "float33"], ["--dtype 'float33'"]),
        "inspect device": ([*inspect, "--device", "banana"], ["--device 'banana'"]),
        "tune folds": ([*tune_args, *tune_out, "--folds", "1"], ["--folds 1"]),
        "tune bootstrap": ([*tune_args, *tune_out, "--bootstrap", "10"], ["--bootstrap 10"]),
        "tune seed": ([*tune_args, *tune_out, "--seed", "-2"], ["--seed -2"]),
        "tune limit": ([*tune_args, *tune_out, "--limit", "0"], ["--limit"]),
        "tune out file": (
            [*tune_args, "--grid", "dola_layers=high", "--out", str(blocker)],
            [f"--out {blocker}"],
        ),
        "tune reuse absent": ([*tune_args, *tune_out, "--reuse", str(absent)], [f"--reuse {absent}"]),
        "tune report": ([*tune_args, *tune_out, "--report", "../x"], ["--report '../x'"]),
        "tune metric": ([*tune_args, *tune_out, "--metric", "mc3"], ["--metric mc3"]),
        "tune dtype": ([*tune_args, *tune_out, "--dtype", "float33"], ["--dtype 'float33'"]),
        "tune device": ([*tune_args, *tune_out, "--device", "banana"], ["--device 'banana'"]),
        "tune grid name": ([*tune_args, "--grid", "alpha=1", "--out", str(tmp_path / "t")], ["--grid alpha"]),
        "tune baseline unknown": ([*tune_args, *tune_out, "--baseline", "dolla"], ["--baseline 'dolla'"]),
        "lm-eval-tasks dir is a file": (["lm-eval-tasks", str(blocker)], [f"DIR {blocker}", "is a file"]),
        "lm-eval-tasks data absent": (
            ["lm-eval-tasks", str(tmp_path / "tasks"), "--data", str(absent)],
            [f"--data {absent}"],
        ),
        "eval data-dir is a file": (
            [
                "eval",
                "-b",
                "tfqa-hf",
                "-m",
                model_dir,
                "--data-dir",
                str(blocker),
                "--out",
                str(tmp_path / "o"),
            ],
            [f"--data-dir {blocker}"],
        ),
        "eval judge-info without judge": (
            [
                "eval",
                "-b",
                "tfqa-gen",
                "-m",
                model_dir,
                "--judge-info",
                model_dir,
                "--out",
                str(tmp_path / "o"),
            ],
            ["--judge-info", "--judge"],
        ),
        "import missing": (["--import", str(absent / "mine.py"), "list"], ["--import", "mine.py"]),
    }[case]
    if case.startswith("lm-eval-tasks"):
        from contrastive_decoding.integrations import lm_eval_available

        if not lm_eval_available():
            pytest.skip("lm-eval is not installed")
    _refused(argv, capsys, names, tmp_path, finished)
    assert blocker.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["blocker.txt", "mc_task.json"])
