"""The demo (``python -m contrastive_decoding.demo``): what it prints before its tables, which
questions it uses, and what it says when TruthfulQA.csv is missing. ``load_model`` is replaced by
a tiny random llama and a character tokenizer (``tests/conftest.py``), so no SmolLM2 is needed and
the answers themselves are noise; the tests check the demo's wording and flow, not the answers."""

from __future__ import annotations

import csv
from collections import OrderedDict

import pytest
from conftest import build_model, char_tokenizer
from tokenizers import decoders
from transformers.generation import stopping_criteria

from contrastive_decoding import demo

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_csv(monkeypatch, tmp_path):
    """No TruthfulQA.csv anywhere the demo looks (as on a fresh clone without ../shared)."""
    for name in ("CD_DATA_DIR", "CD_SHARED_DATA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(demo, "_CHECKOUT_DATA", tmp_path / "shared" / "data")
    return tmp_path / "shared" / "data"


@pytest.fixture
def tiny_model(monkeypatch):
    loaded = []

    def load_model(name_or_path=demo.DEFAULT_MODEL, **kwargs):
        loaded.append(name_or_path)
        tokenizer = char_tokenizer()
        # Decode characters without spaces between them, as real tokenizers do: the demo's
        # StopStringCriteria reads every token's text through the decoder.
        tokenizer.backend_tokenizer.decoder = decoders.Fuse()
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
        return build_model("llama"), tokenizer

    monkeypatch.setattr(demo, "load_model", load_model)
    # StopStringCriteria caches its tables by vocabulary, not by decoder: this tokenizer's would be
    # reused for the plain character tokenizer (same vocabulary, which it cannot read) in later tests.
    monkeypatch.setattr(stopping_criteria, "STOP_STRING_EMBEDDING_CACHE", OrderedDict())
    return loaded


def _write_csv(path, questions):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["Question", "Best Answer", "Incorrect Answers"])
        writer.writeheader()
        for q in questions:
            writer.writerow({"Question": q, "Best Answer": "Yes it is", "Incorrect Answers": "No; Never"})


def test_default_is_the_three_builtin_questions(no_csv):
    assert len(demo.BUILTIN_QUESTIONS) == 3
    questions, source = demo.load_questions(None, 3)
    assert questions == demo.BUILTIN_QUESTIONS
    assert "the 3 built-in demo questions" in source
    # Asking for more than are built in says how many it uses.
    questions, source = demo.load_questions(None, 5)
    assert len(questions) == 3 and "the 3 built-in demo questions" in source and "asked for 5" in source


def test_missing_csv_says_where_it_goes_and_how_to_get_it(no_csv):
    _, source = demo.load_questions(None, 3)
    flat = " ".join(source.split())
    assert str(no_csv / "truthfulqa" / "TruthfulQA.csv") in flat
    assert "--truthfulqa-csv PATH" in flat
    assert demo.TRUTHFULQA_URL in flat
    assert f"contrastive-decoding data get tfqa-dola --to {no_csv}" in flat


def test_data_dir_env_and_explicit_csv_are_used(no_csv, monkeypatch, tmp_path):
    data = tmp_path / "data"
    _write_csv(data / "truthfulqa" / "TruthfulQA.csv", ["Is A?", "Is B?", "Is C?", "Is D?"])
    monkeypatch.setenv("CD_DATA_DIR", str(data))
    questions, source = demo.load_questions(None, 2)
    assert [q["Question"] for q in questions] == ["Is A?", "Is B?"]
    assert "the first 2 questions of" in source and "not found" not in source
    # --builtin wins over a file that is there, and says nothing about a missing one.
    questions, source = demo.load_questions(None, 3, builtin=True)
    assert questions == demo.BUILTIN_QUESTIONS and "not found" not in source
    # An explicit --truthfulqa-csv that does not exist is an error, not a silent fallback.
    with pytest.raises(FileNotFoundError, match="--truthfulqa-csv"):
        demo.load_questions(tmp_path / "nope.csv", 3)


def test_missing_explicit_csv_exits_before_loading_the_model(tiny_model, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--truthfulqa-csv", str(tmp_path / "nope.csv")])
    assert exc.value.code == 2
    assert "no such file" in capsys.readouterr().err
    assert tiny_model == []


def test_explanation_covers_what_the_tables_show():
    text = " ".join(demo.explanation().split())
    for phrase in (
        "SmolLM2-135M-Instruct",
        "At 135M parameters expect the contrastive answers to be worse",
        "7B to 65B",
        "`best`",
        "`max false`",
        "summed log-probabilities",
        "paper protocol",
        "without the final norm",
        "hundreds or thousands",
        "docs/results.md",
        "docs/guides/own-model.md",
    ):
        assert phrase in text, phrase
    other = " ".join(demo.explanation("meta-llama/Llama-2-7b-hf").split())
    assert "meta-llama/Llama-2-7b-hf" in other and "135M" not in other.split("SmolLM2-135M")[0]


def test_main_prints_the_explanation_before_the_tables(no_csv, tiny_model, capsys):
    demo.main(["--max-new-tokens", "2"])
    out = capsys.readouterr().out
    assert tiny_model == [demo.DEFAULT_MODEL]
    explanation = demo.explanation()
    assert out.startswith(explanation)
    first_table = out.index("=" * 100)
    assert out.index("TruthfulQA.csv was not found") < first_table
    for row in demo.BUILTIN_QUESTIONS:
        assert f"Q: {row['Question']}" in out
    assert out.count("MC1 correct") + out.count("MC1 wrong") == 3 * 4  # 3 questions x 4 rows
    assert "MC1 on these 3 questions: greedy" in out
