"""contrastive-decoding analyze: length-bias diagnostics against hand counts.

The character tokenizer makes one token per character, so an answer's token count is the length
of " " + answer, counted by hand below.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from contrastive_decoding.eval.cli import main
from contrastive_decoding.eval.errors import EvalError
from contrastive_decoding.eval.length_bias import (
    analyze_runs,
    choice_correct,
    length_bias_table,
    within_item_correlation,
)
from contrastive_decoding.eval.records import item_files, read_records
from contrastive_decoding.eval.runner import RunConfig, run_eval
from evalkit import (
    MC_RECORDS,
    char_tokenizer,
    tiny_model,
    tiny_model_dir,
    write_halueval_jsonl,
    write_mc_json,
)

# Hand counts: " The sky is blue." 17, " The sky is green." 18, " It is red." 11; " 4." 3, " 5." 3;
# " No." 4, " Yes." 5, " Sometimes." 11.
MC1_LENGTHS = {0: [17, 18, 11], 1: [3, 3], 2: [4, 5, 11]}
# HaluEval: " Africa" 7 vs " The Nile is in Europe." 23; " The Analytical Engine" 22 vs
# " She wrote about steam trains." 30.
HALU_LENGTHS = {0: [7, 23], 1: [22, 30]}


def test_choice_rules_and_correlation_by_hand():
    assert choice_correct([2.0, 2.0, 1.0], 0, "argmax") is True  # lm-eval: first maximum wins
    assert choice_correct([2.0, 2.0, 1.0], 0, "strict") is False
    assert choice_correct([2.0, 2.0, 1.0], 0, "geq") is True
    assert choice_correct([1.0, 2.0], 0, "geq") is False
    # centred: x = (-1, 1), (-1, 0, 1); y = (-1, 1), (2, 0, -2): sum xy = 2 - 4 = -2,
    # sum x^2 = 4, sum y^2 = 2 + 8 = 10 -> -2 / sqrt(40)
    value = within_item_correlation([([1, 3], [0.0, 2.0]), ([1, 2, 3], [5.0, 3.0, 1.0])])
    assert value == pytest.approx(-2 / np.sqrt(40))
    assert within_item_correlation([([4, 4], [1.0, 2.0])]) is None  # no length variation: undefined, not NaN


def _run(
    tmp_path: Path,
    benchmark: str,
    data: Path,
    name: str,
    strategy="baseline",
    params=None,
    protocol=None,
    model_label="tiny",
) -> Path:
    out = tmp_path / benchmark / name
    run_eval(
        RunConfig(
            benchmark=benchmark,
            out=str(out),
            model=model_label,
            strategy=strategy,
            params=params or {},
            protocol=protocol,
            data=str(data),
            progress=False,
        ),
        model=tiny_model(),
        tokenizer=char_tokenizer(),
    )
    return out


def _expected(folder: Path, lengths: dict, score_keys, rule: str) -> dict:
    """Chosen-is-longest, per-token metric and correlation, with plain loops."""
    records = read_records(item_files(folder))
    chosen_longest = per_token = 0
    xs, ys = [], []
    for i, lens in lengths.items():
        scores = score_keys(records[i])
        pick = max(range(len(scores)), key=lambda k: (scores[k], -k))
        chosen_longest += lens[pick] == max(lens)
        norm = [s / n for s, n in zip(scores, lens, strict=True)]
        if rule == "argmax":
            per_token += max(range(len(norm)), key=lambda k: (norm[k], -k)) == 0
        else:
            per_token += all(norm[0] > v for v in norm[1:])
        xs += [n - np.mean(lens) for n in lens]
        ys += [s - np.mean(scores) for s in scores]
    n = len(lengths)
    return {
        "chosen_longest": 100 * chosen_longest / n,
        "per_token": 100 * per_token / n,
        "length_corr": float(np.dot(xs, ys) / np.sqrt(np.dot(xs, xs) * np.dot(ys, ys))),
        "metric_value": 100
        * np.mean([r["metrics"]["mc1" if rule == "argmax" else "acc"] for r in records.values()]),
    }


def test_tfqa_hf_and_halueval_against_hand_counts(tmp_path):
    mc = write_mc_json(tmp_path)
    halu = write_halueval_jsonl(tmp_path)
    runs = [
        _run(tmp_path, "tfqa-hf", mc, "baseline"),
        _run(tmp_path, "tfqa-hf", mc, "dola", "dola", {"dola_layers": "high"}, "paper"),
        _run(tmp_path, "halueval", halu, "baseline"),
        _run(tmp_path, "halueval", halu, "dola", "dola", {"dola_layers": "high"}, "paper"),
    ]
    rows = analyze_runs(runs, tokenizer=char_tokenizer())
    assert [(r["benchmark"], r["label"]) for r in rows] == [
        ("tfqa-hf", "baseline"),
        ("tfqa-hf", "dola-high"),
        ("tfqa-hf", "always longest"),
        ("tfqa-hf", "always shortest"),
        ("halueval", "baseline"),
        ("halueval", "dola-high"),
        ("halueval", "always longest"),
        ("halueval", "always shortest"),
    ]
    by = {(r["benchmark"], r["label"]): r for r in rows}
    # Correct answer among the longest: item 1 only (a 3-3 tie) -> 1/3; HaluEval: never.
    assert all(r["correct_longest"] == pytest.approx(100 / 3) for r in rows[:4])
    assert all(r["correct_longest"] == 0.0 for r in rows[4:])
    # Always longest (argmax, first of equal lengths): item 0 picks "green" (wrong), item 1 the tie's
    # first = the true answer, item 2 "Sometimes." (wrong) -> 1/3. Always shortest: "It is red."
    # (wrong), the tie's first (right), "No." (right) -> 2/3. HaluEval: longest always the
    # hallucination -> 0; shortest always the right answer -> 100.
    assert by[("tfqa-hf", "always longest")]["metric_value"] == pytest.approx(100 / 3)
    assert by[("tfqa-hf", "always shortest")]["metric_value"] == pytest.approx(200 / 3)
    assert by[("halueval", "always longest")]["metric_value"] == 0.0
    assert by[("halueval", "always shortest")]["metric_value"] == 100.0
    assert by[("tfqa-hf", "always longest")]["chosen_longest"] == 100.0
    assert by[("tfqa-hf", "always shortest")]["chosen_longest"] == pytest.approx(100 / 3)  # the tie
    mc1_scores = lambda r: r["scores_mc1"]  # noqa: E731
    halu_scores = lambda r: [r["score_right"], r["score_hallucinated"]]  # noqa: E731
    for folder, bench, lengths, scores, rule in [
        (runs[0], "tfqa-hf", MC1_LENGTHS, mc1_scores, "argmax"),
        (runs[1], "tfqa-hf", MC1_LENGTHS, mc1_scores, "argmax"),
        (runs[2], "halueval", HALU_LENGTHS, halu_scores, "strict"),
        (runs[3], "halueval", HALU_LENGTHS, halu_scores, "strict"),
    ]:
        row = next(r for r in rows if r["run"] == str(folder))
        expected = _expected(folder, lengths, scores, rule)
        for key, value in expected.items():
            assert row[key] == pytest.approx(value), (bench, key)
        assert row["recorded_metric"] == pytest.approx(row["metric_value"])
    table = length_bias_table(rows)
    assert "| tfqa-hf | always longest | - | 3 | mc1 33.3 | 100.0 | 33.3 | - | - |" in table
    # Runs named from their recorded settings: `dola --param dola_layers=high` is the preset.
    assert "| tfqa-hf | dola-high | paper | 3 |" in table and "| halueval | baseline | loglik | 2 |" in table


def test_limit_and_shared_items(tmp_path):
    mc = write_mc_json(tmp_path)
    base = _run(tmp_path, "tfqa-hf", mc, "baseline")
    rows = analyze_runs([base], limit=2, tokenizer=char_tokenizer())
    assert rows[0]["n"] == 2
    # items 0, 1: always longest -> wrong, right (the tie) -> 50
    assert rows[1]["metric_value"] == 50.0
    with pytest.raises(EvalError, match="--limit 0: must be a positive integer"):
        analyze_runs([base], limit=0, tokenizer=char_tokenizer())


def test_refuses_generation_and_unfinished_runs(tmp_path):
    from evalkit import write_gsm8k_jsonl

    gsm = write_gsm8k_jsonl(tmp_path)
    out = tmp_path / "gsm"
    run_eval(
        RunConfig(
            benchmark="gsm8k", out=str(out), model="tiny", data=str(gsm), max_new_tokens=2, progress=False
        ),
        model=tiny_model(),
        tokenizer=char_tokenizer(),
    )
    with pytest.raises(EvalError, match="a gsm8k run is not multiple choice"):
        analyze_runs([out], tokenizer=char_tokenizer())
    with pytest.raises(EvalError, match="no summary.json"):
        analyze_runs([tmp_path / "nothing"], tokenizer=char_tokenizer())
    with pytest.raises(EvalError, match="at least one"):
        analyze_runs([], tokenizer=char_tokenizer())


def test_cli_analyze_loads_the_run_tokenizer(tmp_path, capsys):
    mc = write_mc_json(tmp_path)
    model_dir = tiny_model_dir(str(tmp_path))
    base = _run(tmp_path, "tfqa-hf", mc, "baseline", model_label=str(model_dir))
    out_json = tmp_path / "rows.json"
    assert main(["analyze", str(base), "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "| tfqa-hf | always shortest | - | 3 | mc1 66.7 |" in printed
    rows = json.loads(out_json.read_text())
    assert rows[0]["correct_longest"] == pytest.approx(100 / 3)
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    assert "no summary.json" in capsys.readouterr().err
    assert len(MC_RECORDS) == 3  # the hand counts above are for these three questions
