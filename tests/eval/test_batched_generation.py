"""Batched generation in the harness: decoding a batch from a cached few-shot primer gives each
row's tokens from generating that prompt alone, in full; strategies that read the whole prompt,
and batches a cache cannot serve, run in full."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model
from contrastive_decoding.eval.generation import generate_batch
from contrastive_decoding.eval.strategies import build_strategy
from evalkit import (
    VOCAB,
    char_tokenizer,
    one_thread,  # noqa: F401 - autouse fixture
)

from contrastive_decoding import PromptCache

TOKENIZER = char_tokenizer()
PRIMER = "Q: one?\nA: 1.\n\nQ: two?\nA: 2.\n\n"
# Questions of different lengths, so the primed rows need padding between primer and question.
PROMPTS = [PRIMER + q for q in ("Q: three?\nA:", "Q: a much longer fourth question?\nA:", "Q: 5?\nA:")]


def _model(family: str):
    return build_model(family, vocab_size=len(VOCAB), max_position_embeddings=512)


class ForwardLengths:
    """Records the input length of every forward of ``model`` (which tokens actually ran)."""

    def __init__(self, model):
        self.lengths: list[int] = []
        self._handle = model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.lengths.append(ids.shape[1])

    def remove(self):
        self._handle.remove()


def _generate(model, prompts, strategy, cache=None):
    lengths = ForwardLengths(model)
    try:
        out = generate_batch(
            model, TOKENIZER, prompts, strategy, max_new_tokens=10, stop=("Q:",), prompt_cache=cache
        )
    finally:
        lengths.remove()
    return out, lengths.lengths


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2", "gpt_neox", "opt", "phi"])
@pytest.mark.parametrize("strategy", [("baseline", {}), ("dola", {"dola_layers": "high"})])
def test_primed_batch_equals_each_prompt_alone(family, strategy):
    model = _model(family)
    run = build_strategy(model, *strategy)
    alone = [_generate(model, [p], run)[0][0] for p in PROMPTS]
    primed, lengths = _generate(model, PROMPTS, run, PromptCache(PRIMER))
    assert [(g.text, g.n_tokens, g.layer_counts) for g in primed] == [
        (g.text, g.n_tokens, g.layer_counts) for g in alone
    ]
    assert any(g.n_tokens > 1 for g in alone), "nothing was generated: the comparison is empty"
    # The primer ran once, alone; the batch's prefill ran only the tokens after it.
    primer_len = len(TOKENIZER(PRIMER)["input_ids"])
    longest = max(len(TOKENIZER(p)["input_ids"]) for p in PROMPTS)
    assert lengths[0] == primer_len
    assert lengths[1] == longest - primer_len
    assert all(n == 1 for n in lengths[2:])


@pytest.mark.parametrize(
    "strategy", [("layercake", {}), ("activation", {}), ("icd", {})], ids=["streams", "entropy", "amateur"]
)
def test_strategies_reading_the_whole_prompt_run_in_full(strategy):
    model = _model("llama")
    run = build_strategy(model, *strategy, tokenizer=TOKENIZER)
    full, _ = _generate(model, PROMPTS, run)
    cached, lengths = _generate(model, PROMPTS, run, PromptCache(PRIMER))
    assert [g.text for g in cached] == [g.text for g in full]
    longest = max(len(TOKENIZER(p)["input_ids"]) for p in PROMPTS)
    assert lengths[0] >= longest  # the prompt ran whole (streams/amateurs may add rows or a prefix)


def test_prompt_without_the_primer_runs_the_batch_in_full():
    model = _model("llama")
    run = build_strategy(model, "baseline")
    prompts = [*PROMPTS[:2], "Q: no primer here?\nA:"]
    full, _ = _generate(model, prompts, run)
    cached, lengths = _generate(model, prompts, run, PromptCache(PRIMER))
    assert [g.text for g in cached] == [g.text for g in full]
    # The primer's cache was computed for the first rows, then the batch ran whole.
    primer_len = len(TOKENIZER(PRIMER)["input_ids"])
    assert lengths[:2] == [primer_len, max(len(TOKENIZER(p)["input_ids"]) for p in prompts)]


def test_sliding_window_model_with_padding_runs_in_full():
    """Padding after the primer would count against a sliding window: such batches run in full;
    rows of one length (no padding needed) still start from the primer."""
    model = build_model("mistral", vocab_size=len(VOCAB), max_position_embeddings=512, sliding_window=16)
    run = build_strategy(model, "baseline")
    alone = [_generate(model, [p], run)[0][0].text for p in PROMPTS]
    cached, lengths = _generate(model, PROMPTS, run, PromptCache(PRIMER))
    assert [g.text for g in cached] == alone
    # Refused before the primer runs: the batch's first forward is the whole prompts.
    assert lengths[0] == max(len(TOKENIZER(p)["input_ids"]) for p in PROMPTS)
    primer_len = len(TOKENIZER(PRIMER)["input_ids"])
    same_length = [PRIMER + "Q: six?\nA:", PRIMER + "Q: ten?\nA:"]
    alone = [_generate(model, [p], run)[0][0].text for p in same_length]
    cached, lengths = _generate(model, same_length, run, PromptCache(PRIMER))
    assert [g.text for g in cached] == alone
    assert lengths[:2] == [primer_len, len(TOKENIZER(same_length[0])["input_ids"]) - primer_len]


def test_prompt_cache_start_batch_rows_and_refusals():
    model = _model("llama")
    cache = PromptCache(PRIMER)
    ids = [TOKENIZER(p)["input_ids"] for p in PROMPTS]
    n, kv = cache.start_batch(model, TOKENIZER, PROMPTS, ids)
    assert n == len(TOKENIZER(PRIMER)["input_ids"]) and kv.get_seq_length() == n
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids[0][:n]]), use_cache=True)
    ref_cache = ref["cache"] if "cache" in ref else ref["past_key_values"]
    keys = kv.layers[0].keys if hasattr(kv, "layers") else kv.key_cache[0]
    ref_keys = ref_cache.layers[0].keys if hasattr(ref_cache, "layers") else ref_cache.key_cache[0]
    assert keys.shape[0] == len(PROMPTS)
    for row in range(len(PROMPTS)):
        torch.testing.assert_close(keys[row : row + 1], ref_keys)
    assert cache.start_batch(model, TOKENIZER, [], []) is None
    assert cache.start_batch(model, TOKENIZER, ["other text"], [TOKENIZER("other text")["input_ids"]]) is None
    with pytest.raises(ValueError, match="one\\s+PromptCache per model"):
        cache.start_batch(_model("gpt2"), TOKENIZER, PROMPTS, ids)
