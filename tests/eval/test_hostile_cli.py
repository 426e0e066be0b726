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
from contrastive_decoding.eval import STRATEGIES, EvalError, RunConfig, StrategyEntry, run_eval
from contrastive_decoding.eval.cli import main
from contrastive_decoding.eval.records import item_files
from contrastive_decoding.eval.strategies import check_strategy, parse_params
from evalkit import (
    char_tokenizer,
    one_thread,  # noqa: F401 - autouse fixture
    read_jsonl,
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


def _argv(model_dir: str, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "eval",
        "-b",
        "tfqa-hf",
        "-m",
        model_dir,
        "--data",
        str(data),
        "--out",
        str(out),
        "--no-progress",
        *extra,
    ]


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
    import contrastive_decoding.eval.benchmarks.base as base

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


@pytest.fixture
def registry():
    before = dict(STRATEGIES)
    yield STRATEGIES
    STRATEGIES.clear()
    STRATEGIES.update(before)


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
