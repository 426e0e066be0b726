"""AttentionSuppression on every family: what it removes, what it leaves alone, and cleanup.

References are stock forward passes of the same model: eager attention weights with the expected
columns zeroed and rows renormalised by hand, and stock ``generate`` where nothing is suppressed.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAMILIES, assert_same_state, build_model, model_state, prompt_ids

from contrastive_decoding import AttentionSuppression, SuppressionRule
from contrastive_decoding.backends.hf.suppression import _ACTIVE
from contrastive_decoding.core.specs import resolve_layers

# Tiny models: one intra-op thread is fastest and immune to CPU contention.
pytestmark = pytest.mark.usefixtures("one_thread")

N_LAYERS = 6
CLASS_OF = ("punctuation", "function", "concept")


def id_classes(ids: list[int]) -> list[str]:
    """A fixed, context-free classifier, so the expected key sets are easy to write down."""
    return [CLASS_OF[i % 3] for i in ids]


_EAGER: dict[str, torch.nn.Module] = {}


def eager_model(family: str):
    if family not in _EAGER:
        model = build_model(family)
        model.set_attn_implementation("eager")
        _EAGER[family] = model
    return _EAGER[family]


def _suppressed_keys(ids: torch.Tensor, classes: set[str]) -> torch.Tensor:
    """(B, Q, K) bool: key k is of a suppressed class and visible from query q (k <= q)."""
    flags = torch.tensor([[c in classes for c in id_classes(row)] for row in ids.tolist()])
    causal = torch.tril(torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool))
    return flags[:, None, :] & causal[None]


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_weights_zero_on_suppressed_keys_and_untouched_before(family):
    model = eager_model(family)
    ids = prompt_ids(batch=2, length=9)
    rules = [SuppressionRule("concept", layers=[2, 3])]
    stock = model(ids, output_attentions=True).attentions
    with AttentionSuppression(model, id_classes, rules, query_rows="all"):
        got = model(ids, output_attentions=True).attentions
    for layer in (0, 1):  # before the first suppressed layer: the same inputs, the same weights
        torch.testing.assert_close(got[layer], stock[layer], rtol=0, atol=0)
    sup = _suppressed_keys(ids, {"concept"})[:, None]  # (B, 1, Q, K)
    # Rows whose every visible key is a concept are left intact by design.
    emptied = ~((~sup) & torch.tril(torch.ones(9, 9, dtype=torch.bool))).any(-1, keepdim=True)
    sup = sup & ~emptied
    expected = stock[2].masked_fill(sup, 0.0)
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(got[2], expected, rtol=1e-5, atol=1e-6)
    assert bool((got[3].masked_select(sup.expand_as(got[3])) == 0).all())
    # After the suppressed layers, attention to concepts is back.
    assert bool((got[5].masked_select(sup.expand_as(got[5])) > 0).all())


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_bias_mode_adds_the_bias_before_softmax(family):
    model = eager_model(family)
    ids = prompt_ids(batch=1, length=8)
    stock = model(ids, output_attentions=True).attentions
    with AttentionSuppression(model, id_classes, [SuppressionRule("function", [1])], mode="bias", bias=-2.0,
                              query_rows="all"):  # fmt: skip
        got = model(ids, output_attentions=True).attentions
    sup = _suppressed_keys(ids, {"function"})[:, None]
    expected = stock[1] * torch.where(sup, math.exp(-2.0), 1.0)
    expected = expected / expected.sum(-1, keepdim=True)
    torch.testing.assert_close(got[1], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_gate_suppresses_only_rows_with_enough_mass(family):
    model = eager_model(family)
    ids = prompt_ids(batch=2, length=10)
    stock = model(ids, output_attentions=True).attentions
    threshold = 0.3
    rule = SuppressionRule("concept", layers=[2], gate=threshold)
    with AttentionSuppression(model, id_classes, [rule], query_rows="all"):
        got = model(ids, output_attentions=True).attentions
    keys = _suppressed_keys(ids, {"concept"})  # (B, Q, K)
    mass = (stock[2].mean(1) * keys).sum(-1)  # head-averaged mass on concept keys, (B, Q)
    gated = (mass > threshold)[..., None] & keys
    assert gated.any() and (~gated.any(-1) & keys.any(-1)).any(), "the test needs both kinds of rows"
    emptied = ~((~gated) & torch.tril(torch.ones(10, 10, dtype=torch.bool))).any(-1, keepdim=True)
    gated = (gated & ~emptied)[:, None]
    expected = stock[2].masked_fill(gated, 0.0)
    torch.testing.assert_close(got[2], expected / expected.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_no_matching_tokens_equals_stock_generate(family, tiny_model):
    """Rules on every layer, but no token of the suppressed class: stock greedy, token for token."""
    ids = prompt_ids(batch=2, length=6)
    kwargs = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True)
    stock = tiny_model.generate(ids, **kwargs)
    rules = [SuppressionRule("punctuation", layers=range(N_LAYERS))]
    with AttentionSuppression(tiny_model, lambda ids: ["concept"] * len(ids), rules, query_rows="all"):
        got = tiny_model.generate(ids, **kwargs)
    assert torch.equal(got.sequences, stock.sequences)
    for a, b in zip(got.scores, stock.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_rules_on_no_layer_are_exactly_stock(family, tiny_model):
    ids = prompt_ids(batch=1, length=6)
    stock = tiny_model(ids).logits
    with AttentionSuppression(tiny_model, id_classes, [SuppressionRule("concept", layers=[])]):
        got = tiny_model(ids).logits
    assert torch.equal(got, stock)


def _greedy(model, ids, mask=None, use_cache=True, steps=8):
    return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=steps,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=0,
        output_scores=True,
        return_dict_in_generate=True,
    )


def _until_eos(tokens: torch.Tensor) -> list[int]:
    out = []
    for t in tokens.tolist():
        out.append(t)
        if t == 2:
            break
    return out


@pytest.mark.parametrize("query_rows", ["generated", "all"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_equals_uncached(family, tiny_model, query_rows):
    # Prompt + new tokens pass Gemma-2/3's sliding window of 8.
    ids = prompt_ids(batch=1, length=7)
    rules = [SuppressionRule(["punctuation", "concept"], layers=[1, 2, 4])]
    with AttentionSuppression(tiny_model, id_classes, rules, query_rows=query_rows):
        cached = _greedy(tiny_model, ids, steps=10)
        uncached = _greedy(tiny_model, ids, use_cache=False, steps=10)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    stock = _greedy(tiny_model, ids, steps=10)
    assert not torch.allclose(cached.scores[-1], stock.scores[-1], atol=1e-3), "suppression had no effect"


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_rows_equal_rows_alone(family, tiny_model):
    short, long = prompt_ids(1, 4, seed=3)[0], prompt_ids(1, 7, seed=4)[0]
    ids = torch.full((2, 7), 0)
    mask = torch.zeros(2, 7, dtype=torch.long)
    ids[0, 3:], mask[0, 3:] = short, 1
    ids[1], mask[1] = long, 1
    rules = [SuppressionRule("concept", layers=[1, 2, 3])]
    with AttentionSuppression(tiny_model, id_classes, rules):
        batched = _greedy(tiny_model, ids, mask).sequences
        alone = [_greedy(tiny_model, row[None]).sequences[0] for row in (short, long)]
    assert _until_eos(batched[0, 3:]) == _until_eos(alone[0])
    assert _until_eos(batched[1]) == _until_eos(alone[1])


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "opt"])
def test_state_restored_after_exception(family, tiny_model):
    before = model_state(tiny_model)
    calls = []

    def failing(ids):
        calls.append(1)
        if len(calls) > 3:
            raise KeyError("classifier failed")
        return id_classes(ids)

    with pytest.raises(KeyError, match="classifier failed"):
        with AttentionSuppression(tiny_model, failing, [SuppressionRule("concept", [1])]):
            _greedy(tiny_model, prompt_ids(1, 5))
    assert_same_state(before, model_state(tiny_model))
    assert not any(v[0] for v in _ACTIVE.values())
    with pytest.raises(RuntimeError, match="boom"):
        with AttentionSuppression(tiny_model, id_classes, [SuppressionRule("concept", [1])]):
            raise RuntimeError("boom")
    assert_same_state(before, model_state(tiny_model))


def test_bad_input_fails_before_attaching(tiny_model_llama=None):
    model = build_model("llama")
    before = model_state(model)
    rule = SuppressionRule("concept", [1])
    with pytest.raises(ValueError, match="outside 0..5"):
        AttentionSuppression(model, id_classes, [SuppressionRule("concept", [6])])
    with pytest.raises(ValueError, match="unknown token class 'nouns'"):
        SuppressionRule("nouns", [1])
    with pytest.raises(ValueError, match="returned 1 classes for 3 tokens"):
        AttentionSuppression(model, lambda ids: ["concept"], [rule])
    with pytest.raises(ValueError, match="needs the attention weights"):
        AttentionSuppression(model, id_classes, [SuppressionRule("concept", [1], gate=0.05)])
    with pytest.raises(ValueError, match="`mode`"):
        AttentionSuppression(model, id_classes, [rule], mode="soft")
    model.config._attn_implementation_internal = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="cannot take a per-key bias.*'sdpa'"):
            AttentionSuppression(model, id_classes, [rule])
    finally:
        model.config._attn_implementation_internal = before["attn"]
    assert_same_state(before, model_state(model))


def test_resolve_layers_scales_fractions_to_depth():
    assert resolve_layers((4 / 32, 20 / 32), 32, "x") == list(range(4, 21))
    assert resolve_layers((1 / 32, 5 / 32), 30, "x") == [1, 2, 3, 4, 5]
    assert resolve_layers([0, 3], 6, "x") == [0, 3]
    with pytest.raises(ValueError, match="`x`"):
        resolve_layers((0.5, 0.2), 6, "x")
    with pytest.raises(ValueError, match="outside 0..5"):
        resolve_layers([7], 6, "x")



def test_scoring_rows_share_the_classifier(monkeypatch):
    """Scoring copies each row's token history once per continuation; the classifier (and with it
    the tokenizer: 87 of 101 s of one item with a 262k-vocabulary tokenizer) is shared, not
    deep-copied, and the scores are those of each answer scored alone."""
    from conftest import char_tokenizer

    from contrastive_decoding import LayerCake, score_continuations
    from contrastive_decoding.core.token_classes import TokenClassifier

    def refuse(self, memo):
        raise AssertionError("the token classifier was deep-copied")

    monkeypatch.setattr(TokenClassifier, "__deepcopy__", refuse, raising=False)
    model = build_model("llama")
    tokenizer = char_tokenizer()
    answers = [" Paris.", " In Rome, Italy.", " x"]
    together = score_continuations(model, tokenizer, "Q: Where? A:", answers, strategy=LayerCake())
    for answer, score in zip(answers, together, strict=True):
        alone = score_continuations(model, tokenizer, "Q: Where? A:", [answer], strategy=LayerCake())[0]
        assert torch.allclose(score.token_scores, alone.token_scores, atol=1e-5)
