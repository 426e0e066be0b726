"""`PromptCache`: a shared primer's KV cache reused across `score_continuations` calls.

The reference is the same scoring without the cache, whose own correctness `test_scoring.py`
checks against hand-written references: with the cache, every prompt scores the same tokens and
the same values up to rounding (the primer and the rest run in two passes instead of one), and the
primer runs once for all calls.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_state, build_model, char_tokenizer, model_state

from contrastive_decoding import (
    ActivationDecoding,
    ContrastiveDecoding,
    DoLa,
    InducedContrast,
    LayerCake,
    PromptCache,
    VistaLogits,
    score_continuations,
)

pytestmark = pytest.mark.usefixtures("one_thread")

PRIMER = "Q: Is ice cold? A: Yes, ice is cold. Q: Is fire cold? A: No, fire is hot. "
QUESTIONS = ["Q: Where is the Eiffel tower? A:", "Q: Is snow white? A:", "Q: What is 2+2? A:"]
ANSWERS = [" Paris.", " In Rome, Italy.", " x", " It is white, mostly!"]


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def _lengths_of_forwards(model):
    """Record the input length of every forward of ``model``."""
    lengths: list[int] = []

    def hook(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        lengths.append(int(ids.shape[1]))

    return lengths, model.register_forward_pre_hook(hook, with_kwargs=True)


def _assert_same_scores(cached, plain, exact=False):
    for c, p in zip(cached, plain, strict=True):
        assert c.token_ids == p.token_ids and c.premature_layers == p.premature_layers
        if exact:
            assert torch.equal(c.token_scores, p.token_scores)
        else:
            torch.testing.assert_close(c.token_scores, p.token_scores, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "opt", "gpt_neox", "qwen2"])
@pytest.mark.parametrize(
    "strategy",
    [None, DoLa([0, 2, 4]), VistaLogits(late_layers=[3, 4]), InducedContrast(instruction="Lie. ")],
    ids=["plain", "dola", "vista", "amateur"],
)
@pytest.mark.parametrize("protocol", ["paper", "normalized"])
def test_cached_primer_scores_like_the_full_prompt(tokenizer, family, strategy, protocol):
    model = build_model(family)
    cache = PromptCache(PRIMER)
    for question in QUESTIONS:
        prompt = PRIMER + question
        plain = score_continuations(model, tokenizer, prompt, ANSWERS, strategy=strategy, protocol=protocol)
        cached = score_continuations(
            model, tokenizer, prompt, ANSWERS, strategy=strategy, protocol=protocol, prompt_cache=cache
        )
        _assert_same_scores(cached, plain)


def test_the_primer_runs_once_and_each_prompt_runs_only_its_own_tokens(tokenizer):
    model = build_model("llama")
    cache = PromptCache(PRIMER)
    primer_len = len(tokenizer(PRIMER)["input_ids"])  # BOS + one token per character
    lengths, handle = _lengths_of_forwards(model)
    try:
        for question in QUESTIONS:
            score_continuations(model, tokenizer, PRIMER + question, ANSWERS, prompt_cache=cache)
    finally:
        handle.remove()
    longest_tail = max(len(a) for a in ANSWERS) - 1
    # One primer pass, then per question: its own tokens, then the continuations' tails.
    assert lengths == [primer_len] + [n for q in QUESTIONS for n in (len(q), longest_tail)]


def test_with_an_amateur_each_stream_runs_its_primer_once_and_each_prompt_its_own_tokens(tokenizer):
    # The amateur reads its own rows (instruction + prompt + answer): its view of the primer (the
    # instruction, then the primer) runs once too, then per prompt its own tokens and the answers.
    model = build_model("llama")
    cache = PromptCache(PRIMER)
    instruction = "Lie. "
    primer_len = len(tokenizer(PRIMER)["input_ids"])  # BOS + one token per character
    lengths, handle = _lengths_of_forwards(model)
    try:
        for question in QUESTIONS:
            score_continuations(
                model,
                tokenizer,
                PRIMER + question,
                ANSWERS,
                strategy=InducedContrast(instruction=instruction),
                prompt_cache=cache,
            )
    finally:
        handle.remove()
    main_tail, amateur_tail = max(len(a) for a in ANSWERS) - 1, max(len(a) for a in ANSWERS)
    expected = [primer_len]
    for i, question in enumerate(QUESTIONS):
        expected += [len(question), main_tail]
        expected += [len(instruction) + primer_len] if i == 0 else []  # BOS, instruction, primer
        expected += [len(question), amateur_tail]
    assert lengths == expected


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_an_amateur_model_keeps_its_own_primer_cache(tokenizer, family):
    # Classic CD: the amateur is another model, so its cache of the primer is its own, not the
    # main model's; scores still equal the uncached ones.
    model, amateur = build_model(family), build_model(family, seed=1, num_hidden_layers=2)
    cache = PromptCache(PRIMER)
    strategy = ContrastiveDecoding(amateur, relative_top=None)
    for question in QUESTIONS:
        prompt = PRIMER + question
        plain = score_continuations(model, tokenizer, prompt, ANSWERS, strategy=strategy)
        cached = score_continuations(model, tokenizer, prompt, ANSWERS, strategy=strategy, prompt_cache=cache)
        _assert_same_scores(cached, plain)
    assert len(cache._side) == 1


def test_prompts_without_the_primer_run_in_full(tokenizer):
    model = build_model("llama")
    cache = PromptCache(PRIMER)
    other = "Q: Is ice hot? A: No. " + QUESTIONS[0]  # shares "Q: Is ice " with the primer, no more
    short = PRIMER[:-1]  # the primer's text cut short
    for prompt in (other, short, PRIMER):  # the primer itself: nothing after it to run on the cache
        _assert_same_scores(
            score_continuations(model, tokenizer, prompt, ANSWERS, prompt_cache=cache),
            score_continuations(model, tokenizer, prompt, ANSWERS),
            exact=True,
        )
    assert cache._tokens is None and cache._cache is None  # nothing was cached


def test_the_cached_part_stops_where_the_primer_merges_with_what_follows(tokenizer):
    # A tokenizer that merges across the boundary: "\n\n" is one token at the end of the primer,
    # two before "Q" (SmolLM2's BPE does this with the TruthfulQA primer). Emulated on characters:
    # the primer's last character is tokenized differently when text follows it.
    model = build_model("llama")

    class MergingTokenizer:
        def __init__(self, inner):
            self.inner = inner
            self.pad_token_id = inner.pad_token_id

        def __call__(self, text, **kwargs):
            out = self.inner(text, **kwargs)
            ids = list(out["input_ids"])
            if text == PRIMER:
                ids[-1] = 5  # the trailing space (id 4) gets another id than inside a prompt
            return {"input_ids": ids}

    merging = MergingTokenizer(tokenizer)
    cache = PromptCache(PRIMER)
    prompt = PRIMER + QUESTIONS[0]
    cached = score_continuations(model, merging, prompt, ANSWERS, prompt_cache=cache)
    plain = score_continuations(model, merging, prompt, ANSWERS)
    _assert_same_scores(cached, plain)
    assert cache._tokens == tokenizer(PRIMER)["input_ids"][:-1]


@pytest.mark.parametrize(
    "strategy",
    [
        LayerCake(),
        ActivationDecoding(info_layer=3, context="all", relative_top=None),
    ],
    ids=["streams", "entropy"],
)
def test_strategies_that_read_the_whole_prompt_ignore_the_cache(tokenizer, strategy):
    model = build_model("llama")
    cache = PromptCache(PRIMER)
    prompt = PRIMER + QUESTIONS[0]
    cached = score_continuations(model, tokenizer, prompt, ANSWERS, strategy=strategy, prompt_cache=cache)
    plain = score_continuations(model, tokenizer, prompt, ANSWERS, strategy=strategy)
    _assert_same_scores(cached, plain, exact=True)
    assert cache._tokens is None  # never consulted


def test_one_cache_per_model_and_bad_input(tokenizer):
    with pytest.raises(ValueError, match="`primer` must be a non-empty string"):
        PromptCache("")
    with pytest.raises(ValueError, match="`primer`"):
        PromptCache(None)
    model, other = build_model("llama"), build_model("llama", seed=1)
    cache = PromptCache(PRIMER)
    score_continuations(model, tokenizer, PRIMER + QUESTIONS[0], ANSWERS, prompt_cache=cache)
    before = model_state(other)
    with pytest.raises(ValueError, match="one PromptCache per model"):
        score_continuations(other, tokenizer, PRIMER + QUESTIONS[0], ANSWERS, prompt_cache=cache)
    assert_same_state(before, model_state(other))
