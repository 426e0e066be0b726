"""Activation decoding (Chen et al. 2024) against a hand-written reference, on every tiny family.

The reference recomputes everything from scratch at every step: one uncached forward of the row
with ``output_hidden_states=True``, the logit lens ``A[t] = early_exit(model, hidden_states[j][t])``
at every context position ``t`` (the matrix ``(T, V)`` at once, no running accumulator), and the
per-token entropy over positions ``E(v) = H(softmax_t A[t, v])`` from
``torch.distributions.Categorical`` in float64. The score is ``log q_N(v) - alpha * E(v)`` on the
plausible set of ``q_N``. The context is the prompt's tokens (``context="prompt"``) or every token
up to the current one (``context="all"``); padding is never context.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_state, build_model, char_tokenizer, model_state, prompt_ids
from reference_impl import early_exit
from transformers import LogitsProcessor, StoppingCriteria

from contrastive_decoding import (
    ActivationDecoding,
    ContrastLogitsProcessor,
    DoLa,
    WeightedContrast,
    score_continuations,
    strategy_generate,
)

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 5
PAD, BOS, EOS = 0, 1, 2
DEFAULT_LAYER = 5  # round(6 * 26 / 32) on the six-layer tiny models
PROMPT = "Q: Where is the Eiffel tower? A:"
SHORT = "Who wrote it? A:"
CONTINUATIONS = [" Paris.", " In Rome, Italy.", " x"]
CONTEXTS = ["prompt", "all"]
# On the tiny random models the raw residual stream is small, so without the final norm the lens
# logits barely change across positions and E(v) is close to log T for every token (except in the
# Gemma families, which scale their embeddings). The final norm and a large alpha make the entropy
# decide tokens on every family (checked in the tests against plain greedy search).
STRONG = dict(alpha=20.0, final_norm=True)

_MODELS: dict[tuple, torch.nn.Module] = {}


def _model(family: str, **overrides) -> torch.nn.Module:
    key = (family, tuple(sorted(overrides.items())))
    if key not in _MODELS:
        _MODELS[key] = build_model(family, **overrides)
    return _MODELS[key]


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def _ids(tokenizer, text=PROMPT) -> torch.Tensor:
    return torch.tensor([tokenizer(text)["input_ids"]])


# ---------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------


def _entropy_over_positions(lens_logits: torch.Tensor) -> torch.Tensor:
    """``(T, V)`` early-exit logits -> ``(V,)`` entropy of each token's distribution over the T
    positions (softmax along positions), natural log, float64."""
    return torch.distributions.Categorical(logits=lens_logits.double().T).entropy()


@torch.no_grad()
def _forward(model, row: list[int]):
    return model(torch.tensor([row]), output_hidden_states=True, use_cache=False)


def _raw_scores(out, model, at: int, context_end: int, layer: int, alpha: float, final_norm: bool):
    """(raw s, log q_N) at position ``at`` of a single unpadded row whose context is the positions
    ``0 .. context_end - 1``; float64 ``(V,)`` each."""
    lens = early_exit(model, out.hidden_states[layer][0, :context_end], final_norm)
    entropy = _entropy_over_positions(lens)
    final_lp = F.log_softmax(out.logits[0, at].double(), -1)
    return final_lp - alpha * entropy, final_lp


def _plausible(final_lp: torch.Tensor, relative_top: float | None) -> torch.Tensor:
    if relative_top is None:
        return torch.ones_like(final_lp, dtype=torch.bool)
    return final_lp >= final_lp.max(-1, keepdim=True).values + math.log(relative_top)


@torch.no_grad()
def _reference_step(
    model, row: list[int], prompt_len: int, layer=DEFAULT_LAYER, alpha=0.5, context="prompt",
    relative_top=0.1, final_norm=False,
) -> torch.Tensor:  # fmt: skip
    """Next-token scores of one unpadded row (``-inf`` outside the plausible set), float64."""
    out = _forward(model, row)
    context_end = prompt_len if context == "prompt" else len(row)
    s, final_lp = _raw_scores(out, model, len(row) - 1, context_end, layer, alpha, final_norm)
    return torch.where(_plausible(final_lp, relative_top), s, -torch.inf)


def _reference_greedy(model, row: list[int], steps=STEPS, **kwargs) -> list[int]:
    row = list(row)
    prompt_len = len(row)
    for _ in range(steps):
        row.append(int(_reference_step(model, row, prompt_len, **kwargs).argmax()))
        if row[-1] == EOS:
            break
    return row


@torch.no_grad()
def _reference_dola_static(model, row: list[int], layer: int, relative_top=0.1) -> torch.Tensor:
    out = _forward(model, row)
    final_lp = F.log_softmax(out.logits[0, -1].double(), -1)
    early_lp = F.log_softmax(early_exit(model, out.hidden_states[layer][0, -1]).double(), -1)
    return torch.where(_plausible(final_lp, relative_top), final_lp - early_lp, -torch.inf)


@torch.no_grad()
def _reference_scores(
    model, tokenizer, layer=DEFAULT_LAYER, alpha=0.5, context="prompt", relative_top=0.1,
    final_norm=False, protocol="paper", floor=-1000.0, prompt=PROMPT, continuations=CONTINUATIONS,
) -> list[torch.Tensor]:  # fmt: skip
    """Per-token scores of each continuation, from one uncached forward of the full text."""
    prefix = tokenizer(prompt)["input_ids"]
    n = len(prefix)
    result = []
    for cont in continuations:
        full = tokenizer(prompt + cont)["input_ids"]
        assert full[:n] == prefix
        out = _forward(model, full)
        token_scores = []
        for k, target in enumerate(full[n:]):
            at = n - 1 + k  # the position predicting continuation token k
            context_end = n if context == "prompt" else at + 1
            s, final_lp = _raw_scores(out, model, at, context_end, layer, alpha, final_norm)
            if protocol == "normalized":
                s = torch.where(_plausible(final_lp, relative_top), F.log_softmax(s, -1), floor)
            token_scores.append(s[target])
        result.append(torch.stack(token_scores))
    return result


class _ReferenceProcessor(LogitsProcessor):
    """The reference as a stock LogitsProcessor: recomputes every row (beam) from scratch, without
    its left padding (``width`` is the padded prompt's width)."""

    def __init__(self, model, width: int, **kwargs):
        self.model, self.width, self.kwargs = model, width, kwargs

    def __call__(self, input_ids, scores):
        rows = []
        for row in input_ids.tolist():
            pads = next(i for i, t in enumerate(row) if t != PAD)
            rows.append(_reference_step(self.model, row[pads:], self.width - pads, **self.kwargs))
        return torch.stack(rows).to(scores.dtype)


# ---------------------------------------------------------------------------------------------
# Library calls
# ---------------------------------------------------------------------------------------------


def _processor_generate(model, strategy, steps=STEPS, **inputs):
    with ContrastLogitsProcessor(model, strategy) as proc:
        return model.generate(**inputs, logits_processor=[proc], max_new_tokens=steps, do_sample=False)


def _loop_generate(model, strategy, steps=STEPS, **inputs):
    return model.generate(
        **inputs, custom_generate=strategy_generate, strategy=strategy, max_new_tokens=steps, do_sample=False
    )


def _padded(row: list[int], width: int) -> list[int]:
    return row + [PAD] * (width - len(row))


def _assert_scores_match(got: torch.Tensor, expected: torch.Tensor, atol=1e-4) -> None:
    """Same ``-inf`` pattern, and close on the finite entries."""
    got, expected = got.double(), expected.double()
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-4, atol=atol)


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------


def test_info_layer_resolution_and_repr():
    """The paper's layer 26 of 32; fractions are ``round(fraction * N)``; ints are taken as given."""
    deep, tiny = SimpleNamespace(num_layers=32), SimpleNamespace(num_layers=6)
    assert ActivationDecoding().entropy_source(deep).layer == 26
    assert ActivationDecoding().entropy_source(tiny).layer == DEFAULT_LAYER
    assert ActivationDecoding(info_layer=0.5).entropy_source(tiny).layer == 3
    assert ActivationDecoding(info_layer=0.25).entropy_source(deep).layer == 8
    assert ActivationDecoding(info_layer=2).entropy_source(tiny).layer == 2
    assert ActivationDecoding(info_layer=0).entropy_source(tiny).layer == 0
    source = ActivationDecoding(context="all", final_norm=True).entropy_source(tiny)
    assert source.context == "all" and source.final_norm is True
    strategy = ActivationDecoding()
    assert strategy.alpha == 0.5 and strategy.context == "prompt"
    assert strategy.relative_top == 0.1 and strategy.final_norm is False
    assert "alpha=0.5" in repr(strategy) and "context='prompt'" in repr(strategy)


@pytest.mark.parametrize(
    ("kwargs", "layer"),
    [(dict(), DEFAULT_LAYER), (dict(info_layer=0.5), 3), (dict(info_layer=2), 2), (dict(info_layer=0), 0)],
    ids=["default", "frac0.5", "int2", "embeddings"],
)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_info_layer_resolution_on_six_layers(family, tokenizer, kwargs, layer):
    """The first step's scores equal the reference read at the resolved layer (and not at the
    neighbouring layer: the layer choice is visible)."""
    model = _model(family)
    ids = _ids(tokenizer)
    row = ids[0].tolist()
    strategy = ActivationDecoding(relative_top=None, final_norm=True, alpha=1.0, **kwargs)
    with ContrastLogitsProcessor(model, strategy) as proc:
        got = model.generate(
            ids, logits_processor=[proc], max_new_tokens=1, do_sample=False, output_scores=True,
            return_dict_in_generate=True,
        ).scores[0][0]  # fmt: skip
    ref = dict(relative_top=None, final_norm=True, alpha=1.0)
    _assert_scores_match(got, _reference_step(model, row, len(row), layer=layer, **ref))
    other = _reference_step(model, row, len(row), layer=(layer + 1) % 6, **ref)
    assert not torch.allclose(got.double(), other, atol=1e-3)


def test_default_info_layer_on_a_32_layer_model(tokenizer):
    """The paper's layer 26 of 32 on a 32-layer model, checked through the scores."""
    model = _model("llama", num_hidden_layers=32)
    row = _ids(tokenizer)[0].tolist()
    with ContrastLogitsProcessor(model, ActivationDecoding(relative_top=None, **STRONG)) as proc:
        got = model.generate(
            torch.tensor([row]), logits_processor=[proc], max_new_tokens=1, do_sample=False,
            output_scores=True, return_dict_in_generate=True,
        ).scores[0][0]  # fmt: skip
    kwargs = dict(relative_top=None, **STRONG)
    _assert_scores_match(got, _reference_step(model, row, len(row), layer=26, **kwargs), atol=1e-3)
    for wrong in (25, 27):
        assert not torch.allclose(got.double(), _reference_step(model, row, len(row), layer=wrong, **kwargs))


@pytest.mark.parametrize("context", CONTEXTS)
def test_greedy_processor_and_loop_match_reference(tiny_model, tokenizer, context):
    ids = _ids(tokenizer)
    expected = _reference_greedy(tiny_model, ids[0].tolist(), context=context, **STRONG)
    plain = _reference_greedy(tiny_model, ids[0].tolist(), context=context, alpha=0.0)
    assert expected != plain  # the entropy term decides some token
    strategy = ActivationDecoding(context=context, **STRONG)
    before = model_state(tiny_model)
    assert _processor_generate(tiny_model, strategy, input_ids=ids)[0].tolist() == expected
    assert _loop_generate(tiny_model, strategy, input_ids=ids)[0].tolist() == expected
    assert_same_state(before, model_state(tiny_model))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(info_layer=1, alpha=2.0, relative_top=0.5),
        dict(info_layer=0.7, alpha=10.0, final_norm=True),
        dict(info_layer=3, alpha=0.0),
        dict(info_layer=None, alpha=0.5, relative_top=0.1, final_norm=False),
    ],
    ids=["layer1-a2-top0.5", "frac0.7-a10-final-norm", "alpha0", "explicit-defaults"],
)
@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("family", ["llama", "gemma2", "opt"])
def test_options_match_reference(family, tokenizer, context, kwargs):
    model = _model(family)
    ids = _ids(tokenizer)
    layer = {1: 1, 0.7: 4, 3: 3, None: DEFAULT_LAYER}[kwargs["info_layer"]]  # round(0.7 * 6) = 4
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "info_layer"}
    expected = _reference_greedy(model, ids[0].tolist(), layer=layer, context=context, **ref_kwargs)
    strategy = ActivationDecoding(context=context, **kwargs)
    assert _processor_generate(model, strategy, input_ids=ids)[0].tolist() == expected
    assert _loop_generate(model, strategy, input_ids=ids)[0].tolist() == expected


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neox", "opt"])
def test_left_padded_rows_equal_rows_alone(family, tokenizer, context):
    model = _model(family)
    tokenizer.padding_side = "left"
    texts = [PROMPT, SHORT]
    enc = tokenizer(texts, return_tensors="pt", padding=True, return_token_type_ids=False)
    assert not bool(enc["attention_mask"].all())
    width = enc["input_ids"].shape[1]
    strategy = ActivationDecoding(context=context, **STRONG)
    for out in (
        _processor_generate(model, strategy, **enc),
        _loop_generate(model, strategy, **enc),
    ):
        for i, text in enumerate(texts):
            alone = _ids(tokenizer, text)[0].tolist()
            expected = _reference_greedy(model, alone, context=context, **STRONG)[len(alone) :]
            assert out[i, width:].tolist() == _padded(expected, out.shape[1] - width)


@pytest.mark.parametrize("final_norm", [False, True])
@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "phi", "gpt2"])
def test_step_scores_match_reference(family, tokenizer, context, final_norm):
    """Every step's processed scores (processor and loop): the reference with ``-inf`` outside the
    plausible set, on the sequence generated so far."""
    model = _model(family)
    ids = _ids(tokenizer)
    prompt_len = ids.shape[1]
    options = dict(alpha=5.0 if final_norm else 1.0, relative_top=0.3, final_norm=final_norm)
    strategy = ActivationDecoding(context=context, **options)
    kw = dict(max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with ContrastLogitsProcessor(model, strategy) as proc:
        by_processor = model.generate(ids, logits_processor=[proc], **kw)
    by_loop = model.generate(ids, custom_generate=strategy_generate, strategy=strategy, **kw)
    for out in (by_processor, by_loop):
        seq = out.sequences[0].tolist()
        assert len(out.scores) == len(seq) - prompt_len
        for step, scores in enumerate(out.scores):
            expected = _reference_step(
                model, seq[: prompt_len + step], prompt_len, context=context, **options
            )
            _assert_scores_match(scores[0], expected)
            assert bool(torch.isinf(scores[0]).any())  # the filter removes something


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_zero_alpha_is_the_model_on_the_plausible_set(family, tokenizer):
    model = _model(family)
    ids = _ids(tokenizer)
    with torch.no_grad():
        final_lp = F.log_softmax(model(ids).logits[0, -1].double(), -1)
    for context in CONTEXTS:
        with ContrastLogitsProcessor(model, ActivationDecoding(alpha=0.0, context=context)) as proc:
            got = model.generate(
                ids, logits_processor=[proc], max_new_tokens=1, do_sample=False, output_scores=True,
                return_dict_in_generate=True,
            ).scores[0][0]  # fmt: skip
        expected = torch.where(_plausible(final_lp, 0.1), final_lp, -torch.inf)
        _assert_scores_match(got, expected)


@pytest.mark.parametrize(
    ("family", "final_norm"), [("gemma2", False), ("llama", True), ("gpt2", True), ("gpt_neox", True)]
)
def test_entropy_changes_the_choice(family, final_norm):
    """With a large alpha and no filter the entropy decides: the first token differs from plain
    greedy search on some prompt, and generation follows the reference everywhere."""
    model = _model(family)
    strategy_kwargs = dict(alpha=50.0, relative_top=None, final_norm=final_norm)
    differs = False
    for seed in range(1, 5):
        row = prompt_ids(length=9, seed=seed)[0].tolist()
        with torch.no_grad():
            plain = int(model(torch.tensor([row])).logits[0, -1].argmax())
        for context in CONTEXTS:
            expected = _reference_greedy(model, row, steps=3, context=context, **strategy_kwargs)
            strategy = ActivationDecoding(context=context, **strategy_kwargs)
            got = _processor_generate(model, strategy, steps=3, input_ids=torch.tensor([row]))
            assert got[0].tolist() == expected
            differs |= expected[len(row)] != plain
    assert differs


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("protocol", ["paper", "normalized"])
@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_scoring_matches_reference(family, tokenizer, context, protocol, share_prefix):
    model = _model(family)
    options = dict(alpha=2.0, relative_top=0.5, final_norm=family != "gemma2")
    strategy = ActivationDecoding(context=context, **options)
    before = model_state(model)
    got = score_continuations(
        model, tokenizer, PROMPT, CONTINUATIONS, strategy=strategy, protocol=protocol,
        share_prefix=share_prefix, batch_size=2,
    )  # fmt: skip
    assert_same_state(before, model_state(model))
    expected = _reference_scores(model, tokenizer, context=context, protocol=protocol, **options)
    if protocol == "normalized":
        assert any(bool((e == -1000.0).any()) for e in expected)
    n = len(tokenizer(PROMPT)["input_ids"])
    for cont, g, e in zip(CONTINUATIONS, got, expected, strict=True):
        assert g.token_ids == tokenizer(PROMPT + cont)["input_ids"][n:]
        torch.testing.assert_close(g.token_scores.double(), e, rtol=1e-4, atol=1e-4)
        assert g.total == pytest.approx(float(e.sum()), rel=1e-4, abs=1e-3)


def test_scoring_contexts_differ_and_options_apply(tokenizer):
    """ "all" is not "prompt" in scoring; info layer, final norm and no filter reach scoring."""
    model = _model("llama")
    kwargs = dict(info_layer=2, alpha=2.0, final_norm=True, relative_top=None)
    results = {}
    for context in CONTEXTS:
        strategy = ActivationDecoding(context=context, **kwargs)
        got = score_continuations(
            model, tokenizer, PROMPT, CONTINUATIONS, strategy=strategy, protocol="normalized"
        )
        ref_kwargs = dict(layer=2, alpha=2.0, final_norm=True, relative_top=None)
        expected = _reference_scores(model, tokenizer, context=context, protocol="normalized", **ref_kwargs)
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g.token_scores.double(), e, rtol=1e-4, atol=1e-4)
        results[context] = torch.cat([g.token_scores for g in got])
    # The first continuation token sees the same context in both; later ones do not.
    assert not torch.allclose(results["prompt"], results["all"], atol=1e-3)


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("protocol", ["paper", "normalized"])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_weighted_composition_scores_equal_parts(family, tokenizer, protocol, context):
    model = _model(family)
    activation = ActivationDecoding(context=context, alpha=2.0, final_norm=True)
    dola = DoLa(dola_layers=[2])
    combo = WeightedContrast([(1.0, activation), (0.5, dola)])
    kw = dict(protocol=protocol, batch_size=2)
    combined = score_continuations(model, tokenizer, PROMPT, CONTINUATIONS, strategy=combo, **kw)
    alone_a = score_continuations(model, tokenizer, PROMPT, CONTINUATIONS, strategy=activation, **kw)
    alone_d = score_continuations(model, tokenizer, PROMPT, CONTINUATIONS, strategy=dola, **kw)
    reference = _reference_scores(
        model, tokenizer, alpha=2.0, final_norm=True, context=context, protocol=protocol
    )
    for c, a, d, r in zip(combined, alone_a, alone_d, reference, strict=True):
        torch.testing.assert_close(a.token_scores.double(), r, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            c.token_scores, a.token_scores + 0.5 * d.token_scores, rtol=1e-4, atol=1e-3
        )


@pytest.mark.parametrize("context", CONTEXTS)
def test_weighted_composition_generation_matches_reference(tokenizer, context):
    model = _model("llama")
    activation = ActivationDecoding(context=context, **STRONG)
    combo = WeightedContrast([(1.0, activation), (0.5, DoLa(dola_layers=[2]))])
    ids = _ids(tokenizer)
    prompt_len = ids.shape[1]
    row = ids[0].tolist()
    for _ in range(4):
        step = _reference_step(
            model, row, prompt_len, context=context, **STRONG
        ) + 0.5 * _reference_dola_static(model, row, 2)
        row.append(int(step.argmax()))
        if row[-1] == EOS:
            break
    kw = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with ContrastLogitsProcessor(model, combo) as proc:
        out = model.generate(ids, logits_processor=[proc], **kw)
    assert out.sequences[0].tolist() == row
    for step, scores in enumerate(out.scores):
        prefix = row[: prompt_len + step]
        expected = _reference_step(model, prefix, prompt_len, context=context, **STRONG)
        expected = expected + 0.5 * _reference_dola_static(model, prefix, 2)
        _assert_scores_match(scores[0], expected)
    loop = model.generate(ids, custom_generate=strategy_generate, strategy=combo, max_new_tokens=4)
    assert loop[0].tolist() == row


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(info_layer=6), "info_layer"),
        (dict(info_layer=-1), "info_layer"),
        (dict(info_layer=40), "info_layer"),
        (dict(info_layer=1.5), "info_layer"),
        (dict(info_layer=-0.2), "info_layer"),
        (dict(info_layer=1.0), "info_layer"),
        (dict(info_layer=0.0), "info_layer"),
        (dict(info_layer=True), "info_layer"),
        (dict(info_layer="26"), "info_layer"),
        (dict(info_layer=[3]), "info_layer"),
        (dict(alpha=-0.5), "alpha"),
        (dict(alpha="0.5"), "alpha"),
        (dict(alpha=None), "alpha"),
        (dict(context="generated"), "context"),
        (dict(context=None), "context"),
    ],
)
def test_bad_arguments_refused_before_attaching(tokenizer, kwargs, fragment):
    model = _model("llama")
    before = model_state(model)
    with pytest.raises(ValueError, match=fragment):
        ContrastLogitsProcessor(model, ActivationDecoding(**kwargs))
    assert_same_state(before, model_state(model))
    with pytest.raises(ValueError, match=fragment):
        score_continuations(model, tokenizer, PROMPT, [" x"], strategy=ActivationDecoding(**kwargs))
    assert_same_state(before, model_state(model))
    with pytest.raises(ValueError, match=fragment):
        _loop_generate(model, ActivationDecoding(**kwargs), steps=2, input_ids=_ids(tokenizer))
    assert_same_state(before, model_state(model))


def test_composition_of_two_different_entropy_sources_is_refused(tokenizer):
    model = _model("llama")
    before = model_state(model)
    combo = WeightedContrast([ActivationDecoding(context="prompt"), ActivationDecoding(context="all")])
    with pytest.raises(ValueError, match="different sources"):
        ContrastLogitsProcessor(model, combo)
    with pytest.raises(ValueError, match="different sources"):
        score_continuations(model, tokenizer, PROMPT, [" x"], strategy=combo)
    assert_same_state(before, model_state(model))
    # The same source twice is one entropy, shared.
    same = WeightedContrast([(1.0, ActivationDecoding(alpha=1.0)), (2.0, ActivationDecoding(alpha=3.0))])
    single = ActivationDecoding(alpha=7.0 / 3.0)  # 1*(lq - E) + 2*(lq - 3E) = 3*(lq - 7/3 E)
    both = score_continuations(model, tokenizer, PROMPT, [" x", " Paris."], strategy=same)
    alone = score_continuations(model, tokenizer, PROMPT, [" x", " Paris."], strategy=single)
    for a, b in zip(both, alone, strict=True):
        torch.testing.assert_close(a.token_scores, 3.0 * b.token_scores, rtol=1e-5, atol=1e-4)


def test_layer_valid_on_a_deep_model_refused_on_a_shallow_one(tokenizer):
    """A layer index is checked against the model the strategy meets: 20 fits 32 layers, not 6."""
    strategy = ActivationDecoding(info_layer=20)
    deep = _model("llama", num_hidden_layers=32)
    with ContrastLogitsProcessor(deep, strategy):
        pass
    model = _model("llama")
    before = model_state(model)
    with pytest.raises(ValueError, match="info_layer"):
        ContrastLogitsProcessor(model, strategy)
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_beam_search_with_context_all_is_refused_and_state_restored(family, tokenizer):
    model = _model(family)
    before = model_state(model)
    with pytest.raises(RuntimeError):
        _processor_generate(model, ActivationDecoding(context="all"), input_ids=_ids(tokenizer), num_beams=2)
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize(
    ("family", "padded"), [("llama", False), ("gpt2", False), ("gemma2", False), ("llama", True)]
)
def test_beam_search_with_prompt_context_matches_reference_processor(family, tokenizer, padded):
    """Beam search runs with ``context="prompt"`` (one prompt, or a left-padded batch of two) and
    picks the beams that stock beam search picks with the reference as its logits processor."""
    model = _model(family)
    if padded:
        tokenizer.padding_side = "left"
        enc = tokenizer([PROMPT, SHORT], return_tensors="pt", padding=True, return_token_type_ids=False)
    else:
        enc = dict(input_ids=_ids(tokenizer))
    kw = dict(num_beams=3, early_stopping=True, **enc)
    before = model_state(model)
    strategy = ActivationDecoding(context="prompt", **STRONG)
    got = _processor_generate(model, strategy, steps=4, **kw)
    assert_same_state(before, model_state(model))
    reference = _ReferenceProcessor(model, enc["input_ids"].shape[1], **STRONG)
    expected = model.generate(logits_processor=[reference], max_new_tokens=4, do_sample=False, **kw)
    assert got.tolist() == expected.tolist()


def test_bound_loop_matches_reference(tokenizer):
    """``strategy_generate`` with the strategy bound by functools.partial gives the reference too."""
    model = _model("llama")
    ids = _ids(tokenizer)
    strategy = ActivationDecoding(context="all", **STRONG)
    expected = _reference_greedy(model, ids[0].tolist(), context="all", **STRONG)
    loop = functools.partial(strategy_generate, strategy=strategy)
    out = model.generate(ids, custom_generate=loop, max_new_tokens=STEPS, do_sample=False)
    assert out[0].tolist() == expected


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("context", CONTEXTS)
def test_one_processor_over_several_generate_calls(tokenizer, context, use_cache):
    """Each generate call starts a new context: its own prompt (here the previous call's output,
    then an unrelated prompt), cached or not."""
    model = _model("llama")
    strategy = ActivationDecoding(context=context, **STRONG)
    kw = dict(max_new_tokens=3, do_sample=False, use_cache=use_cache)
    with ContrastLogitsProcessor(model, strategy) as proc:
        first = model.generate(_ids(tokenizer), logits_processor=[proc], **kw)
        again = model.generate(first, logits_processor=[proc], **kw)
        other = model.generate(_ids(tokenizer, SHORT), logits_processor=[proc], **kw)
    prompts = (_ids(tokenizer)[0].tolist(), first[0].tolist(), _ids(tokenizer, SHORT)[0].tolist())
    for got, prompt in zip((first, again, other), prompts, strict=True):
        assert got[0].tolist() == _reference_greedy(model, prompt, steps=3, context=context, **STRONG)


class Boom(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        raise RuntimeError("boom")


# context="prompt" (the default) is checked by the shared tester, tests/backends/hf/test_strategy_contract.py.
@pytest.mark.parametrize("context", ["all"])
def test_state_restored_after_exceptions(tokenizer, context):
    model = _model("gpt2")
    strategy = ActivationDecoding(context=context)
    before = model_state(model)
    with pytest.raises(RuntimeError, match="boom"):
        _loop_generate(model, strategy, steps=3, input_ids=_ids(tokenizer), stopping_criteria=[Boom()])
    assert_same_state(before, model_state(model))
    with pytest.raises(RuntimeError, match="boom"):
        _processor_generate(model, strategy, steps=3, input_ids=_ids(tokenizer), stopping_criteria=[Boom()])
    assert_same_state(before, model_state(model))
