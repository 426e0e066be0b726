"""LayerCake in generation and scoring against a plain uncached reference, on every family.

The reference (tests/reference_impl.py) runs each degraded stream alone, uncached, and writes the
contrast ``(1 + beta) * log p_orig - mean_s log p_s`` and the plausibility filter out by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAMILIES, OTHER_FAMILIES, assert_same_state, char_tokenizer, model_state
from reference_impl import layercake_greedy, layercake_log_probs
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor, StoppingCriteria

from contrastive_decoding import (
    LayerCake,
    LayerCakeLogitsProcessor,
    LayerReadout,
    SuppressionRule,
    layercake_generate,
    score_continuations,
)

# Tiny models: one intra-op thread is fastest and immune to CPU contention.
pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "Q: Where is the Eiffel tower? A:"
# The tiny models have 6 layers: the default fractions give punctuation 0-1, concepts 1-4.
PUNCT = [SuppressionRule("punctuation", [0, 1])]
CONCEPT = [SuppressionRule("concept", [1, 2, 3, 4])]
STREAMS = {"combined": [PUNCT + CONCEPT], "average": [PUNCT, CONCEPT], "concept": [CONCEPT]}


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def _ids(tokenizer, text=PROMPT):
    return torch.tensor([tokenizer(text)["input_ids"]])


def test_default_layers_scale_to_depth(tiny_model):
    readout = LayerReadout.from_model(tiny_model)
    streams = LayerCake(amateur="average").degraded_streams(readout)
    assert [r.layers for rules in streams for r in rules] == [(0, 1), (1, 2, 3, 4)]
    assert [[r.classes for r in rules] for rules in LayerCake().degraded_streams(readout)] == [[(0,), (2,)]]


@pytest.mark.parametrize("amateur", ["combined", "average"])
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_matches_uncached_reference(family, tiny_model, tokenizer, amateur):
    ids = _ids(tokenizer)
    steps = 6
    expected = layercake_greedy(tiny_model, tokenizer, ids, STREAMS[amateur], 0.0, 0.1, steps)
    loop = tiny_model.generate(
        ids, custom_generate=layercake_generate, classifier=tokenizer, amateur=amateur,
        max_new_tokens=steps, do_sample=False,
    )  # fmt: skip
    assert torch.equal(loop, expected)
    with LayerCakeLogitsProcessor(tiny_model, tokenizer, amateur=amateur) as cake:
        proc = tiny_model.generate(
            ids, logits_processor=LogitsProcessorList([cake]), max_new_tokens=steps, do_sample=False
        )
    assert torch.equal(proc, expected)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_beta_and_no_filter_match_reference(family, tiny_model, tokenizer):
    ids = _ids(tokenizer)
    expected = layercake_greedy(tiny_model, tokenizer, ids, STREAMS["concept"], 1.0, None, 5)
    got = tiny_model.generate(
        ids, custom_generate=layercake_generate, classifier=tokenizer, amateur="concept", beta=1.0,
        relative_top=None, max_new_tokens=5, do_sample=False,
    )  # fmt: skip
    assert torch.equal(got, expected)


# The shared tester checks this (and the processor against the loop) on CONTRACT_FAMILIES.
@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_padded_rows_equal_rows_alone(family, tiny_model, tokenizer):
    texts = [PROMPT, "Q: Who wrote it? A:"]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, return_token_type_ids=False)
    kwargs = dict(custom_generate=layercake_generate, classifier=tokenizer, max_new_tokens=5, do_sample=False)
    batched = tiny_model.generate(**enc, **kwargs)
    for row, text in enumerate(texts):
        alone = tiny_model.generate(_ids(tokenizer, text), **kwargs)[0]
        assert batched[row, -len(alone) :].tolist() == alone.tolist()
    with LayerCakeLogitsProcessor(tiny_model, tokenizer) as cake:
        proc = tiny_model.generate(**enc, logits_processor=LogitsProcessorList([cake]), max_new_tokens=5)
    assert torch.equal(proc, batched)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox"])
def test_sampling_and_repetition_penalty_order(family, tiny_model, tokenizer):
    ids = _ids(tokenizer)
    torch.manual_seed(7)
    loop = tiny_model.generate(
        ids, custom_generate=layercake_generate, classifier=tokenizer, max_new_tokens=6, do_sample=True,
        top_k=0, repetition_penalty=1.2,
    )  # fmt: skip
    torch.manual_seed(7)
    with LayerCakeLogitsProcessor(tiny_model, tokenizer) as cake:
        processors = LogitsProcessorList([cake, RepetitionPenaltyLogitsProcessor(1.2)])
        proc = tiny_model.generate(
            ids, logits_processor=processors, max_new_tokens=6, do_sample=True, top_k=0
        )
    assert torch.equal(loop, proc)


CONTINUATIONS = [" Paris.", " In Rome, Italy.", " x", " It is in France; the capital."]


@torch.no_grad()
def _reference_scores(model, tokenizer, streams, protocol, beta=0.0, relative_top=0.1, floor=-1000.0):
    """Per continuation: its own uncached full pass, stock and per stream, the formula by hand."""
    prefix = tokenizer(PROMPT)["input_ids"]
    totals = []
    for cont in CONTINUATIONS:
        full = tokenizer(PROMPT + cont)["input_ids"]
        ids = torch.tensor([full])
        targets = torch.tensor(full[len(prefix) :])
        at = torch.arange(len(prefix) - 1, len(full) - 1)
        orig = torch.log_softmax(model(ids).logits[0, at].float(), dim=-1)
        amateur = layercake_log_probs(model, tokenizer, ids, streams, len(prefix))[:, 0, at].mean(0)
        diff = (1.0 + beta) * orig - amateur
        if protocol == "normalized":
            diff = torch.log_softmax(diff, dim=-1)
            keep = orig >= orig.max(-1, keepdim=True).values + math.log(relative_top)
            diff = torch.where(keep, diff, floor)
        totals.append(float(diff.gather(-1, targets[:, None]).sum().detach()))
    return totals


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("protocol", ["paper", "normalized"])
@pytest.mark.parametrize("family", FAMILIES)
def test_scoring_matches_reference(family, tiny_model, tokenizer, protocol, share_prefix):
    expected = _reference_scores(tiny_model, tokenizer, STREAMS["average"], protocol)
    got = score_continuations(
        tiny_model, tokenizer, PROMPT, CONTINUATIONS, strategy=LayerCake(amateur="average"),
        protocol=protocol, share_prefix=share_prefix, batch_size=3,
    )  # fmt: skip
    assert [g.premature_layers for g in got] == [None] * len(CONTINUATIONS)
    for g, e in zip(got, expected, strict=True):
        assert g.total == pytest.approx(e, rel=1e-4, abs=1e-3)


@pytest.mark.parametrize("family", ["gemma2", "opt"])  # llama: the shared tester's
def test_state_restored_after_exceptions(family, tiny_model, tokenizer):
    before = model_state(tiny_model)

    class Boom(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        tiny_model.generate(
            _ids(tokenizer), custom_generate=layercake_generate, classifier=tokenizer,
            stopping_criteria=[Boom()], max_new_tokens=3,
        )  # fmt: skip
    assert_same_state(before, model_state(tiny_model))
    with pytest.raises(RuntimeError, match="boom"):
        with LayerCakeLogitsProcessor(tiny_model, tokenizer) as cake:
            tiny_model.generate(
                _ids(tokenizer), logits_processor=[cake], stopping_criteria=[Boom()], max_new_tokens=3
            )
    assert_same_state(before, model_state(tiny_model))
    with pytest.raises(ValueError, match="must be a non-empty string"):
        score_continuations(tiny_model, tokenizer, PROMPT, [" ok", ""], strategy=LayerCake())
    assert_same_state(before, model_state(tiny_model))


def test_bad_input_fails_before_attaching(tokenizer):
    from conftest import build_model

    model = build_model("llama")
    before = model_state(model)
    with pytest.raises(ValueError, match="`punctuation_layers` has layer 9, outside 0..5"):
        LayerCakeLogitsProcessor(model, tokenizer, punctuation_layers=[9])
    with pytest.raises(ValueError, match="`concept_layers` must be"):
        LayerCake(concept_layers=(0.5, 2.0))
    with pytest.raises(ValueError, match="`amateur` must be one of"):
        LayerCake(amateur="nouns")
    with pytest.raises(ValueError, match="needs the attention weights"):
        LayerCakeLogitsProcessor(model, tokenizer, concept_gate=0.05)
    with pytest.raises(ValueError, match="returned 1 classes"):
        LayerCakeLogitsProcessor(model, lambda ids: ["concept"])
    with pytest.raises(ValueError, match="needs the token classes"):
        model.generate(_ids(tokenizer), custom_generate=layercake_generate, max_new_tokens=2)
    model.config._attn_implementation_internal = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="flash_attention_2"):
            LayerCakeLogitsProcessor(model, tokenizer)
    finally:
        model.config._attn_implementation_internal = before["attn"]
    assert_same_state(before, model_state(model))
    with pytest.raises(RuntimeError, match="no beam search"):
        with LayerCakeLogitsProcessor(model, tokenizer) as cake:
            model.generate(_ids(tokenizer), logits_processor=[cake], num_beams=2, max_new_tokens=3)
    assert_same_state(before, model_state(model))
