"""LOL (lower-layer fusion) against a hand-written reference.

The reference runs the original stream and the amateur uncached with ``output_hidden_states`` at
every step, reads the lower layer with the logit lens (``early_exit``) and writes
``[log p_o^N - log p_a^N] + weight * [log p_o^L - log p_a^L]`` on the plausible set of ``p_o^N``
by hand. The amateur's row is built by hand: BOS, the amateur's instruction, then the row without
the refocus instruction. The suppressed-copy amateur is checked where the answer is known without
LayerCake's machinery: suppressing a class no token has leaves the copy equal to the original.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_state, cached_model, char_tokenizer, model_state
from reference_impl import early_exit
from transformers import StoppingCriteria

from contrastive_decoding import (
    ContrastLogitsProcessor,
    LayerReadout,
    LowerLayerFusion,
    score_continuations,
    strategy_generate,
)
from contrastive_decoding.strategies.lol import TRUTHFUL_INSTRUCTION

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 5
BOS, EOS = 1, 2
MIDDLE = 3  # round(0.5 * 6)
PROMPT = "Q: Where is the Eiffel tower? A:"
SHORT = "Who wrote it? A:"
INSTRUCTION = "Lie! Say false things. "
REFOCUS = "Be true: "
CONTINUATIONS = [" Paris.", " In Rome, Italy.", " x"]

_model = cached_model


def _small(family: str) -> torch.nn.Module:
    """A four-layer amateur of the family, same vocabulary."""
    return _model(family, seed=2, num_hidden_layers=4)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def _ids(tokenizer, text=PROMPT) -> torch.Tensor:
    return torch.tensor([tokenizer(text)["input_ids"]])


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _amateur_row(row: list[int], instruction: list[int], refocus: list[int]) -> list[int]:
    """BOS, the amateur's instruction, then the row without the original stream's refocus."""
    assert row[0] == BOS and row[1 : 1 + len(refocus)] == refocus
    return row[:1] + instruction + row[1 + len(refocus) :]


def _lsm(x: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(x.double(), -1)


@torch.no_grad()
def _fusion(model, amateur, main_rows, amateur_rows, at, lower, amateur_lower, weight, final_norm):
    """Raw F at positions ``at`` of one main row and the matching amateur positions, ``(P, V)``,
    and the original stream's final log-probs there."""
    main_at, amateur_at = at
    o = model(torch.tensor([main_rows]), output_hidden_states=True, use_cache=False)
    a = amateur(torch.tensor([amateur_rows]), output_hidden_states=True, use_cache=False)
    final_o, final_a = o.logits[0, main_at], a.logits[0, amateur_at]
    low_o = early_exit(model, o.hidden_states[lower][0, main_at], final_norm)
    low_a = early_exit(amateur, a.hidden_states[amateur_lower][0, amateur_at], final_norm)
    fused = _lsm(final_o) - _lsm(final_a) + weight * (_lsm(low_o) - _lsm(low_a))
    return fused, _lsm(final_o)


def _reference_greedy(
    model, ids, amateur=None, instruction=(), refocus=(), steps=STEPS, lower=MIDDLE, amateur_lower=None,
    weight=0.5, relative_top=0.1, final_norm=False,
) -> torch.Tensor:  # fmt: skip
    amateur = model if amateur is None else amateur
    amateur_lower = lower if amateur_lower is None else amateur_lower
    row = ids[0].tolist()
    for _ in range(steps):
        fused, final_lp = _fusion(
            model, amateur, row, _amateur_row(row, list(instruction), list(refocus)), (-1, -1),
            lower, amateur_lower, weight, final_norm,
        )  # fmt: skip
        keep = final_lp >= final_lp.max() + math.log(relative_top)
        row.append(int(torch.where(keep, fused, -torch.inf).argmax()))
        if row[-1] == EOS:
            break
    return torch.tensor([row])


def _processor_generate(model, strategy, tokenizer, steps=STEPS, classifier=None, **inputs):
    with ContrastLogitsProcessor(model, strategy, tokenizer=tokenizer, classifier=classifier) as proc:
        return model.generate(**inputs, logits_processor=[proc], max_new_tokens=steps, do_sample=False)


def _loop_generate(model, strategy, tokenizer, steps=STEPS, classifier=None, **inputs):
    # transformers 5 keeps `tokenizer=` (and refuses `classifier=`) given to generate with a
    # custom_generate callable, so both are bound to the loop (see test_icd.py's xfail test).
    loop = functools.partial(strategy_generate, tokenizer=tokenizer, classifier=classifier)
    return model.generate(
        **inputs, custom_generate=loop, strategy=strategy, max_new_tokens=steps, do_sample=False
    )


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neox"])
def test_prompt_amateur_matches_reference(family, tokenizer):
    model = _model(family)
    ids = _ids(tokenizer)
    expected = _reference_greedy(model, ids, instruction=_tokens(tokenizer, INSTRUCTION))
    strategy = LowerLayerFusion(amateur="prompt", amateur_instruction=INSTRUCTION)
    assert strategy.premature_layers(LayerReadout.from_model(model)) == [MIDDLE]
    assert torch.equal(_processor_generate(model, strategy, tokenizer, input_ids=ids), expected)
    assert torch.equal(_loop_generate(model, strategy, tokenizer, input_ids=ids), expected)


@pytest.mark.parametrize(
    "kwargs",
    [dict(lower_layer=1, weight=2.0, relative_top=0.5), dict(lower_layer=0.7, final_norm=True, weight=1.0)],
    ids=["layer1-w2-top0.5", "frac0.7-final-norm"],
)
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_options_match_reference(family, tokenizer, kwargs):
    model = _model(family)
    ids = _ids(tokenizer)
    lower = {1: 1, 0.7: 4}[kwargs["lower_layer"]]  # round(0.7 * 6) = 4
    expected = _reference_greedy(
        model, ids, instruction=_tokens(tokenizer, INSTRUCTION), lower=lower, weight=kwargs["weight"],
        relative_top=kwargs.get("relative_top", 0.1), final_norm=kwargs.get("final_norm", False),
    )  # fmt: skip
    strategy = LowerLayerFusion(amateur="prompt", amateur_instruction=INSTRUCTION, **kwargs)
    assert torch.equal(_processor_generate(model, strategy, tokenizer, input_ids=ids), expected)
    assert torch.equal(_loop_generate(model, strategy, tokenizer, input_ids=ids), expected)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_refocus_is_read_by_the_original_stream_only(family, tokenizer):
    model = _model(family)
    strategy = LowerLayerFusion(amateur="prompt", amateur_instruction=INSTRUCTION, refocus=REFOCUS)
    assert strategy.refocus_prompt(PROMPT) == REFOCUS + PROMPT
    ids = _ids(tokenizer, strategy.refocus_prompt(PROMPT))
    expected = _reference_greedy(
        model, ids, instruction=_tokens(tokenizer, INSTRUCTION), refocus=_tokens(tokenizer, REFOCUS)
    )
    assert torch.equal(_processor_generate(model, strategy, tokenizer, input_ids=ids), expected)
    assert torch.equal(_loop_generate(model, strategy, tokenizer, input_ids=ids), expected)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_refocused_left_padded_rows_equal_rows_alone(family, tokenizer):
    model = _model(family)
    strategy = LowerLayerFusion(amateur="prompt", amateur_instruction=INSTRUCTION, refocus=REFOCUS)
    texts = [strategy.refocus_prompt(PROMPT), strategy.refocus_prompt(SHORT)]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, return_token_type_ids=False)
    assert not bool(enc["attention_mask"].all())
    width = enc["input_ids"].shape[1]
    instruction, refocus = _tokens(tokenizer, INSTRUCTION), _tokens(tokenizer, REFOCUS)
    for out in (
        _processor_generate(model, strategy, tokenizer, steps=4, **enc),
        _loop_generate(model, strategy, tokenizer, steps=4, **enc),
    ):
        for row, text in enumerate(texts):
            alone = _ids(tokenizer, text)
            expected = _reference_greedy(model, alone, instruction=instruction, refocus=refocus, steps=4)
            assert out[row, width:].tolist() == expected[0, alone.shape[1] :].tolist()


def test_row_without_the_refocus_is_refused(tokenizer):
    model = _model("llama")
    before = model_state(model)
    strategy = LowerLayerFusion(amateur="prompt", refocus=REFOCUS)
    fragment = "does not start with the instruction the amateur replaces"
    with pytest.raises(ValueError, match=fragment):
        _processor_generate(model, strategy, tokenizer, input_ids=_ids(tokenizer))
    assert_same_state(before, model_state(model))
    with pytest.raises(ValueError, match=fragment):
        _loop_generate(model, strategy, tokenizer, input_ids=_ids(tokenizer))
    assert_same_state(before, model_state(model))
    # One row of a batch without it is enough.
    tokenizer.padding_side = "left"
    enc = tokenizer([strategy.refocus_prompt(PROMPT), SHORT], return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match=fragment):
        _loop_generate(
            model, strategy, tokenizer, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
        )
    with pytest.raises(ValueError, match=fragment):
        score_continuations(model, tokenizer, PROMPT, [" x"], strategy=strategy)
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize("refocus", [None, REFOCUS])
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_second_model_amateur_matches_reference(family, tokenizer, refocus):
    """A four-layer amateur: the lower layer is resolved per model (half depth: 3 and 2)."""
    model, amateur = _model(family), _small(family)
    strategy = LowerLayerFusion(amateur=amateur, weight=1.0, refocus=refocus)
    assert strategy.amateur_layers(LayerReadout.from_model(amateur)) == [2]
    text = strategy.refocus_prompt(PROMPT)
    ids = _ids(tokenizer, text)
    expected = _reference_greedy(
        model, ids, amateur=amateur, refocus=_tokens(tokenizer, refocus) if refocus else (),
        amateur_lower=2, weight=1.0,
    )  # fmt: skip
    before = model_state(amateur)
    assert torch.equal(_processor_generate(model, strategy, tokenizer, input_ids=ids), expected)
    assert torch.equal(_loop_generate(model, strategy, tokenizer, input_ids=ids), expected)
    assert_same_state(before, model_state(amateur))


def _concept_only(token_ids):
    """A classifier with no punctuation: suppressing punctuation then changes nothing."""
    return ["concept"] * len(token_ids)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_suppression_of_an_empty_class_gives_zero_contrast(family, tokenizer):
    """The suppressed copy equals the original, so F = 0 on the plausible set: the processor's
    scores are 0 there and -inf elsewhere, and greedy search takes the first plausible token."""
    model = _model(family)
    strategy = LowerLayerFusion(suppression={"amateur": "punctuation"}, relative_top=0.5)
    ids = _ids(tokenizer)
    with torch.no_grad():
        logits = model(ids).logits[:, -1].float()
    with ContrastLogitsProcessor(model, strategy, classifier=_concept_only) as proc:
        with torch.no_grad():
            model(ids)
        got = proc(ids, logits)
    final_lp = _lsm(logits)
    keep = final_lp >= final_lp.max(-1, keepdim=True).values + math.log(0.5)
    assert int(keep.sum()) > 1
    assert torch.equal(got == -torch.inf, ~keep)
    assert torch.equal(got[keep], torch.zeros_like(got[keep]))

    # min_new_tokens masks EOS (the first plausible token of some steps) in both paths.
    expected, first_differs = ids, False
    with torch.no_grad():
        for _ in range(STEPS):
            lp = _lsm(model(expected, use_cache=False).logits[0, -1])
            plausible = lp >= lp.max() + math.log(0.5)
            plausible[EOS] = False
            first = int(plausible.int().argmax())  # the first plausible index
            first_differs |= first != int(lp.argmax())
            expected = torch.cat([expected, torch.tensor([[first]])], dim=1)
    assert first_differs  # the answer is not plain greedy search
    kwargs = dict(classifier=_concept_only, input_ids=ids, min_new_tokens=STEPS)
    assert torch.equal(_processor_generate(model, strategy, None, **kwargs), expected)
    assert torch.equal(_loop_generate(model, strategy, None, **kwargs), expected)


@torch.no_grad()
def _reference_scores(model, tokenizer, amateur, instruction, refocus, protocol, relative_top, floor=-1000.0):
    prompt = (refocus or "") + PROMPT
    prefix = tokenizer(prompt)["input_ids"]
    instruction_ids = _tokens(tokenizer, instruction) if instruction else []
    refocus_ids = _tokens(tokenizer, refocus) if refocus else []
    amateur_lower = 2 if amateur is not model else MIDDLE
    out = []
    for cont in CONTINUATIONS:
        full = tokenizer(prompt + cont)["input_ids"]
        at = torch.arange(len(prefix) - 1, len(full) - 1)
        shift = len(instruction_ids) - len(refocus_ids)
        fused, final_lp = _fusion(
            model, amateur, full, _amateur_row(full, instruction_ids, refocus_ids), (at, at + shift),
            MIDDLE, amateur_lower, 0.5, False,
        )  # fmt: skip
        if protocol == "normalized":
            keep = final_lp >= final_lp.max(-1, keepdim=True).values + math.log(relative_top)
            fused = torch.where(keep, F.log_softmax(fused, -1), floor)
        targets = torch.tensor(full[len(prefix) :])
        out.append(fused.gather(-1, targets[:, None]).squeeze(-1))
    return out


@pytest.mark.parametrize("protocol", ["paper", "normalized"])
@pytest.mark.parametrize("amateur", ["prompt", "model"])
def test_scoring_matches_reference(tokenizer, amateur, protocol):
    model = _model("llama")
    if amateur == "prompt":
        amateur_model, instruction = model, INSTRUCTION
        strategy = LowerLayerFusion(
            amateur="prompt", amateur_instruction=INSTRUCTION, refocus=REFOCUS, relative_top=0.5
        )
    else:
        amateur_model, instruction = _small("llama"), None
        strategy = LowerLayerFusion(amateur=amateur_model, refocus=REFOCUS, relative_top=0.5)
    before = (model_state(model), model_state(amateur_model))
    got = score_continuations(
        model, tokenizer, strategy.refocus_prompt(PROMPT), CONTINUATIONS, strategy=strategy,
        protocol=protocol, batch_size=2,
    )  # fmt: skip
    assert_same_state(before[0], model_state(model))
    assert_same_state(before[1], model_state(amateur_model))
    expected = _reference_scores(model, tokenizer, amateur_model, instruction, REFOCUS, protocol, 0.5)
    if protocol == "normalized":
        assert any(bool((e == -1000.0).any()) for e in expected)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.token_scores.double(), e, rtol=1e-4, atol=1e-4)
        assert g.total == pytest.approx(float(e.sum()), rel=1e-4, abs=1e-3)


class Boom(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        raise RuntimeError("boom")


# The shared tester checks beam search refused and the model restored after errors for "lol"
# (suppression) and "lol-prompt"; a second-model amateur (its own layers captured) only here.
@pytest.mark.parametrize("amateur", ["model"])
def test_state_restored_after_exceptions(tokenizer, amateur):
    model = _model("llama")
    second = _small("llama")
    strategy = LowerLayerFusion(amateur=second if amateur == "model" else amateur)
    before = (model_state(model), model_state(second))
    with pytest.raises(RuntimeError, match="boom"):
        _loop_generate(
            model, strategy, tokenizer, steps=3, input_ids=_ids(tokenizer), stopping_criteria=[Boom()]
        )
    assert_same_state(before[0], model_state(model))
    with pytest.raises(RuntimeError, match="boom"):
        with ContrastLogitsProcessor(model, strategy, tokenizer=tokenizer) as proc:
            model.generate(
                _ids(tokenizer), logits_processor=[proc], stopping_criteria=[Boom()], max_new_tokens=3
            )
    assert_same_state(before[0], model_state(model))
    assert_same_state(before[1], model_state(second))
    with pytest.raises(RuntimeError, match="detached"):
        proc(_ids(tokenizer), torch.zeros(1, 96))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(lower_layer=1.0), "`lower_layer` as a fraction of depth must be in \\[0, 1\\)"),
        (dict(lower_layer=-0.5), "`lower_layer` as a fraction of depth must be in \\[0, 1\\)"),
        (dict(lower_layer=True), "`lower_layer` must be a layer index or a fraction"),
        (dict(lower_layer="middle"), "`lower_layer` must be a layer index or a fraction"),
        (dict(weight=-1.0), "`weight` must be (a finite number )?>= 0"),
        (dict(refocus=REFOCUS), "`refocus` needs an amateur that reads its own prompt"),
        (dict(amateur="prompt", refocus=""), "`refocus` must be a non-empty instruction string"),
        (dict(amateur="nouns"), "`amateur` must be 'suppression', 'prompt' or a second model"),
        (dict(amateur="prompt", suppression={}), "`suppression` only applies"),
        (dict(amateur="prompt", amateur_instruction=""), "`amateur_instruction` is an empty string"),
        (dict(amateur="prompt", amateur_instruction=None), "`amateur_instruction` is None"),
        (dict(relative_top=0.0), "`relative_top` must be in \\(0, 1\\]"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        LowerLayerFusion(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(amateur="prompt", lower_layer=6), "`lower_layer`=6 is outside 0..5"),
        (dict(amateur="prompt", lower_layer=-1), "`lower_layer`=-1 is outside 0..5"),
        (dict(lower_layer=7), "`lower_layer`=7 is outside 0..5"),
        (dict(amateur="model", lower_layer=5), "`lower_layer`=5 is outside 0..3"),  # the amateur's depth
    ],
)
def test_layer_outside_the_model_refused_before_attaching(tokenizer, kwargs, fragment):
    model, second = _model("llama"), _small("llama")
    if kwargs.get("amateur") == "model":
        kwargs = dict(kwargs, amateur=second)
    before = (model_state(model), model_state(second))
    with pytest.raises(ValueError, match=fragment):
        ContrastLogitsProcessor(model, LowerLayerFusion(**kwargs), tokenizer=tokenizer)
    with pytest.raises(ValueError, match=fragment):
        score_continuations(model, tokenizer, PROMPT, [" x"], strategy=LowerLayerFusion(**kwargs))
    assert_same_state(before[0], model_state(model))
    assert_same_state(before[1], model_state(second))


def test_defaults_and_repr():
    lol = LowerLayerFusion()
    assert lol.amateur == "suppression" and lol.weight == 0.5 and lol.refocus is None
    assert lol.amateur_stream() is None and lol.refocus_prompt(PROMPT) == PROMPT
    assert lol.premature_layers(LayerReadout.from_model(_model("llama"))) == [MIDDLE]
    prompt = LowerLayerFusion(amateur="prompt", refocus=TRUTHFUL_INSTRUCTION)
    assert prompt.amateur_stream().replace == TRUTHFUL_INSTRUCTION
    assert prompt.refocus_prompt(PROMPT) == TRUTHFUL_INSTRUCTION + PROMPT
    assert "amateur='prompt'" in repr(prompt) and "weight=0.5" in repr(prompt)
    assert "LlamaForCausalLM" in repr(LowerLayerFusion(amateur=_small("llama")))
