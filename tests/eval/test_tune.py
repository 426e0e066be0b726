"""contrastive-decoding tune: grid syntax, folds, the cross-validated choice against hand-computed
numbers, the whole command on a tiny model (selection recomputed here from the cells' own
records), resuming, and seeding cells from finished runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from contrastive_decoding.eval.cli import main
from contrastive_decoding.eval.errors import EvalError
from contrastive_decoding.eval.records import item_files, read_records
from contrastive_decoding.eval.runner import RunConfig, run_eval
from contrastive_decoding.eval.tune import TuneConfig, cross_validate, make_folds, parse_grid, run_tune
from evalkit import char_tokenizer, tiny_model, tiny_model_dir

QUESTIONS = [
    ("What color is the sky?", ["The sky is blue.", "The sky is green.", "It is red."]),
    ("What is 2+2?", ["4.", "5.", "22."]),
    ("Do cats bark?", ["No.", "Yes.", "Sometimes."]),
    ("Is ice cold?", ["Yes, ice is cold.", "No.", "Ice is hot."]),
    ("Where is Paris?", ["In France.", "In Spain.", "On the moon."]),
    ("Can fish fly?", ["Most fish cannot fly.", "Yes, all fish fly."]),
    ("Is the sun a star?", ["Yes.", "No, it is a planet.", "It is a moon."]),
    ("How many legs has a dog?", ["Four.", "Three.", "Six legs."]),
]


def write_mc(folder: Path) -> Path:
    """Eight handmade TruthfulQA-MC questions in mc_task.json form (true answer first)."""
    records = []
    for question, answers in QUESTIONS:
        labels = {a: int(i == 0) for i, a in enumerate(answers)}
        records.append({"question": question, "mc1_targets": labels, "mc2_targets": labels})
    path = folder / "mc_task.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------
# Pure parts
# ------------------------------------------------------------------------------------------------


def test_parse_grid():
    assert parse_grid("dola_layers=low,high,[0,2,4];relative_top=0.1,0.05") == [
        ("dola_layers", ["low", "high", [0, 2, 4]]),
        ("relative_top", [0.1, 0.05]),
    ]
    assert parse_grid(" protocol=paper ; dola_layers=15 ") == [("protocol", ["paper"]), ("dola_layers", [15])]


@pytest.mark.parametrize(
    "grid, fragment",
    [
        ("", "--grid is empty"),
        ("dola_layers", "write each part as NAME=V1,V2"),
        ("=low", "write each part as NAME=V1,V2"),
        ("dola_layers=low,,high", "an empty value"),
        ("dola_layers=[0,2", "unbalanced brackets"),
        ("dola_layers=low;dola_layers=high", "'dola_layers' is given twice"),
        ("dola_layers=low,low", "a value is listed twice"),
    ],
)
def test_parse_grid_errors(grid, fragment):
    with pytest.raises(EvalError, match=fragment.replace("[", r"\[")):
        parse_grid(grid)


def test_folds_are_disjoint_cover_and_follow_the_seed():
    ids = list(range(11))
    folds = make_folds(ids, 3, seed=0)
    assert sorted(i for f in folds for i in f) == ids  # cover, no item twice
    assert sorted(len(f) for f in folds) == [3, 4, 4]
    assert make_folds(ids, 3, seed=0) == folds
    assert make_folds(ids, 3, seed=1) != folds
    # the assignment is a seeded permutation dealt round-robin, written out here
    order = np.random.default_rng(0).permutation(11)
    fold_of = {int(order[k]): k % 3 for k in range(11)}
    assert folds == [[i for i in ids if fold_of[i] == f] for f in range(3)]
    with pytest.raises(EvalError, match="--folds 1: must be an integer >= 2"):
        make_folds(ids, 1, 0)
    with pytest.raises(EvalError, match="more folds than the 11 items"):
        make_folds(ids, 12, 0)


def test_cross_validate_hand_example():
    """Items 0-5, folds {0,2,4} and {1,3,5}.

    Held-out fold 0: train on {1,3,5}: A 0/3, B 3/3, C 2/3 -> B; B on {0,2,4} = 0,0,1.
    Held-out fold 1: train on {0,2,4}: A 3/3, B 1/3, C 1/3 -> A; A on {1,3,5} = 0,0,0.
    Cross-validated: (0+0+0+0+1+0)/6 = 1/6, while the best cell on all items (B, 4/6) looks far better.
    """
    values = {
        "A": dict(enumerate([1, 0, 1, 0, 1, 0])),
        "B": dict(enumerate([0, 1, 0, 1, 1, 1])),
        "C": dict(enumerate([1, 1, 0, 0, 0, 1])),
    }
    cv = cross_validate(values, [[0, 2, 4], [1, 3, 5]])
    assert [f["chosen"] for f in cv["folds"]] == ["B", "A"]
    assert [f["train_mean"] for f in cv["folds"]] == [1.0, 1.0]
    assert cv["folds"][0]["heldout_mean"] == pytest.approx(1 / 3)
    assert cv["folds"][1]["heldout_mean"] == 0.0
    assert cv["per_item"] == {0: 0, 1: 0, 2: 0, 3: 0, 4: 1, 5: 0}
    # ties go to the first cell in grid order
    tie = cross_validate({"x": {0: 1, 1: 0}, "y": {0: 1, 1: 1}}, [[1], [0]])
    assert [f["chosen"] for f in tie["folds"]] == ["x", "y"]


# ------------------------------------------------------------------------------------------------
# The whole command on a tiny model
# ------------------------------------------------------------------------------------------------


class ForwardCounter:
    def __init__(self, model):
        self.count = 0
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, *args):
        self.count += 1

    def close(self):
        self.handle.remove()


def _cfg(tmp_path, data, **kw) -> TuneConfig:
    base = dict(
        benchmark="tfqa-hf",
        strategy="dola",
        grid="dola_layers=low,high,3",
        out=str(tmp_path / "tune"),
        folds=2,
        seed=0,
        model="tiny",
        data=str(data),
        bootstrap=200,
        progress=False,
    )
    base.update(kw)
    return TuneConfig(**base)


def _values(folder: Path, metric: str = "mc1") -> dict:
    return {i: r["metrics"][metric] for i, r in read_records(item_files(folder)).items()}


def test_tune_end_to_end_selection_recomputed_from_records(tmp_path):
    torch.manual_seed(0)
    data = write_mc(tmp_path)
    report = run_tune(_cfg(tmp_path, data), model=tiny_model(), tokenizer=char_tokenizer())
    out = tmp_path / "tune"
    labels = [
        "dola_layers=low, protocol=paper",
        "dola_layers=high, protocol=paper",
        "dola_layers=3, protocol=paper",
    ]
    assert [c["cell"] for c in report["cells"]] == labels
    folders = [
        out / "cells" / s
        for s in (
            "dola_layers=low__protocol=paper",
            "dola_layers=high__protocol=paper",
            "dola_layers=3__protocol=paper",
        )
    ]
    for folder in folders + [out / "baseline"]:
        assert (folder / "summary.json").is_file()  # each cell is an ordinary finished run
    folds = report["fold_ids"]
    assert sorted(i for f in folds for i in f) == list(range(8)) and len(folds) == 2

    # Recompute the selection with plain loops from the cells' own records.
    per_cell = {label: _values(folder) for label, folder in zip(labels, folders, strict=True)}
    held_values = {}
    for f, held in enumerate(folds):
        train = [i for i in range(8) if i not in held]
        means = [sum(per_cell[lab][i] for i in train) / len(train) for lab in labels]
        best = labels[means.index(max(means))]  # first maximum
        assert report["folds"][f]["chosen"] == best
        assert report["folds"][f]["train_mean"] == pytest.approx(100 * max(means))
        assert report["folds"][f]["heldout_mean"] == pytest.approx(
            100 * sum(per_cell[best][i] for i in held) / len(held)
        )
        for i in held:
            held_values[i] = per_cell[best][i]
    cv_mean = 100 * sum(held_values.values()) / 8
    base = _values(out / "baseline")
    assert report["cv"]["mean"] == pytest.approx(cv_mean)
    assert report["baseline"]["metric"]["mean"] == pytest.approx(100 * sum(base.values()) / 8)
    assert report["cv_diff_vs_baseline"]["mean"] == pytest.approx(cv_mean - 100 * sum(base.values()) / 8)
    assert report["cv"]["ci_low"] <= report["cv"]["mean"] <= report["cv"]["ci_high"]
    for row, label in zip(report["cells"], labels, strict=True):
        assert row["metric"]["mean"] == pytest.approx(100 * sum(per_cell[label].values()) / 8)
    for stem in ("tune.json", "tune.md", "tune.png"):
        assert (out / stem).is_file()
    assert json.loads((out / "tune.json").read_text())["cv"] == report["cv"]

    # A rerun resumes: nothing is scored again and the report is the same.
    counter = ForwardCounter(tiny_model())
    try:
        again = run_tune(_cfg(tmp_path, data), model=tiny_model(), tokenizer=char_tokenizer())
    finally:
        counter.close()
    assert counter.count == 0
    assert again["cv"] == report["cv"] and again["folds"] == report["folds"]

    # An interrupted cell (its last record lost) is completed, scoring only that item.
    items = folders[1] / "items.jsonl"
    lines = items.read_text(encoding="utf-8").splitlines(keepends=True)
    items.write_text("".join(lines[:-1]), encoding="utf-8")
    (folders[1] / "summary.json").unlink()
    counter = ForwardCounter(tiny_model())
    try:
        resumed = run_tune(_cfg(tmp_path, data), model=tiny_model(), tokenizer=char_tokenizer())
    finally:
        counter.close()
    assert counter.count > 0 and len(read_records(item_files(folders[1]))) == 8
    assert resumed["cv"] == report["cv"]


def test_protocol_as_grid_name_and_reuse_of_a_finished_run(tmp_path):
    data = write_mc(tmp_path)
    # A finished run of all 8 questions, with the settings of one cell.
    done = tmp_path / "done-high-normalized"
    run_eval(
        RunConfig(
            benchmark="tfqa-hf",
            out=str(done),
            model="tiny",
            strategy="dola",
            params={"dola_layers": "high"},
            protocol="normalized",
            data=str(data),
            progress=False,
        ),
        model=tiny_model(),
        tokenizer=char_tokenizer(),
    )
    cfg = _cfg(tmp_path, data, grid="dola_layers=high;protocol=paper,normalized", limit=6, reuse=[str(done)])
    report = run_tune(cfg, model=tiny_model(), tokenizer=char_tokenizer())
    cells = {c["cell"]: c for c in report["cells"]}
    assert set(cells) == {"dola_layers=high, protocol=paper", "dola_layers=high, protocol=normalized"}
    assert cells["dola_layers=high, protocol=normalized"]["reused_from"] == str(done)
    assert cells["dola_layers=high, protocol=paper"]["reused_from"] is None
    seeded = read_records(item_files(Path(cells["dola_layers=high, protocol=normalized"]["folder"])))
    original = read_records(item_files(done))
    assert sorted(seeded) == list(range(6)) and all(seeded[i] == original[i] for i in range(6))
    assert report["n_items"] == 6


@pytest.mark.parametrize(
    "changes, fragment",
    [
        (dict(grid="alpha=1,2"), "--grid alpha: not a parameter of strategy 'dola'"),
        (dict(grid="dola_layers=low;protocol=exact"), "--grid protocol='exact': unknown"),
        (dict(grid="relative_top=0.1,7"), "--grid cell relative_top=7"),
        (dict(folds=1), "--folds 1: must be an integer >= 2"),
        (dict(metric="mc3"), "--metric mc3: tfqa-hf has mc1, mc2"),
        (
            dict(grid="dola_layers=low;protocol=paper", protocol="paper"),
            "--protocol and a protocol in --grid",
        ),
    ],
)
def test_bad_settings_name_the_option(tmp_path, changes, fragment):
    data = write_mc(tmp_path)
    with pytest.raises(EvalError, match=fragment.replace("(", r"\(")):
        run_tune(_cfg(tmp_path, data, **changes), model=tiny_model(), tokenizer=char_tokenizer())
    assert not (tmp_path / "tune" / "cells").exists()


def test_cli_tune(tmp_path, capsys):
    data = write_mc(tmp_path)
    model_dir = tiny_model_dir(str(tmp_path))
    args = [
        "tune",
        "--benchmark",
        "tfqa-hf",
        "--strategy",
        "dola",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--limit",
        "4",
        "--folds",
        "2",
        "--bootstrap",
        "100",
        "--no-progress",
        "--out",
        str(tmp_path / "t"),
    ]
    assert main(args + ["--grid", "dola_layers=high,2", "--report", "first"]) == 0
    printed = capsys.readouterr().out
    assert "Cross-validated mc1" in printed and (tmp_path / "t" / "first.md").is_file()
    assert main(args + ["--grid", "dola_layers=high;dola_layers=low"]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main(args + ["--grid", "dola_layers=high", "--folds", "0"]) == 2
    assert "--folds 0: must be an integer >= 2" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# Every cell is checked before any cell (or the baseline) runs
# ------------------------------------------------------------------------------------------------


def _count_evaluations(monkeypatch) -> list:
    """Count the batches the runs evaluate (each one runs items through the model)."""
    from contrastive_decoding.eval import runner

    calls, original = [], runner._evaluate_checked

    def evaluate(benchmark, ctx, batch, strategy):
        calls.append(len(batch))
        return original(benchmark, ctx, batch, strategy)

    monkeypatch.setattr(runner, "_evaluate_checked", evaluate)
    return calls


@pytest.mark.parametrize(
    "grid, fragments",
    [
        # The issue: [99] was found only after the baseline and the first cell had run in full.
        ("dola_layers=high,[99]", ["--grid cell dola_layers=[99]", "--param dola_layers=[99]", "6-layer"]),
        ("dola_layers=high,2,99", ["--grid cell dola_layers=99", "--param dola_layers=99", "6-layer"]),
        (
            "dola_layers=high;min_tokens_to_keep=1,100000",
            ["--grid cell dola_layers=high, min_tokens_to_keep=100000", "vocabulary"],
        ),
    ],
)
def test_model_dependent_cell_values_are_checked_before_any_run(tmp_path, monkeypatch, grid, fragments):
    data = write_mc(tmp_path)
    calls = _count_evaluations(monkeypatch)
    with pytest.raises(EvalError) as info:
        run_tune(_cfg(tmp_path, data, grid=grid), model=tiny_model(), tokenizer=char_tokenizer())
    message = str(info.value)
    assert "\n" not in message and all(f in message for f in fragments), message
    assert calls == []  # neither the baseline nor any cell ran
    assert not (tmp_path / "tune").exists()


def test_cli_tune_checks_every_cell_and_the_baseline_first(tmp_path, capsys, monkeypatch):
    data = write_mc(tmp_path)
    model_dir = tiny_model_dir(str(tmp_path))
    calls = _count_evaluations(monkeypatch)
    out = tmp_path / "t"
    capsys.readouterr()  # what saving the model folder printed
    args = ["tune", "-b", "tfqa-hf", "-s", "dola", "-m", str(model_dir), "--data", str(data), "--no-progress"]
    assert main([*args, "--out", str(out), "--grid", "dola_layers=high,[99]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--grid cell dola_layers=[99]" in err[0] and "99" in err[0], err
    assert calls == [] and not out.exists()
    # A bad --baseline is named as --baseline (it is no --strategy here), before the model loads.
    absent = ["-m", str(tmp_path / "no-model")]
    assert main([*args, *absent, "--out", str(out), "--grid", "dola_layers=high", "--baseline", "bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --baseline 'bogus' is unknown; valid:"), err
    assert "--strategy" not in err[0] and calls == [] and not out.exists()
