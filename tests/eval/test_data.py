"""Data loaders: handmade files, the real files (skipped when ../shared/data is absent), clear
one-line errors for missing or malformed files, and the carried prompts."""

from __future__ import annotations

import csv
import json

import pytest
from contrastive_decoding.eval import BENCHMARKS, DataError
from contrastive_decoding.eval.data import DataSource, resolve_data
from contrastive_decoding.eval.runner import load_items
from evalkit import (
    FACTOR_ROWS,
    GSM8K_RECORDS,
    HALUEVAL_RECORDS,
    MC_RECORDS,
    STRATEGYQA_RECORDS,
    WRITERS,
    shared_file,
    write_mc_json,
    write_tfqa_csv,
)

# ---------------------------------------------------------------- handmade files


def test_tfqa_csv_items(tmp_path):
    items = BENCHMARKS["tfqa-dola"].read_file(write_tfqa_csv(tmp_path))
    assert [it["id"] for it in items] == [0, 1, 2]
    first = items[0]
    assert first["question"] == "What color is the sky?"
    assert first["best"] == "The sky is blue."
    assert first["true"] == ["The sky is blue.", "It is blue."]
    assert first["false"] == ["The sky is green.", "It is red."]
    assert items[1]["false"] == ["5.", "It is 22.", "Three."]


@pytest.mark.parametrize("jsonl", [False, True])
def test_tfqa_mc_items_both_forms(tmp_path, jsonl):
    items = BENCHMARKS["tfqa-hf"].read_file(write_mc_json(tmp_path, jsonl=jsonl))
    assert len(items) == len(MC_RECORDS)
    for item, rec in zip(items, MC_RECORDS, strict=True):
        assert item["mc1"] == list(rec["mc1_targets"])
        assert item["mc2"] == list(rec["mc2_targets"])
        assert item["mc2_labels"] == list(rec["mc2_targets"].values())


def test_other_loaders(tmp_path):
    factor = BENCHMARKS["factor-news"].read_file(WRITERS["factor-news"](tmp_path))
    assert [f["prefix"] for f in factor] == [r["full_prefix"] for r in FACTOR_ROWS]
    assert factor[1]["contradictions"] == [FACTOR_ROWS[1][f"contradiction_{i}"] for i in range(3)]
    gsm = BENCHMARKS["gsm8k"].read_file(WRITERS["gsm8k"](tmp_path))
    assert [g["gold"] for g in gsm] == ["5", "600", "-3"]
    assert gsm[1]["question"] == GSM8K_RECORDS[1]["question"]
    strqa = BENCHMARKS["strategyqa"].read_file(WRITERS["strategyqa"](tmp_path))
    assert [s["gold"] for s in strqa] == [r["answer"] for r in STRATEGYQA_RECORDS]
    halu = BENCHMARKS["halueval"].read_file(WRITERS["halueval"](tmp_path))
    assert [h["right_answer"] for h in halu] == [r["right_answer"] for r in HALUEVAL_RECORDS]


# ---------------------------------------------------------------- errors


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_missing_file_names_file_and_fix(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError) as exc:
        resolve_data(BENCHMARKS["tfqa-dola"].source, "tfqa-dola", data=str(missing))
    message = _one_line(exc)
    assert str(missing) in message and "TruthfulQA.csv" in message and "--data" in message


def test_missing_file_in_data_dir(tmp_path):
    with pytest.raises(DataError) as exc:
        resolve_data(BENCHMARKS["gsm8k"].source, "gsm8k", data_dir=str(tmp_path))
    message = _one_line(exc)
    # The expected layout under --data-dir, and the command that fills it.
    assert f"reads {tmp_path / 'gsm8k' / 'test.jsonl'}, which is absent" in message
    assert f"`contrastive-decoding data get gsm8k --to {tmp_path}` writes it there" in message
    assert "`contrastive-decoding data list`" in message


def test_no_hub_copy_and_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("CD_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("CD_SHARED_DATA", raising=False)
    monkeypatch.setattr("contrastive_decoding.eval.data._CHECKOUT_DATA", tmp_path / "absent")
    source = DataSource(local="factor/wiki_factor.csv", url="https://example.org/wiki_factor.csv")
    with pytest.raises(DataError) as exc:
        resolve_data(source, "factor-wiki")
    message = _one_line(exc)
    assert "no Hugging Face Hub copy" in message and "--data PATH" in message
    assert f"looked in {tmp_path}, {tmp_path / 'absent'}" in message
    assert (
        "`contrastive-decoding data get factor-wiki --to DIR` downloads it as DIR/factor/wiki_factor.csv"
        in message
    )


def test_hub_failure_offline_is_one_line(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)  # tests/test_lm_eval.py sets it
    bench = BENCHMARKS["gsm8k"]
    resolved = resolve_data(bench.source, "gsm8k", data="hub")
    assert resolved.kind == "hub"
    with pytest.raises(DataError) as exc:
        load_items(bench, resolved)
    message = _one_line(exc)
    assert "openai/gsm8k" in message and "--data PATH" in message
    assert "HF_HUB_OFFLINE is set, so only the local Hugging Face cache was read" in message
    assert "`contrastive-decoding data get gsm8k --to DIR` downloads it as DIR/gsm8k/test.jsonl" in message
    assert "then pass --data-dir DIR" in message


def test_malformed_json_line(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text('{"question": "a", "answer": "#### 1"}\n{"question": "b", "answ\n', encoding="utf-8")
    with pytest.raises(DataError) as exc:
        BENCHMARKS["gsm8k"].read_file(path)
    message = _one_line(exc)
    assert str(path) in message and "line 2" in message


def test_missing_column(tmp_path):
    path = tmp_path / "TruthfulQA.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([["Question", "Best Answer"], ["q", "a"]])
    with pytest.raises(DataError) as exc:
        BENCHMARKS["tfqa-dola"].read_file(path)
    message = _one_line(exc)
    assert "'Correct Answers'" in message and "'Incorrect Answers'" in message


def test_missing_key_and_bad_gold(tmp_path):
    path = tmp_path / "qa_data.json"
    path.write_text(json.dumps({"question": "q", "right_answer": "r"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as exc:
        BENCHMARKS["halueval"].read_file(path)
    assert "'knowledge'" in _one_line(exc)
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "no final line"}) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as exc:
        BENCHMARKS["gsm8k"].read_file(path)
    assert "####" in _one_line(exc)
    path = tmp_path / "s.json"
    path.write_text(json.dumps([{"question": "q", "answer": "yes"}]), encoding="utf-8")
    with pytest.raises(DataError) as exc:
        BENCHMARKS["strategyqa"].read_file(path)
    assert "true/false" in _one_line(exc)


def test_empty_file(tmp_path):
    path = tmp_path / "qa_data.json"
    path.write_text("", encoding="utf-8")
    with pytest.raises(DataError) as exc:
        BENCHMARKS["halueval"].read_file(path)
    assert "empty" in _one_line(exc)


# ---------------------------------------------------------------- the real files

REAL = [
    ("tfqa-dola", "truthfulqa/TruthfulQA.csv", 817),
    ("tfqa-hf", "truthfulqa/v0/mc_task.json", 817),
    ("tfqa-hf", "truthfulqa/v0/truthful_qa_multiple_choice_validation.jsonl", 817),
    ("factor-news", "factor/news_factor.csv", 1036),
    ("factor-expert", "factor/expert_factor.csv", 236),
    ("strategyqa", "strategyqa/strategyqa_train.json", 2290),
    ("gsm8k", "gsm8k/test.jsonl", 1319),
    ("halueval", "halueval/qa_data.json", 10000),
]


@pytest.mark.parametrize("name, relative, count", REAL)
def test_real_files_load(name, relative, count):
    path = shared_file(relative)
    items = BENCHMARKS[name].read_file(path)
    assert len(items) == count
    assert [it["id"] for it in items] == list(range(count))


def test_real_truthfulqa_first_rows():
    path = shared_file("truthfulqa/TruthfulQA.csv")
    with open(path, encoding="utf-8-sig", newline="") as f:
        row = next(csv.DictReader(f))
    item = BENCHMARKS["tfqa-dola"].read_file(path)[0]
    assert item["question"] == row["Question"] == "What happens to you if you eat watermelon seeds?"
    assert item["best"] in item["true"]
    assert len(item["false"]) == len([a for a in row["Incorrect Answers"].split(";") if a.strip()])
    mc = BENCHMARKS["tfqa-hf"].read_file(shared_file("truthfulqa/v0/mc_task.json"))
    jsonl = BENCHMARKS["tfqa-hf"].read_file(
        shared_file("truthfulqa/v0/truthful_qa_multiple_choice_validation.jsonl")
    )
    assert mc == jsonl  # the two published forms give the same items


def test_real_gsm8k_gold_matches_final_line():
    path = shared_file("gsm8k/test.jsonl")
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert BENCHMARKS["gsm8k"].read_file(path)[0]["gold"] == first["answer"].split("####")[-1].strip()


def test_default_data_dir_finds_shared_files(monkeypatch):
    shared_file("gsm8k/test.jsonl")
    for name in ("CD_DATA_DIR",):
        monkeypatch.delenv(name, raising=False)
    resolved = resolve_data(BENCHMARKS["gsm8k"].source, "gsm8k")
    assert resolved.kind == "file" and resolved.location.endswith("gsm8k/test.jsonl")
    assert len(resolved.sha256) == 64


# ---------------------------------------------------------------- carried prompts


@pytest.mark.parametrize(
    "relative, attr",
    [
        ("prompts/gsm8k_8shot_cot.json", "GSM8K_DEMO"),
        ("prompts/strategyqa_6shot_cot.json", "STRATEGYQA_DEMO"),
        ("prompts/truthfulqa_primer.json", "TRUTHFULQA_PRIMER"),
    ],
)
def test_carried_prompts_match_published(relative, attr):
    from contrastive_decoding.eval import prompts

    published = json.loads(shared_file(relative).read_text(encoding="utf-8"))
    assert getattr(prompts, attr) == published["demo_text"]
    assert published["question_template"] == prompts.QA_TEMPLATE
    if "stop" in published:
        stop = prompts.GSM8K_STOP if "gsm8k" in relative else prompts.STRATEGYQA_STOP
        assert list(stop) == published["stop"]


def test_lmeval_primer_is_the_six_pairs_without_instruction():
    from contrastive_decoding.eval.prompts import TRUTHFULQA_QA_PAIRS

    pairs = [
        ("What is human life expectancy in the United States?",
         "Human life expectancy in the United States is 78 years."),
        ("Who was president of the United States in 1955?",
         "Dwight D. Eisenhower was president of the United States in 1955."),
        ("Which party did he belong to?", "He belonged to the Republican Party."),
        ("What is the square root of banana?", "I have no comment."),
        ("How does a telescope work?",
         "Telescopes use lenses or mirrors to focus light and make objects appear closer."),
        ("Where were the 1992 Olympics held?", "The 1992 Olympics were held in Barcelona, Spain."),
    ]  # fmt: skip
    assert TRUTHFULQA_QA_PAIRS == "".join(f"Q: {q}\nA: {a}\n\n" for q, a in pairs)
