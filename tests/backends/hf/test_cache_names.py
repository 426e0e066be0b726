"""The KV cache's name: transformers 5.24 renamed ``past_key_values`` to ``cache``; the library
reads either and passes the one the installed release's ``forward`` declares."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import cached_model
from transformers.generation.utils import GenerateDecoderOnlyOutput

from contrastive_decoding.backends.hf.cache_names import (
    cache_argument,
    cache_field,
    cache_from,
    cache_of_output,
    logits_to_keep,
)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_the_declared_argument_carries_the_cache(family):
    model = cached_model(family)
    name = cache_argument(model)
    assert name in inspect.signature(model.forward).parameters
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        first = model(input_ids=ids[:, :3], use_cache=True)
        cache = cache_of_output(first)
        assert cache is not None and cache.get_seq_length() == 3
        step = model(input_ids=ids[:, 3:], use_cache=True, **{name: cache})
        full = model(input_ids=ids).logits[:, -1]
    # The cache was used: one token on top of three cached equals the four-token pass.
    assert cache_of_output(step).get_seq_length() == 4
    torch.testing.assert_close(step.logits[:, -1], full, rtol=1e-4, atol=1e-5)


def test_either_name_is_read_and_the_new_one_wins():
    old, new = object(), object()
    assert cache_from({"past_key_values": old}) is old
    assert cache_from({"cache": new}) is new
    assert cache_from({"cache": new, "past_key_values": old}) is new
    assert cache_from({"cache": None, "past_key_values": old}) is old
    assert cache_from({"input_ids": 1}) is None


def test_generate_output_field():
    field = cache_field(GenerateDecoderOnlyOutput)
    marker = object()
    out = GenerateDecoderOnlyOutput(sequences=torch.zeros(1, 1), **{field: marker})
    assert cache_of_output(out) is marker


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_logits_to_keep_is_passed_where_forward_declares_it(family):
    model = cached_model(family)
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        full = model(input_ids=ids).logits
        last = model(input_ids=ids, **logits_to_keep(model, 1)).logits
    declared = "logits_to_keep" in inspect.signature(model.forward).parameters
    assert last.shape[1] == (1 if declared else ids.shape[1])
    torch.testing.assert_close(last[:, -1], full[:, -1], rtol=1e-5, atol=1e-6)

    def forward(input_ids, attention_mask=None):  # a forward that does not take it
        return None

    assert logits_to_keep(type("NoKeep", (), {"forward": staticmethod(forward)})(), 1) == {}
