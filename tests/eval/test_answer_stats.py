"""`contrastive-decoding answers`: counts of a generation run's answers against hand-counted
handmade runs, sharded items merged, scoring runs refused; and end to end on a tiny model's run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from contrastive_decoding.eval.answer_stats import answer_stats
from contrastive_decoding.eval.cli import main
from evalkit import (
    one_thread,  # noqa: F401 - autouse fixture
    read_jsonl,
    tiny_model_dir,
    write_gsm8k_jsonl,
)


def _run_folder(root: Path, name: str, records: list[dict], task: str = "generate", **summary) -> Path:
    folder = root / name
    folder.mkdir()
    settings = {
        "benchmark": "strategyqa",
        "task": task,
        "strategy_label": "dola[dola_layers=low]",
        "generation": {"max_new_tokens": 8, "repetition_penalty": 1.2} if task == "generate" else None,
        "n_items": len(records),
        **summary,
    }
    (folder / "summary.json").write_text(json.dumps(settings), encoding="utf-8")
    (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return folder


# Token counts 8, 3, 8, 5 against a limit of 8; answers read: False, none, True, none.
RECORDS = [
    {"id": 0, "n_tokens": 8, "pred": False},
    {"id": 1, "n_tokens": 3, "pred": None},
    {"id": 2, "n_tokens": 8, "pred": True},
    {"id": 3, "n_tokens": 5, "pred": None},
]


def test_counts_equal_hand_counts(tmp_path):
    stats = answer_stats(_run_folder(tmp_path, "run", RECORDS))
    assert stats["n"] == 4 and stats["max_new_tokens"] == 8 and stats["repetition_penalty"] == 1.2
    assert stats["mean_tokens"] == pytest.approx((8 + 3 + 8 + 5) / 4)
    assert stats["at_limit"] == 2  # ids 0 and 2
    assert stats["no_answer"] == 2  # ids 1 and 3 (a read "no", False, is an answer)


def test_sharded_items_are_merged_and_extraction_free_benchmarks_show_no_count(tmp_path):
    folder = _run_folder(tmp_path, "run", RECORDS[:1], benchmark="tfqa-gen", n_items=3)
    shard = [{"id": 1, "n_tokens": 2}, {"id": 2, "n_tokens": 8}]
    (folder / "items.jsonl").unlink()
    (folder / "items.shard0-of-2.jsonl").write_text(json.dumps({"id": 0, "n_tokens": 8}) + "\n")
    (folder / "items.shard1-of-2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shard))
    stats = answer_stats(folder)
    assert (stats["n"], stats["at_limit"], stats["no_answer"]) == (3, 2, None)
    assert stats["mean_tokens"] == pytest.approx(6.0)


def test_cli_table_rows_in_order_unfinished_left_out(tmp_path, capsys):
    a = _run_folder(tmp_path, "a", RECORDS)
    b = _run_folder(tmp_path, "b", RECORDS[:2], strategy_label="baseline")
    unfinished = tmp_path / "unfinished"  # settings and some items, no summary yet
    unfinished.mkdir()
    (unfinished / "run.json").write_text("{}", encoding="utf-8")
    (unfinished / "items.jsonl").write_text(json.dumps(RECORDS[0]) + "\n", encoding="utf-8")
    assert main(["answers", str(a), str(unfinished), str(b)]) == 0
    captured = capsys.readouterr()
    assert f"{unfinished}: unfinished, left out" in captured.err
    head, _, *rows = captured.out.splitlines()
    assert head.split(" | ")[-2:] == ["at the token limit", "no answer read |"]
    assert rows == [
        "| strategyqa | dola[dola_layers=low] | 1.2 | 4 | 6.0 | 2 (limit 8) | 2 |",
        "| strategyqa | baseline | 1.2 | 2 | 5.5 | 1 (limit 8) | 1 |",
    ]


def test_runs_of_one_label_are_told_apart_by_what_differs(tmp_path):
    from contrastive_decoding.eval.answer_stats import answer_stats_table

    a = _run_folder(tmp_path, "a", RECORDS, model="HuggingFaceTB/SmolLM2-135M-Instruct")
    b = _run_folder(tmp_path, "b", RECORDS, model="smollm2")
    c = _run_folder(tmp_path, "c", RECORDS, model="smollm2")
    rows = [r.split(" | ")[1] for r in answer_stats_table([a, b, c]).splitlines()[2:]]
    # b and c differ in nothing recorded but their folders.
    assert rows == [
        "dola[dola_layers=low]; model=HuggingFaceTB/SmolLM2-135M-Instruct",
        f"dola[dola_layers=low]; model=smollm2 (embedded SmolLM2-135M-Instruct); {b}",
        f"dola[dola_layers=low]; model=smollm2 (embedded SmolLM2-135M-Instruct); {c}",
    ]
    assert answer_stats(b)["model"] == "smollm2 (embedded SmolLM2-135M-Instruct)"


def test_bad_folders_give_one_line(tmp_path, capsys):
    scored = _run_folder(tmp_path, "scored", [{"id": 0, "metrics": {"acc": 1.0}}], task="score")
    assert main(["answers", str(scored)]) == 2
    err = capsys.readouterr().err
    assert "scored, not generated" in err and "tfqa-gen, strategyqa, gsm8k" in err
    short = _run_folder(tmp_path, "short", RECORDS, n_items=5)  # a record missing
    assert main(["answers", str(short)]) == 2
    assert "5 records" in capsys.readouterr().err
    assert main(["answers", str(tmp_path / "nothing")]) == 2
    assert "no summary.json" in capsys.readouterr().err


def test_end_to_end_on_a_tiny_model_run(tmp_path, capsys):
    model = str(tiny_model_dir(str(tmp_path / "model")))
    data = write_gsm8k_jsonl(tmp_path)
    out = tmp_path / "run"
    argv = ["eval", "-b", "gsm8k", "-m", model, "--data", str(data), "--out", str(out)]
    assert main([*argv, "--max-new-tokens", "6", "--no-progress"]) == 0
    capsys.readouterr()
    records = read_jsonl(out / "items.jsonl")
    stats = answer_stats(out)
    assert stats["n"] == len(records) == 3 and stats["max_new_tokens"] == 6
    assert stats["at_limit"] == sum(r["n_tokens"] == 6 for r in records)
    assert stats["no_answer"] == sum(r["pred"] is None for r in records)
