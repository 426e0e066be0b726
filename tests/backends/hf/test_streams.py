"""Streams as row groups of one batch: each stream's rows equal running that stream alone."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, assert_same_state, char_tokenizer, model_state

from contrastive_decoding import AttentionSuppression, StreamBatch, StreamRunner, SuppressionRule
from contrastive_decoding.backends.hf.cache_names import cache_of_output

# Tiny models: one intra-op thread is fastest and immune to CPU contention.
pytestmark = pytest.mark.usefixtures("one_thread")

RULES = [
    [SuppressionRule("punctuation", [0, 1])],
    [SuppressionRule("concept", [1, 2, 3, 4])],
]
TEXTS = ["Q: Where is the Eiffel tower? A: In Paris, France.", "The cat sat."]


def _batch(tokenizer):
    tokenizer.padding_side = "left"
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True, return_token_type_ids=False)
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("query_rows", ["generated", "all"])
@pytest.mark.parametrize("family", FAMILIES)
def test_each_stream_equals_running_it_alone(family, tiny_model, query_rows):
    tokenizer = char_tokenizer()
    ids, mask = _batch(tokenizer)
    stock = tiny_model(ids, attention_mask=mask).logits
    with StreamRunner(tiny_model, tokenizer, RULES, query_rows=query_rows) as runner:
        intact = tiny_model(ids, attention_mask=mask).logits
        degraded = runner.stacked()
    alone = []
    for rules in RULES:
        with AttentionSuppression(tiny_model, tokenizer, rules, query_rows=query_rows):
            alone.append(tiny_model(ids, attention_mask=mask).logits)
    real = mask.bool()
    assert intact.shape == stock.shape and degraded.shape == (2, *stock.shape)
    torch.testing.assert_close(intact[real], stock[real], rtol=1e-4, atol=1e-5)
    for s in range(2):
        torch.testing.assert_close(degraded[s][real], alone[s][real], rtol=1e-4, atol=1e-5)
        assert not torch.allclose(degraded[s][real], stock[real], atol=1e-3), "stream was not degraded"


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_stream_batch_cuts_outputs_back_and_restores(family, tiny_model):
    ids = torch.tensor([[1, 40, 50, 60]])
    tiny_model(ids, output_hidden_states=True)  # transformers installs its capture hooks once
    before = model_state(tiny_model)
    with StreamBatch(tiny_model, 3) as batch:
        out = tiny_model(ids, output_hidden_states=True, use_cache=True)
    assert out.logits.shape[0] == 1 and batch.logits is None
    assert all(h.shape[0] == 1 for h in out.hidden_states)
    assert cache_of_output(out).get_seq_length() == 4
    assert_same_state(before, model_state(tiny_model))
    with pytest.raises(ValueError, match="`num_streams`"):
        StreamBatch(tiny_model, 0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])  # (input_ids, attention_mask, ...)
def test_positional_arguments_are_expanded_too(family, tiny_model):
    ids = torch.tensor([[1, 40, 50, 60], [1, 41, 51, 61]])
    mask = torch.ones_like(ids)
    with StreamBatch(tiny_model, 2) as batch:
        out = tiny_model(ids, mask, return_dict=True)
        assert batch.logits.shape[:2] == (2, 2)
    torch.testing.assert_close(out.logits, tiny_model(input_ids=ids, attention_mask=mask).logits)
