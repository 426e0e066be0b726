"""The command line end to end on a tiny random model saved as a model folder: eval, compare,
plot, table, list; bad input gives one line, status 2 and no summary."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from contrastive_decoding.eval.cli import build_parser, main
from evalkit import (
    one_thread,  # noqa: F401 - autouse fixture
    read_jsonl,
    tiny_model_dir,
    write_mc_json,
    write_tfqa_csv,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return str(tiny_model_dir(str(tmp_path_factory.mktemp("model"))))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, model_dir):
    """A baseline and a DoLa run of tfqa-dola through `main`."""
    root = tmp_path_factory.mktemp("runs")
    data = write_tfqa_csv(root)
    out = {}
    for name, extra in (("base", []), ("dola", ["--strategy", "dola", "--param", "dola_layers=high"])):
        argv = ["eval", "-b", "tfqa-dola", "-m", model_dir, "--data", str(data), "--out", str(root / name)]
        assert main([*argv, "--no-progress", *extra]) == 0
        out[name] = root / name
    return out


def test_eval_writes_summary_and_prints_row(runs, model_dir, capsys):
    summary = json.loads((runs["dola"] / "summary.json").read_text())
    assert summary["strategy"] == "dola" and summary["strategy_label"] == "dola[dola_layers=high]"
    assert summary["scoring_protocol"] == "paper" and summary["n_items"] == 3
    assert set(summary["metrics"]) == {"mc1", "mc2", "mc3"}
    assert summary["bootstrap"] == {"resamples": 1000, "seed": 0, "confidence": 0.95, "method": "percentile"}
    assert (runs["dola"] / "summary.md").read_text().splitlines()[2].startswith(
        f"| tfqa-dola | {model_dir} | dola-high | paper |"
    )


def test_rerun_is_a_noop_resume(runs, model_dir, capsys):
    before = (runs["base"] / "items.jsonl").read_text()
    data = runs["base"].parent / "TruthfulQA.csv"
    argv = ["eval", "-b", "tfqa-dola", "-m", model_dir, "--data", str(data), "--out", str(runs["base"])]
    assert main([*argv, "--no-progress"]) == 0
    assert (runs["base"] / "items.jsonl").read_text() == before
    assert "| tfqa-dola |" in capsys.readouterr().out


def test_compare_matches_paired_means(runs, model_dir, capsys, tmp_path):
    rows_file = tmp_path / "rows.json"
    assert main(["compare", str(runs["base"]), str(runs["dola"]), "--json", str(rows_file)]) == 0
    printed = capsys.readouterr().out
    assert f"| tfqa-dola | {model_dir} | mc1 | baseline | dola-high (paper) | 3 |" in printed
    rows = {r["metric"]: r for r in json.loads(rows_file.read_text())}
    a = {r["id"]: r for r in read_jsonl(runs["base"] / "items.jsonl")}
    b = {r["id"]: r for r in read_jsonl(runs["dola"] / "items.jsonl")}
    for metric in ("mc1", "mc2", "mc3"):
        diff = sum(b[i]["metrics"][metric] - a[i]["metrics"][metric] for i in a) / len(a) * 100
        assert rows[metric]["diff"] == pytest.approx(diff)
        assert rows[metric]["ci_low"] <= rows[metric]["diff"] + 1e-9 <= rows[metric]["ci_high"] + 2e-9


def test_plot_and_table(runs, tmp_path, capsys):
    assert (
        main(["plot", str(runs["base"]), str(runs["dola"]), "--metric", "mc2", "--out", str(tmp_path)]) == 0
    )
    for name in ("mc2.png", "premature_layers.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["table", str(runs["base"]), str(runs["dola"])]) == 0
    assert capsys.readouterr().out.count("| tfqa-dola |") == 2
    # An unfinished run (settings and some items, no summary) is left out with a note on stderr;
    # a folder that is no run at all is still an error.
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(runs["dola"] / "run.json", unfinished / "run.json")
    shutil.copy(runs["dola"] / "items.jsonl", unfinished / "items.jsonl")
    assert main(["table", str(runs["base"]), str(unfinished)]) == 0
    captured = capsys.readouterr()
    assert captured.out.count("| tfqa-dola |") == 1 and "unfinished, left out" in captured.err
    assert main(["table", str(tmp_path / "nothing-here")]) == 2
    assert "no summary.json" in capsys.readouterr().err


def test_table_columns_are_chosen_and_checked(runs, capsys):
    assert main(["table", "--no-model", "--metrics", "mc3,mc1", str(runs["dola"]), str(runs["base"])]) == 0
    head, rule, *rows = capsys.readouterr().out.splitlines()
    assert head == "| benchmark | strategy | protocol | n | mc3 | mc1 | s/item |"
    assert len(rows) == 2 and all(r.count("|") == head.count("|") for r in rows)
    # Rows in the order given, each cell the summary's own interval.
    for row, run in zip(rows, (runs["dola"], runs["base"]), strict=True):
        summary = json.loads((run / "summary.json").read_text())
        m = summary["metrics"]["mc3"]
        # The recorded preset, named as the registry does (the protocol has its own column).
        assert row.split(" | ")[1] == ("dola-high" if run == runs["dola"] else "baseline")
        assert f"{m['mean']:.1f} [{m['ci_low']:.1f}, {m['ci_high']:.1f}]" == row.split(" | ")[4]
    assert main(["table", "--metrics", "mc1,bleu_acc", str(runs["base"])]) == 2
    err = capsys.readouterr().err
    assert "--metrics" in err and "bleu_acc" in err and "mc2" in err


def test_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in (
        "tfqa-dola",
        "tfqa-hf",
        "tfqa-gen",
        "factor-news",
        "strategyqa",
        "gsm8k",
        "halueval",
        "dola-high",
    ):
        assert name in out


def _bad(argv, capsys) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


@pytest.mark.parametrize(
    "extra, expect",
    [
        (["-b", "tfqa-nope"], "valid: tfqa-dola"),
        (["-b", "tfqa-hf", "--strategy", "dolla"], "'dolla' is unknown; valid:"),
        (["-b", "tfqa-hf", "--strategy", "dola", "--param", "layers=high"], "dola_layers"),
        (["-b", "tfqa-hf", "--strategy", "dola", "--param", "dola_layers"], "NAME=VALUE"),
        (["-b", "tfqa-hf", "--protocol", "weird"], "paper, normalized"),
        (["-b", "gsm8k", "--protocol", "paper"], "multiple-choice"),
        (["-b", "tfqa-hf", "--shard", "3"], "I/N"),
        (["-b", "tfqa-hf", "--shard", "2/2"], "0 <= I < N"),
        (["-b", "tfqa-hf", "--limit", "0"], "--limit"),
        (["-b", "halueval", "--judge", "x"], "--judge"),
    ],
)
def test_bad_input_is_one_line(tmp_path, model_dir, capsys, extra, expect):
    data = write_mc_json(tmp_path)
    out = tmp_path / "out"
    line = _bad(
        ["eval", "-m", model_dir, "--data", str(data), "--out", str(out), "--no-progress", *extra], capsys
    )
    assert expect in line
    assert not (out / "summary.json").exists()


def test_missing_data_file_and_model(tmp_path, model_dir, capsys):
    missing = tmp_path / "absent.json"
    line = _bad(
        ["eval", "-b", "tfqa-hf", "-m", model_dir, "--data", str(missing), "--out", str(tmp_path / "o")],
        capsys,
    )
    assert str(missing) in line and "--data" in line
    assert not (tmp_path / "o").exists()
    data = write_mc_json(tmp_path)
    line = _bad(
        [
            "eval",
            "-b",
            "tfqa-hf",
            "-m",
            str(tmp_path / "no-model"),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "p"),
        ],
        capsys,
    )
    assert "--model" in line
    assert not (tmp_path / "p" / "summary.json").exists()


def test_compare_and_plot_refuse_unfinished_runs(tmp_path, capsys):
    assert "no summary.json" in _bad(["compare", str(tmp_path), str(tmp_path)], capsys)
    assert "no summary.json" in _bad(["plot", str(tmp_path)], capsys)
    assert "two run folders" in _bad(["compare", str(tmp_path)], capsys)


def _entry_point() -> Path:
    script = Path(sys.executable).parent / "contrastive-decoding"
    if not script.exists():
        pytest.skip(f"{script} is not installed (pip install -e .[test] installs it)")
    return script


def test_installed_entry_point(tmp_path):
    script = _entry_point()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = subprocess.run([str(script), "list"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and "tfqa-hf" in done.stdout
    out = tmp_path / "o"
    done = subprocess.run(
        [str(script), "eval", "--benchmark", "nope", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "valid: tfqa-dola" in done.stderr
    assert not out.exists()


def test_import_makes_a_user_strategy_a_cli_name(tmp_path, model_dir, registry, capsys, monkeypatch):
    """``--import FILE`` registers the file's strategy for this command; its run equals the same
    strategy given as the library's own DoLa with that static layer."""
    monkeypatch.setenv("CONTRASTIVE_DECODING_STRATEGIES", "")  # --import sets it; restored after
    plugin = tmp_path / "my_strategy.py"
    plugin.write_text(
        "from contrastive_decoding import DoLa, register_strategy\n\n\n"
        "@register_strategy('layer-two')\n"
        "class LayerTwo(DoLa):\n"
        "    '''DoLa with layer 2 fixed.'''\n\n"
        "    def __init__(self, relative_top: float = 0.1):\n"
        "        super().__init__(dola_layers=2, relative_top=relative_top)\n"
    )
    data = write_tfqa_csv(tmp_path)
    common = ["-b", "tfqa-dola", "-m", model_dir, "--data", str(data), "--no-progress"]
    mine = ["--strategy", "layer-two", "--out", str(tmp_path / "a")]
    assert main(["--import", str(plugin), "eval", *common, *mine]) == 0
    reference = ["--strategy", "dola", "--param", "dola_layers=2", "--out", str(tmp_path / "b")]
    assert main(["eval", *common, *reference]) == 0
    mine, theirs = (read_jsonl(tmp_path / r / "items.jsonl") for r in "ab")
    drop = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "run_id")} for r in rows]  # noqa: E731
    assert drop(mine) == drop(theirs)
    assert main(["--import", str(tmp_path / "missing.py"), "list"]) == 2
    assert "missing.py" in capsys.readouterr().err


# --- Safe defaults: without --out a run goes under runs/ (gitignored); a folder of another run is
# refused before the model loads.

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "extra, expect",
    [
        ([], "runs/tfqa-hf/smollm2/baseline"),
        (["-s", "dola", "-p", "dola_layers=high"], "runs/tfqa-hf/smollm2/dola_dola_layers-high"),
        (
            ["-s", "dola-high", "--protocol", "normalized", "--floor", "relative"],
            "runs/tfqa-hf/smollm2/dola-high_protocol-normalized_floor-relative",
        ),
        (
            ["-m", "/models/Llama-2-7b.gguf", "--dtype", "bfloat16"],
            "runs/tfqa-hf/Llama-2-7b/baseline_dtype-bfloat16",
        ),
        (["-m", "Qwen/Qwen2.5-7B", "--limit", "20"], "runs/tfqa-hf/Qwen2.5-7B/baseline"),
        (
            ["-s", "cd", "-p", "amateur=HuggingFaceTB/SmolLM2-135M", "--repetition-penalty", "1.2"],
            "runs/tfqa-hf/smollm2/cd_amateur-HuggingFaceTB-SmolLM2-135M_repetition-penalty-1.2",
        ),
    ],
)
def test_default_out_is_under_runs(extra, expect):
    from contrastive_decoding.eval.cli import _default_out

    args = build_parser().parse_args(["eval", "-b", "tfqa-hf", *extra])
    assert Path(_default_out(args)) == Path(expect)


def test_eval_without_out_writes_under_runs(tmp_path, model_dir, monkeypatch, capsys):
    data = write_mc_json(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "-b", "tfqa-hf", "-m", model_dir, "--data", str(data), "--no-progress"]) == 0
    out = Path("runs") / "tfqa-hf" / "tiny-llama" / "baseline"
    assert (tmp_path / out / "summary.json").is_file()
    assert capsys.readouterr().out.rstrip().endswith(f"summary: {out / 'summary.json'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mc_task.json", "runs"]  # no results/


def test_runs_folder_is_gitignored():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout: .gitignore is not in use")
    for path in ("runs/tfqa-hf/smollm2/baseline/items.jsonl", "runs/x/run.json"):
        done = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=REPO)
        assert done.returncode == 0, f"{path} is not ignored by git"
    done = subprocess.run(["git", "check-ignore", "-q", "--no-index", "results/x/run.json"], cwd=REPO)
    assert done.returncode == 1, "results/ holds the committed runs: it must not be ignored"


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: the refusals below must come before it."""

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the folder was refused")

    monkeypatch.setattr("contrastive_decoding.eval.runner._load_model", load)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "first, other, expect",
    [
        ([], ["--strategy", "dola", "--param", "dola_layers=high"], "strategy: 'baseline' there, 'dola' now"),
        ([], ["--dtype", "float64"], "dtype: 'float32' there, 'float64' now"),
        (["--strategy", "dola-high"], ["--strategy", "dola-low"], "strategy_params: {'dola_layers': 'high'"),
        (["-s", "dola"], ["-s", "dola", "--protocol", "normalized"], "'paper' there, 'normalized' now"),
    ],
)
def test_folder_of_another_run_is_refused_before_loading(
    tmp_path, model_dir, capsys, first, other, expect, request
):
    data = write_mc_json(tmp_path)
    out = tmp_path / "R"
    argv = ["eval", "-b", "tfqa-hf", "-m", model_dir, "--data", str(data), "--out", str(out), "--no-progress"]
    assert main([*argv, *first, "--limit", "2"]) == 0
    before = _files(out)
    capsys.readouterr()
    request.getfixturevalue("no_model_load")
    line = _bad([*argv, *other], capsys)
    assert f"--out {out}: holds a run with other settings" in line and expect in line, line
    assert _files(out) == before


def test_records_of_another_run_are_refused_before_loading(tmp_path, model_dir, capsys, request):
    """run.json deleted: the records still name their run, and a run of other settings is refused
    before its model loads (a DoLa parameter the folder's records were not made with)."""
    data = write_mc_json(tmp_path)
    out = tmp_path / "R"
    argv = ["eval", "-b", "tfqa-hf", "-m", model_dir, "--data", str(data), "--out", str(out), "--no-progress"]
    assert main([*argv, "--strategy", "dola", "--limit", "2"]) == 0
    for name in ("run.json", "summary.json", "summary.md"):
        (out / name).unlink()
    before = _files(out)
    capsys.readouterr()
    request.getfixturevalue("no_model_load")
    line = _bad([*argv, "--strategy", "dola", "--param", "relative_top=0.2"], capsys)
    assert "holds 2 record(s) of another run" in line, line
    assert _files(out) == before


def test_same_settings_resume_without_refusal(tmp_path, model_dir, capsys):
    """The early check predicts the identity the built strategy records; a resume of the same
    settings (a preset and its spelled-out form are the same run) is never refused by it."""
    data = write_mc_json(tmp_path)
    out = tmp_path / "R"
    argv = ["eval", "-b", "tfqa-hf", "-m", model_dir, "--data", str(data), "--out", str(out), "--no-progress"]
    assert main([*argv, "--strategy", "dola-high", "--limit", "1"]) == 0
    assert main([*argv, "--strategy", "dola", "--param", "dola_layers=high"]) == 0
    assert json.loads((out / "summary.json").read_text())["n_items"] == 3


def _planned_and_built(model_dir: str, benchmark: str, name: str, params: dict, **settings):
    from contrastive_decoding.eval import runner
    from contrastive_decoding.eval.benchmarks import get_benchmark
    from contrastive_decoding.eval.data import ResolvedData
    from contrastive_decoding.eval.strategies import build_strategy, check_strategy
    from evalkit import char_tokenizer, tiny_model

    cfg = runner.RunConfig(
        benchmark=benchmark, out="", model=model_dir, strategy=name, params=params, **settings
    )
    bench = get_benchmark(benchmark)
    resolved = ResolvedData("file", "/data/x.json", "0" * 64)
    base, full = check_strategy(name, params)
    planned = runner._planned_identity(cfg, bench, base, full, resolved)
    run = build_strategy(tiny_model(), base, full, tokenizer=char_tokenizer())
    gen = runner._generation_settings(cfg, bench, run)
    return planned, runner._identity(cfg, bench, run, resolved, gen)


def test_planned_identity_is_the_built_one_for_every_strategy(model_dir, registry):
    """Every strategy the harness lists, on a scoring and a generation benchmark, with and without
    the options that change the recorded settings: the identity known before loading is the one
    recorded after, whole, so the early refusal is exactly the late one."""
    from contrastive_decoding.eval.runner import _IDENTITY_KEYS
    from contrastive_decoding.eval.strategies import PRESETS

    names = [*registry, *PRESETS]
    assert "cd" in names and "baseline" in names and "dola-high" in names
    for name in names:
        params = {"amateur": model_dir} if name == "cd" else {}
        for benchmark, settings in (
            ("tfqa-hf", {}),
            ("factor-news", {"protocol": "normalized", "floor": "relative"}),
            ("gsm8k", {}),
            ("gsm8k", {"repetition_penalty": 1.1, "max_new_tokens": 7}),
        ):
            planned, built = _planned_and_built(model_dir, benchmark, name, params, **settings)
            assert planned.keys() == _IDENTITY_KEYS == built.keys(), name
            assert json.loads(json.dumps(planned)) == json.loads(json.dumps(built)), (name, benchmark)


def test_harness_entry_of_its_own_is_checked_on_what_is_known(tmp_path, model_dir, registry, capsys, request):
    """An entry added with ``register`` may record other parameters than its defaults: only the
    settings known without it are compared before loading, so its resume is not refused."""
    from contrastive_decoding.eval.strategies import StrategyEntry, StrategyRun, register

    def factory(model, tokenizer=None, **params):
        return StrategyRun("mine", {"recorded": "by the factory"}, None, {}, 1.0)

    register(StrategyEntry("mine", factory, {}, "a plain model that records its own parameters"))
    data = write_mc_json(tmp_path)
    out = tmp_path / "R"
    argv = ["eval", "-b", "tfqa-hf", "-m", model_dir, "--data", str(data), "--out", str(out), "--no-progress"]
    assert main([*argv, "--strategy", "mine", "--limit", "1"]) == 0
    assert main([*argv, "--strategy", "mine"]) == 0
    assert json.loads((out / "run.json").read_text())["identity"]["strategy_params"] == {
        "recorded": "by the factory"
    }
    request.getfixturevalue("no_model_load")
    line = _bad([*argv, "--strategy", "mine", "--dtype", "float64"], capsys)
    assert "dtype: 'float32' there, 'float64' now" in line
