"""Classic contrastive decoding (a second, smaller amateur model) against a hand-written reference.

The reference runs the expert and the amateur uncached on the whole sequence at every step and
writes ``log_softmax(expert) - log_softmax(amateur / T)`` with the plausibility threshold
``log p >= max log p + log(relative_top)`` out by hand; scoring runs each continuation alone.
Beam search refused and the model restored after errors are checked for every strategy by
``tests/backends/hf/test_strategy_contract.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_state, cached_model, char_tokenizer, model_state
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from contrastive_decoding import (
    ContrastiveDecoding,
    ContrastLogitsProcessor,
    score_continuations,
    strategy_generate,
)

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6
EOS = 2
PROMPT = "Q: Where is the Eiffel tower? A:"
SHORT = "Who wrote it? A:"
CONTINUATIONS = [" Paris.", " In Rome, Italy.", " x"]
FIVE_FAMILIES = ["llama", "gpt2", "gemma2", "opt", "gpt_neox"]

_model = cached_model


def _pair(family: str):
    """The family's expert (six layers) and a two-layer amateur of the same vocabulary."""
    return _model(family), _model(family, seed=1, num_hidden_layers=2)


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def _ids(tokenizer, text=PROMPT) -> torch.Tensor:
    return torch.tensor([tokenizer(text)["input_ids"]])


def _keep(expert_lp: torch.Tensor, relative_top: float | None, min_tokens: int = 1) -> torch.Tensor:
    """The plausible set by hand: the looser of the relative threshold and the k-th best token."""
    if relative_top is None:
        return torch.ones_like(expert_lp, dtype=torch.bool)
    threshold = expert_lp.max(-1, keepdim=True).values + math.log(relative_top)
    kth = expert_lp.topk(min_tokens, dim=-1).values[..., -1:]
    return expert_lp >= torch.minimum(threshold, kth)


def _contrast(expert_logits, amateur_logits, temperature):
    return F.log_softmax(expert_logits.double(), -1) - F.log_softmax(
        amateur_logits.double() / temperature, -1
    )


@torch.no_grad()
def _reference_step(expert, amateur, ids, temperature=0.5, relative_top=0.1, min_tokens=1):
    """CD scores of the next token for each row of ``ids`` (unpadded), -inf off the plausible set."""
    e = expert(ids, use_cache=False).logits[:, -1]
    a = amateur(ids, use_cache=False).logits[:, -1]
    keep = _keep(F.log_softmax(e.double(), -1), relative_top, min_tokens)
    return torch.where(keep, _contrast(e, a, temperature), -torch.inf)


def _reference_greedy(expert, amateur, ids, steps=STEPS, **kwargs) -> torch.Tensor:
    for _ in range(steps):
        token = _reference_step(expert, amateur, ids, **kwargs).argmax(-1, keepdim=True)
        ids = torch.cat([ids, token], dim=1)
        if int(token) == EOS:
            break
    return ids


def _processor_generate(model, strategy, tokenizer, steps=STEPS, **inputs):
    with ContrastLogitsProcessor(model, strategy, tokenizer=tokenizer) as proc:
        return model.generate(**inputs, logits_processor=[proc], max_new_tokens=steps, do_sample=False)


def _loop_generate(model, strategy, tokenizer, steps=STEPS, **inputs):
    return model.generate(
        **inputs, custom_generate=strategy_generate, strategy=strategy, tokenizer=tokenizer,
        max_new_tokens=steps, do_sample=False,
    )  # fmt: skip


@pytest.mark.parametrize("family", FIVE_FAMILIES)
def test_greedy_processor_and_loop_match_reference(family, tokenizer):
    expert, amateur = _pair(family)
    ids = _ids(tokenizer)
    expected = _reference_greedy(expert, amateur, ids)
    with torch.no_grad():
        plain = expert.generate(ids, max_new_tokens=STEPS, do_sample=False)
    assert not torch.equal(expected, plain)  # the contrast changes the greedy choice
    strategy = ContrastiveDecoding(amateur)
    assert torch.equal(_processor_generate(expert, strategy, tokenizer, input_ids=ids), expected)
    assert torch.equal(_loop_generate(expert, strategy, tokenizer, input_ids=ids), expected)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(amateur_temperature=1.0, relative_top=0.5),
        dict(amateur_temperature=2.0, relative_top=None),
        dict(relative_top=1.0, min_tokens_to_keep=4),
    ],
    ids=["T1-top0.5", "T2-nofilter", "top1-keep4"],
)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_options_match_reference(family, tokenizer, kwargs):
    expert, amateur = _pair(family)
    ids = _ids(tokenizer)
    expected = _reference_greedy(
        expert, amateur, ids, temperature=kwargs.get("amateur_temperature", 0.5),
        relative_top=kwargs.get("relative_top", 0.1), min_tokens=kwargs.get("min_tokens_to_keep", 1),
    )  # fmt: skip
    strategy = ContrastiveDecoding(amateur, **kwargs)
    assert torch.equal(_processor_generate(expert, strategy, tokenizer, input_ids=ids), expected)
    assert torch.equal(_loop_generate(expert, strategy, tokenizer, input_ids=ids), expected)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_step_scores_match_reference(family, tokenizer):
    """One processor call on a two-row batch: the scores themselves, -inf pattern included. The tiny
    models' distributions are flat; a threshold at the median's relative probability leaves
    tokens on both sides of the plausible set in every row."""
    expert, amateur = _pair(family)
    ids = torch.tensor([tokenizer(PROMPT)["input_ids"], tokenizer(PROMPT[::-1])["input_ids"]])
    with torch.no_grad():
        scores = expert(ids).logits[:, -1].float()
    p = scores.double().softmax(-1)
    alpha = float((p.median(-1).values / p.max(-1).values).max())
    strategy = ContrastiveDecoding(amateur, relative_top=alpha)
    with ContrastLogitsProcessor(expert, strategy, tokenizer=tokenizer) as proc:
        expert(ids)  # the forward whose logits the processor records
        got = proc(ids, scores)
    expected = _reference_step(expert, amateur, ids, relative_top=alpha)
    assert torch.equal(got == -torch.inf, expected == -torch.inf)
    finite = expected > -torch.inf
    assert bool((~finite).any(-1).all()) and int(finite.sum(-1).min()) > 1
    torch.testing.assert_close(got.double()[finite], expected[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_left_padded_rows_equal_rows_alone(family, tokenizer):
    expert, amateur = _pair(family)
    tokenizer.padding_side = "left"
    enc = tokenizer([PROMPT, SHORT], return_tensors="pt", padding=True, return_token_type_ids=False)
    assert not bool(enc["attention_mask"].all())
    strategy = ContrastiveDecoding(amateur)
    width = enc["input_ids"].shape[1]
    for out in (
        _processor_generate(expert, strategy, tokenizer, steps=5, **enc),
        _loop_generate(expert, strategy, tokenizer, steps=5, **enc),
    ):
        for row, text in enumerate([PROMPT, SHORT]):
            alone = _ids(tokenizer, text)
            expected = _reference_greedy(expert, amateur, alone, steps=5)[0, alone.shape[1] :]
            assert out[row, width:].tolist() == expected.tolist()


@torch.no_grad()
def _reference_scores(expert, amateur, tokenizer, protocol, relative_top, temperature=0.5, floor=-1000.0):
    """Per continuation: its own uncached passes of both models, the protocol by hand."""
    prefix = tokenizer(PROMPT)["input_ids"]
    out = []
    for cont in CONTINUATIONS:
        full = tokenizer(PROMPT + cont)["input_ids"]
        ids = torch.tensor([full])
        at = torch.arange(len(prefix) - 1, len(full) - 1)
        targets = torch.tensor(full[len(prefix) :])
        e = expert(ids, use_cache=False).logits[0, at]
        a = amateur(ids, use_cache=False).logits[0, at]
        contrast = _contrast(e, a, temperature)
        if protocol == "normalized":
            keep = _keep(F.log_softmax(e.double(), -1), relative_top)
            contrast = torch.where(keep, F.log_softmax(contrast, -1), floor)
        out.append(contrast.gather(-1, targets[:, None]).squeeze(-1))
    return out


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("protocol", ["paper", "normalized"])
@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_scoring_matches_reference(family, tokenizer, protocol, share_prefix):
    # relative_top=0.5 so that "normalized" floors some tokens; "paper" has no filter at all.
    expert, amateur = _pair(family)
    before = (model_state(expert), model_state(amateur))
    got = score_continuations(
        expert, tokenizer, PROMPT, CONTINUATIONS, strategy=ContrastiveDecoding(amateur, relative_top=0.5),
        protocol=protocol, share_prefix=share_prefix, batch_size=2,
    )  # fmt: skip
    assert_same_state(before[0], model_state(expert))
    assert_same_state(before[1], model_state(amateur))
    expected = _reference_scores(expert, amateur, tokenizer, protocol, relative_top=0.5)
    if protocol == "normalized":
        assert any(bool((e == -1000.0).any()) for e in expected)  # the floor is exercised
    for g, e in zip(got, expected, strict=True):
        assert g.premature_layers is None
        torch.testing.assert_close(g.token_scores.double(), e, rtol=1e-4, atol=1e-4)
        assert g.total == pytest.approx(float(e.sum()), rel=1e-4, abs=1e-3)


def _shifted_tokenizer():
    """A character tokenizer with two characters' ids swapped: same size, different vocabulary."""
    from transformers import PreTrainedTokenizerFast

    vocab = dict(char_tokenizer().get_vocab())
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def test_vocabulary_mismatch_refused_before_attaching(tokenizer):
    expert = _model("llama")
    wide = _model("llama", seed=1, num_hidden_layers=2, vocab_size=100)
    same_size = _model("llama", seed=1, num_hidden_layers=2)
    before = (model_state(expert), model_state(wide), model_state(same_size))
    ids = _ids(tokenizer)
    fragment = "output head has 100 tokens but the model's has 96"
    with pytest.raises(ValueError, match=fragment):
        ContrastLogitsProcessor(expert, ContrastiveDecoding(wide), tokenizer=tokenizer)
    with pytest.raises(ValueError, match=fragment):
        _loop_generate(expert, ContrastiveDecoding(wide), tokenizer, input_ids=ids)
    with pytest.raises(ValueError, match=fragment):
        score_continuations(expert, tokenizer, PROMPT, [" x"], strategy=ContrastiveDecoding(wide))
    other = _shifted_tokenizer()
    assert len(other.get_vocab()) == len(tokenizer.get_vocab())
    mismatched = ContrastiveDecoding(same_size, amateur_tokenizer=other)
    with pytest.raises(ValueError, match="amateur's tokenizer differs from the model's"):
        ContrastLogitsProcessor(expert, mismatched, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="amateur's tokenizer differs from the model's"):
        score_continuations(expert, tokenizer, PROMPT, [" x"], strategy=mismatched)
    for model, state in zip((expert, wide, same_size), before, strict=True):
        assert_same_state(state, model_state(model))
    # The same vocabulary under another tokenizer object is accepted.
    ContrastLogitsProcessor(
        expert, ContrastiveDecoding(same_size, amateur_tokenizer=char_tokenizer()), tokenizer=tokenizer
    ).detach()
    assert_same_state(before[0], model_state(expert))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(amateur_temperature=0), "`amateur_temperature` must be (a finite number )?> 0"),
        (dict(amateur_temperature=-0.5), "`amateur_temperature` must be (a finite number )?> 0"),
        (dict(amateur_temperature=True), "`amateur_temperature` must be (a finite number )?> 0"),
        (dict(amateur_temperature="0.5"), "`amateur_temperature` must be (a finite number )?> 0"),
        (dict(relative_top=0.0), "`relative_top` must be in \\(0, 1\\]"),
        (dict(relative_top=1.5), "`relative_top` must be in \\(0, 1\\]"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        ContrastiveDecoding(_model("llama", seed=1, num_hidden_layers=2), **kwargs)


def test_amateur_model_must_be_a_module():
    with pytest.raises(ValueError, match="`amateur_model` must be a causal LM"):
        ContrastiveDecoding("gpt2")


def test_defaults_and_repr():
    amateur = _model("llama", seed=1, num_hidden_layers=2)
    cd = ContrastiveDecoding(amateur)
    assert cd.amateur_temperature == 0.5 and cd.relative_top == 0.1
    assert cd.amateur_stream().model is amateur and cd.amateur_stream().prefix is None
    assert "LlamaForCausalLM" in repr(cd) and "amateur_temperature=0.5" in repr(cd)
