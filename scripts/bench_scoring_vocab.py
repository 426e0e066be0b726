#!/usr/bin/env python
"""Multiple-choice scoring time with LayerCake against the plain model, at a small and a large
tokenizer vocabulary, in one run.

LayerCake's token classes come from the tokenizer. Scoring copies each row's token history once
per answer; a copy that took the token classifier along would copy the tokenizer too, which for a
262k-vocabulary tokenizer cost 87 of 101 s of one 4-answer item. The script builds a tiny random
llama and a word-level tokenizer of each vocabulary size, scores the same 4-answer items with
``strategy=None`` and ``strategy=LayerCake()``, and prints ms per item and the ratio LayerCake /
plain: it should not grow with the vocabulary.

Example:
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_scoring_vocab.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from contrastive_decoding import LayerCake, score_continuations

WORDS = "the a of Paris France capital river , . is in on".split()


def _tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    table = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in WORDS:
        table[word] = len(table)
    for i in range(len(table), vocab):
        table[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _model(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _ms_per_item(model, tokenizer, strategy, items: int) -> float:
    prompt = "the capital of France is Paris , the river of Paris is"
    answers = [" the a", " Paris . in", " the river , on", " France"]
    times = []
    for _ in range(items):
        start = time.perf_counter()
        score_continuations(model, tokenizer, prompt, answers, strategy=strategy)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[1024, 262144])
    parser.add_argument("--items", type=int, default=5, help="4-answer items timed per row (median)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| vocabulary | plain ms/item | LayerCake ms/item | LayerCake / plain |")
    print("|---:|---:|---:|---:|")
    for vocab in args.vocabs:
        model, tokenizer = _model(vocab), _tokenizer(vocab)
        _ms_per_item(model, tokenizer, LayerCake(), 1)  # warm-up
        plain = _ms_per_item(model, tokenizer, None, args.items)
        cake = _ms_per_item(model, tokenizer, LayerCake(), args.items)
        print(f"| {vocab} | {plain:.1f} | {cake:.1f} | {cake / plain:.2f} |")


if __name__ == "__main__":
    main()
