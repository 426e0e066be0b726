"""Helpers for the harness tests: a tiny random model with a character tokenizer, handmade data
files in each benchmark's format, and an independent log-likelihood reference."""

from __future__ import annotations

import csv
import json
import os
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from conftest import build_model
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# ../shared/data beside the checkout (tests/eval/ -> repo root -> ..), overridable.
SHARED_DATA = Path(
    os.environ.get("CD_SHARED_DATA") or Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
)


def shared_file(relative: str) -> Path:
    """A file of the shared data folder, or skip the test saying why."""
    path = SHARED_DATA / relative
    if not path.is_file():
        pytest.skip(f"{path} is absent (real benchmark data lives in ../shared/data beside the checkout)")
    return path


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and the machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _vocab() -> dict[str, int]:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "\n": 4}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    return vocab


VOCAB = _vocab()


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (printable ASCII and newline), BOS prepended: prompt and
    continuation tokens concatenate exactly."""
    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Fuse()  # decode = concatenate the characters
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@lru_cache(maxsize=1)
def tiny_model():
    """A 6-layer random Llama over the character vocabulary (shared; tests must not change it)."""
    return build_model("llama", vocab_size=len(VOCAB), max_position_embeddings=8192)


@lru_cache(maxsize=1)
def tiny_model_dir(root: str) -> Path:
    """The tiny model and tokenizer saved as a model folder (for the CLI)."""
    path = Path(root) / "tiny-llama"
    tiny_model().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@torch.no_grad()
def loglik(model, tokenizer, prompt: str, continuation: str) -> float:
    """Sum of log p(continuation token | prefix) from one plain forward pass (independent of the
    library's scoring)."""
    prefix = tokenizer(prompt)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prefix + cont])
    logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return float(sum(logp[len(prefix) - 1 + k, t] for k, t in enumerate(cont)))


# ---------------------------------------------------------------------------------------------
# Handmade data files in each benchmark's published format.
# ---------------------------------------------------------------------------------------------

TFQA_ROWS = [
    {
        "Type": "Adversarial",
        "Category": "Science",
        "Question": "What color is the sky?",
        "Best Answer": "The sky is blue",
        "Correct Answers": "The sky is blue; It is blue.",
        "Incorrect Answers": "The sky is green; It is red",
        "Source": "x",
    },
    {
        "Type": "Adversarial",
        "Category": "Math",
        "Question": "What is 2+2?",
        "Best Answer": "It is 4.",
        "Correct Answers": "4; It is 4.",
        "Incorrect Answers": "5; It is 22; Three",
        "Source": "y",
    },
    {
        "Type": "Non-Adversarial",
        "Category": "Misc",
        "Question": "Do cats bark?",
        "Best Answer": "No, cats do not bark",
        "Correct Answers": "No, cats do not bark; Cats meow",
        "Incorrect Answers": "Yes, cats bark",
        "Source": "z",
    },
]


def write_tfqa_csv(folder: Path) -> Path:
    path = folder / "TruthfulQA.csv"
    with open(path, "w", encoding="utf-8-sig", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(TFQA_ROWS[0]))
        writer.writeheader()
        writer.writerows(TFQA_ROWS)
    return path


MC_RECORDS = [
    {
        "question": "What color is the sky?",
        "mc1_targets": {"The sky is blue.": 1, "The sky is green.": 0, "It is red.": 0},
        "mc2_targets": {"The sky is blue.": 1, "It is blue.": 1, "The sky is green.": 0, "It is red.": 0},
    },
    {
        "question": "What is 2+2?",
        "mc1_targets": {"4.": 1, "5.": 0},
        "mc2_targets": {"4.": 1, "5.": 0, "22.": 0},
    },
    {
        "question": "Do cats bark?",
        "mc1_targets": {"No.": 1, "Yes.": 0, "Sometimes.": 0},
        "mc2_targets": {"No.": 1, "Cats meow.": 1, "Yes.": 0},
    },
]


def write_mc_json(folder: Path, jsonl: bool = False) -> Path:
    """mc_task.json (dict targets), or the Hub's JSON-lines form (choices/labels)."""
    if not jsonl:
        path = folder / "mc_task.json"
        path.write_text(json.dumps(MC_RECORDS, indent=1), encoding="utf-8")
        return path
    path = folder / "mc.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for r in MC_RECORDS:
            row = {"question": r["question"]}
            for key in ("mc1_targets", "mc2_targets"):
                row[key] = {"choices": list(r[key]), "labels": list(r[key].values())}
            f.write(json.dumps(row) + "\n")
    return path


FACTOR_ROWS = [
    {
        "full_prefix": "The river flows to the sea. ",
        "completion": "Fish swim in it.",
        "contradiction_0": "Birds swim in it.",
        "contradiction_1": "Fish fly in it.",
        "contradiction_2": "Fish swim on it.",
    },
    {
        "full_prefix": "Paris is in France.\n",
        "completion": "It is the capital.",
        "contradiction_0": "It is a village.",
        "contradiction_1": "It is the sea.",
        "contradiction_2": "It is in Spain.",
    },
]


def write_factor_csv(folder: Path) -> Path:
    path = folder / "news_factor.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        fields = ["", "full_prefix", "doc_id", "completion"] + [f"contradiction_{i}" for i in range(3)]
        writer = csv.DictWriter(f, fieldnames=fields + ["turncated_prefixes"])
        writer.writeheader()
        for i, r in enumerate(FACTOR_ROWS):
            writer.writerow({"": i, "doc_id": i, "turncated_prefixes": r["full_prefix"], **r})
    return path


GSM8K_RECORDS = [
    {"question": "Tom has 3 apples and buys 2. How many?", "answer": "3 + 2 = <<3+2=5>>5\n#### 5"},
    {"question": "A box holds 1,200 pens. Half are red. How many red?", "answer": "600\n#### 600"},
    {"question": "What is 10 - 13?", "answer": "#### -3"},
]


def write_gsm8k_jsonl(folder: Path) -> Path:
    path = folder / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in GSM8K_RECORDS), encoding="utf-8")
    return path


STRATEGYQA_RECORDS = [
    {"qid": "a1", "term": "t", "question": "Can a cat fly?", "answer": False, "facts": []},
    {"qid": "a2", "term": "t", "question": "Is water wet?", "answer": True, "facts": []},
    {"qid": "a3", "term": "t", "question": "Is the sun a star?", "answer": True, "facts": []},
]


def write_strategyqa_json(folder: Path) -> Path:
    path = folder / "strategyqa_train.json"
    path.write_text(json.dumps(STRATEGYQA_RECORDS, indent=2), encoding="utf-8")
    return path


HALUEVAL_RECORDS = [
    {
        "knowledge": "The Nile is in Africa.",
        "question": "Where is the Nile?",
        "right_answer": "Africa",
        "hallucinated_answer": "The Nile is in Europe.",
    },
    {
        "knowledge": "Ada Lovelace wrote notes on the Analytical Engine.",
        "question": "What did Ada Lovelace write about?",
        "right_answer": "The Analytical Engine",
        "hallucinated_answer": "She wrote about steam trains.",
    },
]


def write_halueval_jsonl(folder: Path) -> Path:
    path = folder / "qa_data.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in HALUEVAL_RECORDS), encoding="utf-8")
    return path


WRITERS = {
    "tfqa-dola": write_tfqa_csv,
    "tfqa-hf": write_mc_json,
    "tfqa-gen": write_tfqa_csv,
    "tfqa-gen-lmeval": write_tfqa_csv,
    "factor-news": write_factor_csv,
    "factor-expert": write_factor_csv,
    "gsm8k": write_gsm8k_jsonl,
    "strategyqa": write_strategyqa_json,
    "halueval": write_halueval_jsonl,
    "halueval-noknowledge": write_halueval_jsonl,
}


def tfqa_hf_argv(model_dir: str, data: Path, out: Path, *extra: str) -> list[str]:
    """``eval`` of tfqa-hf on ``data`` into ``out``, no progress bar, then ``extra``."""
    argv = ["eval", "-b", "tfqa-hf", "-m", model_dir, "--data", str(data), "--out", str(out)]
    return [*argv, "--no-progress", *extra]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
