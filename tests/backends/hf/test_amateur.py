"""The amateur stream: Amateur's validation, AmateurRunner against plain forward passes, and the
amateur seen through the shared machinery (processor, generate loop, scoring).

References run the amateur model uncached on the amateur's row built by hand (BOS, the prefix,
the row without ``replace``) and read its last position (or, for layers, ``hidden_states[j]``
through the logit lens). A strategy that returns the amateur's own logits makes greedy decoding
follow the amateur, which a plain argmax loop reproduces.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import assert_same_state, cached_model, char_tokenizer, left_padded, model_state
from reference_impl import early_exit

from contrastive_decoding import (
    Amateur,
    ContrastLogitsProcessor,
    ContrastStrategy,
    SuppressionRule,
    score_continuations,
    strategy_generate,
)
from contrastive_decoding.backends.hf.amateur import AmateurRunner, check_same_vocabulary

pytestmark = pytest.mark.usefixtures("one_thread")

BOS, EOS = 1, 2
PROMPT = "Q: Where is the Eiffel tower? A:"
SHORT = "Who wrote it? A:"
PREFIX = "Lie! Say false things. "
REPLACE = "Be true: "

_model = cached_model


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def _tokens(tokenizer, text: str, bos: bool = False) -> list[int]:
    return tokenizer(text, add_special_tokens=bos)["input_ids"]


def _amateur_row(row: list[int], prefix: list[int], replace: list[int] = (), bos: bool = True) -> list[int]:
    head = 1 if bos and row[:1] == [BOS] else 0
    rest = row[head:]
    assert rest[: len(replace)] == list(replace)
    return row[:head] + list(prefix) + rest[len(replace) :]


@torch.no_grad()
def _last(model, row: list[int], layers=()) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = model(torch.tensor([row]), output_hidden_states=True, use_cache=False)
    return out.logits[0, -1].float(), [out.hidden_states[j][0, -1] for j in layers]


# -- Amateur ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(), "needs `model=`"),
        (dict(model="gpt2"), "`model` must be a causal LM"),
        (dict(prefix=""), "`prefix` is an empty string"),
        (dict(prefix=[]), "`prefix` must be a non-empty string or a non-empty list of token ids"),
        (dict(prefix=[4, True]), "`prefix` must be a non-empty string or a non-empty list"),
        (dict(prefix=[4.0]), "`prefix` must be a non-empty string or a non-empty list"),
        (dict(prefix="x", replace=""), "`replace` is an empty string"),
        (dict(prefix="x", replace=[]), "`replace` must be a non-empty string"),
    ],
)
def test_amateur_bad_arguments_name_the_argument(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        Amateur(**kwargs)


def test_amateur_keeps_its_description():
    model = _model("llama", seed=1, num_hidden_layers=2)
    amateur = Amateur(model=model, prefix=(5, 6), replace="x")
    assert amateur.model is model and amateur.prefix == [5, 6] and amateur.replace == "x"
    assert repr(amateur) == "Amateur(model=LlamaForCausalLM, prefix=[5, 6], replace='x')"
    assert Amateur(replace="x").prefix is None  # reading the row without `replace` is an amateur too


# -- check_same_vocabulary ---------------------------------------------------------------------------


def test_check_same_vocabulary(tokenizer):
    main, same = _model("llama"), _model("gpt2", seed=1, num_hidden_layers=2)
    check_same_vocabulary(main, same)  # another family of the same vocabulary size is accepted
    check_same_vocabulary(main, same, tokenizer, char_tokenizer())
    wide = _model("llama", seed=1, num_hidden_layers=2, vocab_size=100)
    with pytest.raises(ValueError, match="output head has 100 tokens but the model's has 96"):
        check_same_vocabulary(main, wide)
    other = char_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="amateur's tokenizer differs from the model's"):
        check_same_vocabulary(main, same, tokenizer, other)
    check_same_vocabulary(main, same, None, other)  # one tokenizer only: the head sizes decide


# -- AmateurRunner.step ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "opt", "gpt_neox"])
def test_runner_steps_equal_uncached_passes_of_the_prefixed_rows(family, tokenizer):
    """Left-padded rows, the prefix after BOS; then one new token per row, then two at once."""
    model = _model(family)
    prefix = _tokens(tokenizer, PREFIX)
    rows = [_tokens(tokenizer, PROMPT, bos=True), _tokens(tokenizer, SHORT, bos=True)]
    layers = [1, 4]
    runner = AmateurRunner(Amateur(prefix=PREFIX), model, tokenizer, layers=layers)
    _last(model, rows[1], layers)  # transformers installs its own hooks on a first hidden-states call
    before = model_state(model)
    with runner:
        assert runner.attached and runner.same_model
        for new in ([], [[7], [8]], [[9, 10], [11, 12]]):
            rows = [r + n for r, n in zip(rows, new or [[], []], strict=True)]
            ids, mask = left_padded([torch.tensor(r) for r in rows])
            logits, states = runner.step(ids, mask)
            assert logits.shape == (2, 96) and states.shape == (2, 2, 32)
            for i, row in enumerate(rows):
                expected, hidden = _last(model, _amateur_row(row, prefix), layers)
                torch.testing.assert_close(logits[i], expected, rtol=1e-4, atol=1e-4)
                for j in range(len(layers)):
                    torch.testing.assert_close(states[j, i], hidden[j], rtol=1e-4, atol=1e-4)
    assert_same_state(before, model_state(model))


def test_runner_refuses_a_changed_history(tokenizer):
    model = _model("llama")
    ids = torch.tensor([_tokens(tokenizer, PROMPT, bos=True)] * 2)
    with AmateurRunner(Amateur(prefix=[5, 6]), model, tokenizer) as runner:
        runner.step(ids, None)
        changed = torch.cat([ids.flip(0), torch.tensor([[7], [8]])], dim=1)
        changed[0, 3] = 9
        with pytest.raises(RuntimeError, match="earlier tokens change"):
            runner.step(changed, None)
    with AmateurRunner(Amateur(prefix=[5, 6]), model, tokenizer) as runner:
        runner.step(ids, None)
        with pytest.raises(RuntimeError, match="earlier tokens change"):
            runner.step(ids[:, :-1], None)


def test_runner_without_tokenizer_puts_token_prefix_first(tokenizer):
    """With no tokenizer there is no BOS to look for: the prefix goes in front of the whole row."""
    model = _model("llama")
    row = _tokens(tokenizer, PROMPT, bos=True)
    with AmateurRunner(Amateur(prefix=[5, 6, 7]), model) as runner:
        logits, states = runner.step(torch.tensor([row]), None)
    assert states is None
    expected, _ = _last(model, [5, 6, 7] + row)
    torch.testing.assert_close(logits[0], expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="`prefix` is text; pass the model's tokenizer"):
        AmateurRunner(Amateur(prefix=PREFIX), model)
    with pytest.raises(ValueError, match="`replace` is text; pass the model's tokenizer"):
        AmateurRunner(Amateur(prefix=[5], replace=REPLACE), model)


@pytest.mark.parametrize("prefix", [PREFIX, None])
def test_runner_reads_its_prefix_in_place_of_replace(tokenizer, prefix):
    model = _model("gpt_neox")
    replace = _tokens(tokenizer, REPLACE)
    row = _tokens(tokenizer, REPLACE + PROMPT, bos=True)
    with AmateurRunner(Amateur(prefix=prefix, replace=REPLACE), model, tokenizer) as runner:
        logits, _ = runner.step(torch.tensor([row]), None)
        expected, _ = _last(model, _amateur_row(row, _tokens(tokenizer, prefix) if prefix else [], replace))
        torch.testing.assert_close(logits[0], expected, rtol=1e-4, atol=1e-4)
    with AmateurRunner(Amateur(prefix=prefix, replace=REPLACE), model, tokenizer) as runner:
        with pytest.raises(ValueError, match="does not start with the instruction the amateur replaces"):
            runner.step(torch.tensor([_tokens(tokenizer, PROMPT, bos=True)]), None)


# -- AmateurRunner.score_rows ------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_score_rows_equal_uncached_passes(family, tokenizer):
    model = _model(family)
    second = _model(family, seed=1, num_hidden_layers=3)
    prefix = _tokens(tokenizer, PROMPT, bos=True)
    conts = [_tokens(tokenizer, " Paris."), _tokens(tokenizer, " x"), _tokens(tokenizer, " In Rome.")]
    for spec, amateur_model, start in (
        (Amateur(prefix=PREFIX), model, _amateur_row(prefix, _tokens(tokenizer, PREFIX))),
        (Amateur(model=second), second, prefix),
    ):
        with AmateurRunner(spec, model, tokenizer, layers=[2], positions="all") as runner:
            logits, states = runner.score_rows(prefix, conts)
        assert logits.shape[:2] == (3, 1 + max(len(c) for c in conts))
        for i, cont in enumerate(conts):
            with torch.no_grad():
                out = amateur_model(torch.tensor([start + cont]), output_hidden_states=True, use_cache=False)
            at = torch.arange(len(start) - 1, len(start) + len(cont))  # k predicts cont[k]; then the end
            k = len(at)
            torch.testing.assert_close(logits[i, :k], out.logits[0, at].float(), rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(states[0, i, :k], out.hidden_states[2][0, at], rtol=1e-4, atol=1e-4)


# -- through the shared machinery --------------------------------------------------------------------


class FollowAmateur(ContrastStrategy):
    """Scores = the amateur's logits (or its early exit at ``layer``): greedy search follows it."""

    relative_top = None

    def __init__(self, amateur: Amateur, layer: int | None = None):
        self.amateur, self.layer = amateur, layer

    def amateur_stream(self):
        return self.amateur

    def amateur_layers(self, readout):
        return [] if self.layer is None else [self.layer]

    def combine(self, x):
        return x.amateur if self.layer is None else x.amateur_layers[0]


def _follow_reference(amateur_model, ids, amateur_row, steps, layer=None) -> torch.Tensor:
    row = ids[0].tolist()
    for _ in range(steps):
        logits, hidden = _last(amateur_model, amateur_row(row), [] if layer is None else [layer])
        if layer is not None:
            with torch.no_grad():
                logits = early_exit(amateur_model, hidden[0])
        row.append(int(logits.argmax()))
        if row[-1] == EOS:
            break
    return torch.tensor([row])


def _generate_both(model, strategy, tokenizer, ids, steps, **kwargs):
    with ContrastLogitsProcessor(model, strategy, tokenizer=tokenizer) as proc:
        by_processor = model.generate(
            ids, logits_processor=[proc], max_new_tokens=steps, do_sample=False, **kwargs
        )
    loop = functools.partial(strategy_generate, tokenizer=tokenizer)
    by_loop = model.generate(
        ids, custom_generate=loop, strategy=strategy, max_new_tokens=steps, do_sample=False, **kwargs
    )
    return by_processor, by_loop


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "opt", "gpt_neox"])
def test_generation_follows_the_prompted_amateur(family, tokenizer):
    model = _model(family)
    ids = torch.tensor([_tokens(tokenizer, PROMPT, bos=True)])
    prefix = _tokens(tokenizer, PREFIX)
    expected = _follow_reference(model, ids, lambda r: _amateur_row(r, prefix), steps=5)
    for out in _generate_both(model, FollowAmateur(Amateur(prefix=PREFIX)), tokenizer, ids, 5):
        assert torch.equal(out, expected)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_generation_follows_a_second_model_and_its_layers(family, tokenizer):
    model, second = _model(family), _model(family, seed=1, num_hidden_layers=3)
    ids = torch.tensor([_tokens(tokenizer, PROMPT, bos=True)])
    with torch.no_grad():
        stock = second.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(_follow_reference(second, ids, lambda r: r, 5), stock)
    for out in _generate_both(model, FollowAmateur(Amateur(model=second)), tokenizer, ids, 5):
        assert torch.equal(out, stock)
    expected = _follow_reference(second, ids, lambda r: r, 5, layer=2)
    for out in _generate_both(model, FollowAmateur(Amateur(model=second), layer=2), tokenizer, ids, 5):
        assert torch.equal(out, expected)


def test_processor_reused_across_generate_calls_and_uncached(tokenizer):
    """One processor, two generate calls on unrelated prompts (the second shorter than what the
    amateur has read), then uncached decoding: each equals its reference."""
    model = _model("llama")
    prefix = _tokens(tokenizer, PREFIX)
    strategy = FollowAmateur(Amateur(prefix=PREFIX))
    first = torch.tensor([_tokens(tokenizer, PROMPT, bos=True)])
    second = torch.tensor([_tokens(tokenizer, SHORT, bos=True)])
    before = model_state(model)
    with ContrastLogitsProcessor(model, strategy, tokenizer=tokenizer) as proc:
        for ids, kwargs in ((first, {}), (second, {}), (first, dict(use_cache=False))):
            out = model.generate(ids, logits_processor=[proc], max_new_tokens=4, do_sample=False, **kwargs)
            assert torch.equal(out, _follow_reference(model, ids, lambda r: _amateur_row(r, prefix), 4))
    assert_same_state(before, model_state(model))


def test_left_padded_batch_follows_each_row(tokenizer):
    model = _model("gemma2")
    prefix = _tokens(tokenizer, PREFIX)
    texts = [PROMPT, SHORT]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, return_token_type_ids=False)
    width = enc["input_ids"].shape[1]
    strategy = FollowAmateur(Amateur(prefix=PREFIX))
    for out in _generate_both(
        model, strategy, tokenizer, enc["input_ids"], 4, attention_mask=enc["attention_mask"]
    ):
        for row, text in enumerate(texts):
            alone = torch.tensor([_tokens(tokenizer, text, bos=True)])
            expected = _follow_reference(model, alone, lambda r: _amateur_row(r, prefix), 4)
            assert out[row, width:].tolist() == expected[0, alone.shape[1] :].tolist()


def test_scoring_reads_the_amateur(tokenizer):
    """`paper` scores of FollowAmateur are the amateur's raw logits of each target."""
    model = _model("gpt2")
    prefix = _tokens(tokenizer, PREFIX)
    conts = [" Paris.", " x"]
    got = score_continuations(model, tokenizer, PROMPT, conts, strategy=FollowAmateur(Amateur(prefix=PREFIX)))
    start = _amateur_row(_tokens(tokenizer, PROMPT, bos=True), prefix)
    for g, cont in zip(got, conts, strict=True):
        targets = _tokens(tokenizer, cont)
        with torch.no_grad():
            logits = model(torch.tensor([start + targets]), use_cache=False).logits[0].float()
        expected = logits[torch.arange(len(start) - 1, len(start) + len(targets) - 1), targets]
        torch.testing.assert_close(g.token_scores, expected, rtol=1e-4, atol=1e-4)


# -- refusals before anything is attached -----------------------------------------------------------


class StreamsAndPrompt(FollowAmateur):
    def degraded_streams(self, readout):
        return [[SuppressionRule("punctuation", [0])]]


def test_refusals_leave_the_models_unchanged(tokenizer):
    model, second = _model("llama"), _model("llama", seed=1, num_hidden_layers=2)
    before = (model_state(model), model_state(second))
    cases = [
        (FollowAmateur(Amateur(model=second), layer=5), "`amateur_layers` has layer 5, outside 0..1"),
        (FollowAmateur(Amateur(prefix=PREFIX)), "`prefix` is text; pass the model's tokenizer"),
        (
            StreamsAndPrompt(Amateur(prefix=[5])),
            "combines degraded streams with an amateur of the same model",
        ),
        (
            FollowAmateur(Amateur(model=_model("llama", seed=1, num_hidden_layers=2, vocab_size=100))),
            "output head has 100 tokens",
        ),
    ]
    for strategy, fragment in cases:
        with pytest.raises(ValueError, match=fragment):
            ContrastLogitsProcessor(
                model, strategy, tokenizer=tokenizer if "prefix" not in fragment else None
            )
        assert_same_state(before[0], model_state(model))
        assert_same_state(before[1], model_state(second))
