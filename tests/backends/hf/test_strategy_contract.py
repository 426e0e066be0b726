"""One shared tester for every registered strategy (as peft's common tester is for its methods).

Parametrised over the registry (:func:`contrastive_decoding.strategies.registered_strategies`, and
its presets), so a newly registered strategy is covered without editing this file. For each strategy
and each front-end it supports (the processor in stock ``generate``, the processor class and the
``custom_generate`` loop derived from its class, ``strategy_generate`` by name, and scoring):

* the model is restored exactly (hooks, attention implementation, weights) after a ``with`` block,
  after inline use (the processor dropped), and after an exception inside the block or the call;
* bad arguments are refused before anything is attached (the model left unchanged);
* the processor in stock ``generate`` gives the tokens of the custom generate loop (greedy);
* a left-padded batch gives each row's tokens alone, and ``use_cache=False`` those of the cache;
* the score of a continuation under protocol ``"paper"`` is the step score the processor gave
  that token at that position;
* beam search runs (and keeps the contract) where the strategy supports it, and is refused with a
  clear error, the model untouched, where it does not.

The strategy math itself is checked against hand references in ``tests/strategies/``; this file
checks what every strategy owes every front-end. :data:`SETTINGS` gives construction settings only
for strategies that cannot be built from their defaults.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    CONTRACT_FAMILIES,
    assert_same_state,
    cached_model,
    char_tokenizer,
    left_padded,
    model_state,
)
from torch import nn
from transformers import LogitsProcessor, StoppingCriteria

from contrastive_decoding import ContrastLogitsProcessor, LayerReadout, score_continuations, strategy_generate
from contrastive_decoding.backends.hf.frontends import generate_function, logits_processor_class
from contrastive_decoding.strategies import (
    StrategyInfo,
    get_strategy,
    make_strategy,
    presets,
    registered_strategies,
    resolve_strategy,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = char_tokenizer()
STEPS = 4
PROMPTS = ["Q: Where is the Eiffel tower? A:", "Who wrote it? A:"]
SPECIAL_IDS = [0, 1, 2, 3]  # <pad>, <s>, </s>, <unk>: kept out of texts scored after generation


def _amateur(family: str) -> nn.Module:
    """A two-layer model of the family with the same vocabulary (a classic-CD amateur)."""
    return cached_model(family, seed=1, num_hidden_layers=2)


# Construction settings only for strategies with required parameters (family -> parameters);
# every other registered strategy (and preset) runs with its defaults.
SETTINGS: dict[str, Callable[[str], dict[str, Any]]] = {
    "cd": lambda family: {"amateur_model": _amateur(family)},
}

# Strategies whose "paper" scoring is the log-softmax of the step scores, not the step scores: their
# step scores are logits (VISTA's mixed logits, DeCo's corrected logits on its candidates, SLED's
# evolved logits) and their paper protocol scores the distribution decoding samples from. Every
# other strategy (the base contract's `score`) scores the raw contrast its `step` gives.
PAPER_SCORE_IS_LOG_SOFTMAX_OF_STEP = {"vista", "deco", "sled"}

CASES = sorted(registered_strategies()) + sorted(presets())


@dataclass
class Case:
    """One registered strategy (or preset) on one tiny model."""

    name: str
    family: str
    model: nn.Module
    info: StrategyInfo
    params: dict[str, Any]  # the preset's parameters and SETTINGS; the rest are the defaults
    extra_models: list[nn.Module] = field(default_factory=list)

    def strategy(self, **overrides: Any):
        return self.info.build(**{**self.params, **overrides})

    @property
    def base(self) -> str:
        return self.info.name

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def states(self) -> list[dict]:
        return [model_state(m) for m in (self.model, *self.extra_models)]

    def assert_restored(self, before: list[dict]) -> None:
        for state, m in zip(before, (self.model, *self.extra_models), strict=True):
            assert_same_state(state, model_state(m))

    def declarations(self) -> dict[str, Any]:
        strategy = self.strategy()
        readout = LayerReadout.from_model(self.model)
        entropy = strategy.entropy_source(readout)
        return {
            "streams": bool(strategy.degraded_streams(readout)),
            "amateur": strategy.amateur_stream(),
            "entropy_all": entropy is not None and entropy.context == "all",
        }

    def needs_tokenizer(self) -> bool:
        decl = self.declarations()
        amateur = decl["amateur"]
        text = amateur is not None and any(isinstance(t, str) for t in (amateur.prefix, amateur.replace))
        return decl["streams"] or text

    def refuses_beam_search(self) -> bool:
        decl = self.declarations()
        return decl["streams"] or decl["amateur"] is not None or decl["entropy_all"]


def _case(name: str, family: str) -> Case:
    if name not in registered_strategies() and name not in presets():
        pytest.skip(f"{name!r} was unregistered after collection")
    base, preset = resolve_strategy(name)
    info = get_strategy(base)
    settings = SETTINGS.get(base, lambda family: {})(family)
    missing = [p.name for p in info.parameters.values() if p.required and p.name not in settings]
    assert not missing, f"strategy {base!r} needs {missing}: give them in SETTINGS of {__name__}"
    params = {**preset, **settings}
    extra = [v for v in params.values() if isinstance(v, nn.Module)]
    return Case(name, family, cached_model(family), info, params, extra)


def _rows() -> list[torch.Tensor]:
    return [torch.tensor(TOKENIZER(text)["input_ids"]) for text in PROMPTS]


def _one_row() -> torch.Tensor:
    return _rows()[0][None]


def _padded() -> dict[str, torch.Tensor]:
    """The prompts as one left-padded batch (rows of different lengths)."""
    ids, mask = left_padded(_rows())
    assert not bool(mask.all())
    return {"input_ids": ids, "attention_mask": mask}


GREEDY = dict(do_sample=False, max_new_tokens=STEPS, pad_token_id=0)
# Every step's scores too (min_new_tokens: no row stops early, so every step has every row).
SCORED = dict(output_scores=True, return_dict_in_generate=True, min_new_tokens=STEPS)


def _assert_same_scores(got, expected) -> None:
    """Per step: the same -inf pattern, and close values elsewhere."""
    assert len(got) == len(expected)
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert torch.equal(torch.isinf(a), torch.isinf(b)), step
        finite = torch.isfinite(a)
        torch.testing.assert_close(a[finite], b[finite], rtol=1e-4, atol=1e-4)


def _processor(case: Case) -> ContrastLogitsProcessor:
    return ContrastLogitsProcessor(case.model, case.strategy(), tokenizer=TOKENIZER)


# Front-ends of generation: (case, inputs, generate kwargs) -> output of model.generate.
def _by_processor(case: Case, inputs: dict, **kwargs):
    with _processor(case) as proc:
        return case.model.generate(**inputs, logits_processor=[proc], **{**GREEDY, **kwargs})


def _by_loop(case: Case, inputs: dict, **kwargs):
    # By its registry name, unless its settings hold a model (cd's amateur): then built.
    strategy = case.strategy() if case.extra_models else case.name
    return case.model.generate(
        **inputs,
        custom_generate=strategy_generate,
        strategy=strategy,
        strategy_tokenizer=TOKENIZER,
        **{**GREEDY, **kwargs},
    )


def _by_derived_processor(case: Case, inputs: dict, **kwargs):
    processor_class = logits_processor_class(case.info.strategy_class)
    with processor_class(case.model, tokenizer=TOKENIZER, **case.params) as proc:
        return case.model.generate(**inputs, logits_processor=[proc], **{**GREEDY, **kwargs})


def _by_derived_loop(case: Case, inputs: dict, **kwargs):
    loop = generate_function(case.info.strategy_class)
    return case.model.generate(
        **inputs, custom_generate=loop, strategy_tokenizer=TOKENIZER, **case.params, **{**GREEDY, **kwargs}
    )


GENERATE = {"processor": _by_processor, "loop": _by_loop}


class Boom(Exception):
    pass


class _BoomAt(StoppingCriteria):
    """Raises at the second decoding step (after the processor or loop has run once)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls >= 2:
            raise Boom
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def _explode_on_forward(model: nn.Module, after: int):
    """A pre-hook on ``model`` raising Boom on forward pass ``after + 1``; returns its handle."""
    calls = {"n": 0}

    def hook(module, args):
        calls["n"] += 1
        if calls["n"] > after:
            raise Boom

    return model.register_forward_pre_hook(hook)


parametrize_cases = pytest.mark.parametrize("name", CASES)
# CONTRACT_FAMILIES (conftest): two families of different make, rotary llama-style attention and
# GPT-2's learned positions, fused Conv1D projections and `transformer.h` blocks.
parametrize_families = pytest.mark.parametrize("family", CONTRACT_FAMILIES)


# ------------------------------------------------------------------------------------------------
# (a) the model is restored exactly


@pytest.fixture
def no_collector():
    """No cyclic garbage collection during the test: a processor used inline must be freed, and so
    detached, by reference counting alone, as soon as nothing references it."""
    enabled = gc.isenabled()
    gc.disable()
    yield
    if enabled:
        gc.enable()


@parametrize_families
@parametrize_cases
@pytest.mark.usefixtures("no_collector")
def test_processor_restores_the_model_after_with_inline_and_exceptions(name, family):
    case = _case(name, family)
    inputs = {"input_ids": _one_row()}
    before = case.states()
    with _processor(case) as proc:
        expected = case.model.generate(**inputs, logits_processor=[proc], **GREEDY)
    case.assert_restored(before)
    with pytest.raises(RuntimeError, match="detached"):
        proc(inputs["input_ids"], torch.zeros(1, case.vocab_size))
    del proc

    # Inline: no `with`; nothing references the processor once generate returns, so it is freed
    # and detaches itself.
    out = case.model.generate(**inputs, logits_processor=[_processor(case)], **GREEDY)
    case.assert_restored(before)
    assert torch.equal(out, expected)

    # An exception inside the block, after the processor ran.
    with pytest.raises(ZeroDivisionError):
        with _processor(case) as proc:
            case.model.generate(**inputs, logits_processor=[proc], **GREEDY)
            raise ZeroDivisionError
    case.assert_restored(before)
    del proc

    # An exception inside generate, in the block (between steps, and inside a forward) and inline.
    with pytest.raises(Boom):
        with _processor(case) as proc:
            case.model.generate(**inputs, logits_processor=[proc], stopping_criteria=[_BoomAt()], **GREEDY)
    case.assert_restored(before)
    handle = _explode_on_forward(case.model, after=2)
    try:
        with pytest.raises(Boom):
            with _processor(case) as proc:
                case.model.generate(**inputs, logits_processor=[proc], **GREEDY)
    finally:
        handle.remove()
    case.assert_restored(before)
    with pytest.raises(RuntimeError, match="detached"):
        proc(inputs["input_ids"], torch.zeros(1, case.vocab_size))
    del proc
    try:
        boom = [_BoomAt()]
        case.model.generate(**inputs, logits_processor=[_processor(case)], stopping_criteria=boom, **GREEDY)
    except Boom:
        pass
    case.assert_restored(before)  # the traceback, which held the processor, went with the except block
    # The model runs as before: a fresh processor gives the same tokens.
    assert torch.equal(_by_processor(case, inputs), expected)


@parametrize_families
@parametrize_cases
def test_loop_restores_the_model_after_a_call_and_exceptions(name, family):
    case = _case(name, family)
    inputs = {"input_ids": _one_row()}
    before = case.states()
    for generate in (_by_loop, _by_derived_loop):
        expected = generate(case, inputs)
        case.assert_restored(before)
        with pytest.raises(Boom):
            generate(case, inputs, stopping_criteria=[_BoomAt()])
        case.assert_restored(before)
        handle = _explode_on_forward(case.model, after=2)
        try:
            with pytest.raises(Boom):
                generate(case, inputs)
        finally:
            handle.remove()
        case.assert_restored(before)
        assert torch.equal(generate(case, inputs), expected)


@parametrize_families
@parametrize_cases
def test_scoring_restores_the_model_after_a_call_and_an_exception(name, family):
    case = _case(name, family)
    before = case.states()
    args = (case.model, TOKENIZER, PROMPTS[0], [" Paris.", " x"])
    expected = score_continuations(*args, strategy=case.strategy())
    case.assert_restored(before)
    for after in (0, 1):  # during the prompt's pass, and during the continuations'
        handle = _explode_on_forward(case.model, after=after)
        try:
            with pytest.raises(Boom):
                score_continuations(*args, strategy=case.strategy())
        finally:
            handle.remove()
        case.assert_restored(before)
    again = score_continuations(*args, strategy=case.strategy())
    assert [s.total for s in again] == [s.total for s in expected]


# ------------------------------------------------------------------------------------------------
# (b) bad arguments are refused before anything is attached


@parametrize_families
@parametrize_cases
def test_bad_values_are_refused_naming_the_parameter_before_attaching(name, family):
    """Every parameter of a numeric or boolean kind refuses a string, naming itself, in every
    front-end; an unknown parameter is refused by name."""
    case = _case(name, family)
    before = case.states()
    processor_class = logits_processor_class(case.info.strategy_class)
    loop = generate_function(case.info.strategy_class)
    for param in case.info.kinds:
        if param in case.params:
            continue
        bad = {param: "not-a-value"}
        with pytest.raises(ValueError, match=f"`{param}`"):
            case.strategy(**bad)
        with pytest.raises(ValueError, match=f"`{param}`"):
            processor_class(case.model, tokenizer=TOKENIZER, **case.params, **bad)
        with pytest.raises(ValueError, match=f"`{param}`"):
            case.model.generate(
                _one_row(), custom_generate=loop, strategy_tokenizer=TOKENIZER, **case.params, **bad, **GREEDY
            )
        case.assert_restored(before)
    with pytest.raises(TypeError, match="no_such_parameter"):
        make_strategy(case.base, no_such_parameter=1)
    case.assert_restored(before)


@parametrize_families
@parametrize_cases
def test_settings_the_model_rules_out_are_refused_before_attaching(name, family):
    """``min_tokens_to_keep`` beyond the model's vocabulary (where the strategy has a plausibility
    filter) is refused when the strategy meets the model, by the processor, the loop and scoring,
    with the model left as it was."""
    case = _case(name, family)
    if "min_tokens_to_keep" not in case.info.parameters or case.strategy().relative_top is None:
        pytest.skip(f"{name} has no plausibility filter with `min_tokens_to_keep`")
    strategy = case.strategy(min_tokens_to_keep=case.vocab_size + 1)  # valid until it meets a model
    before = case.states()
    with pytest.raises(ValueError, match="min_tokens_to_keep"):
        ContrastLogitsProcessor(case.model, strategy, tokenizer=TOKENIZER)
    case.assert_restored(before)
    with pytest.raises(ValueError, match="min_tokens_to_keep"):
        loop = dict(custom_generate=strategy_generate, strategy=strategy, strategy_tokenizer=TOKENIZER)
        case.model.generate(_one_row(), **loop, **GREEDY)
    case.assert_restored(before)
    with pytest.raises(ValueError, match="min_tokens_to_keep"):
        score_continuations(case.model, TOKENIZER, PROMPTS[0], [" x"], strategy=strategy)
    case.assert_restored(before)


@parametrize_families
@parametrize_cases
def test_a_missing_tokenizer_is_refused_before_attaching(name, family):
    """A strategy whose declarations need the tokenizer (degraded streams' token classes, an
    amateur instruction given as text) refuses to attach without it; any other attaches."""
    case = _case(name, family)
    before = case.states()
    if not case.needs_tokenizer():
        ContrastLogitsProcessor(case.model, case.strategy()).detach()
        case.assert_restored(before)
        return
    with pytest.raises(ValueError, match="tokenizer"):
        ContrastLogitsProcessor(case.model, case.strategy())
    case.assert_restored(before)
    with pytest.raises(ValueError, match="tokenizer"):
        case.model.generate(_one_row(), custom_generate=strategy_generate, strategy=case.strategy(), **GREEDY)
    case.assert_restored(before)


# ------------------------------------------------------------------------------------------------
# (c) the processor in stock generate is the custom generate loop


@parametrize_families
@parametrize_cases
def test_processor_and_loops_give_the_same_tokens_and_scores(name, family):
    case = _case(name, family)
    inputs = {"input_ids": _one_row()}
    processor = _by_processor(case, inputs, **SCORED)
    loop = _by_loop(case, inputs, **SCORED)
    assert processor.sequences.tolist() == loop.sequences.tolist()
    _assert_same_scores(processor.scores, loop.scores)
    # The front-ends derived from the class's declaration take the same parameters.
    assert _by_derived_processor(case, inputs).tolist() == processor.sequences.tolist()
    assert _by_derived_loop(case, inputs).tolist() == processor.sequences.tolist()


# ------------------------------------------------------------------------------------------------
# (d) a left-padded batch is each row alone; (e) no cache is the cache


parametrize_frontends = pytest.mark.parametrize("frontend", list(GENERATE))


@parametrize_families
@parametrize_cases
@parametrize_frontends
def test_left_padded_batch_equals_each_row_alone(name, family, frontend):
    case, generate = _case(name, family), GENERATE[frontend]
    rows, inputs = _rows(), _padded()
    width = inputs["input_ids"].shape[1]
    batched = generate(case, inputs, **SCORED)
    for i, row in enumerate(rows):
        alone = generate(case, {"input_ids": row[None]}, **SCORED)
        assert batched.sequences[i, width:].tolist() == alone.sequences[0, len(row) :].tolist(), i
        _assert_same_scores([s[i : i + 1] for s in batched.scores], alone.scores)


@parametrize_families
@parametrize_cases
@parametrize_frontends
def test_uncached_equals_cached(name, family, frontend):
    case, generate = _case(name, family), GENERATE[frontend]
    inputs = _padded()
    cached = generate(case, inputs, use_cache=True, **SCORED)
    uncached = generate(case, inputs, use_cache=False, **SCORED)
    assert cached.sequences.tolist() == uncached.sequences.tolist()
    _assert_same_scores(cached.scores, uncached.scores)


# ------------------------------------------------------------------------------------------------
# (f) scoring is the step scores


class _Recorder(LogitsProcessor):
    """Records what ``processor`` returns at each step, then keeps special tokens from being
    chosen (so the generated text round-trips through the tokenizer)."""

    def __init__(self, processor):
        self.processor = processor
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        out = self.processor(input_ids, scores)
        self.steps.append(out.clone())
        out = out.clone()
        out[:, SPECIAL_IDS] = -torch.inf
        return out


def _text(ids: list[int]) -> str:
    """The character tokenizer's text of non-special ids (id 4 is " ")."""
    return "".join(chr(32 + i - 4) for i in ids)


@parametrize_families
@parametrize_cases
def test_paper_scores_equal_the_processor_step_scores(name, family):
    """Generate greedily with the processor, recording its step scores; scoring the generated
    continuation under "paper" gives each token the step score the processor gave it there."""
    case = _case(name, family)
    prompt_ids = _one_row()
    with _processor(case) as proc:
        recorder = _Recorder(proc)
        out = case.model.generate(input_ids=prompt_ids, logits_processor=[recorder], **GREEDY)
    generated = out[0, prompt_ids.shape[1] :].tolist()
    assert len(generated) == STEPS and not set(generated) & set(SPECIAL_IDS)
    [score] = score_continuations(
        case.model, TOKENIZER, PROMPTS[0], [_text(generated)], strategy=case.strategy(), protocol="paper"
    )
    assert score.token_ids == generated
    compared = 0
    for k, (token, step) in enumerate(zip(generated, recorder.steps, strict=True)):
        if case.base in PAPER_SCORE_IS_LOG_SOFTMAX_OF_STEP:
            step = F.log_softmax(step.double(), dim=-1)
        expected = step[0, token]
        if not torch.isfinite(expected):
            # Only where the plausibility filter left no ordinary token: the paper protocol has no
            # filter, so the score is the raw contrast there.
            continue
        torch.testing.assert_close(score.token_scores[k].double(), expected.double(), rtol=1e-4, atol=1e-4)
        compared += 1
    assert compared >= STEPS - 1


# ------------------------------------------------------------------------------------------------
# Beam search, where the strategy supports it


@parametrize_families
@parametrize_cases
def test_beam_search_keeps_the_contract_or_is_refused(name, family):
    case = _case(name, family)
    before = case.states()
    beams = dict(num_beams=2, min_new_tokens=STEPS)
    # The generate loop does greedy search and sampling only, for every strategy.
    with pytest.raises(ValueError, match="num_beams=2"):
        _by_loop(case, {"input_ids": _one_row()}, **beams)
    case.assert_restored(before)
    if case.refuses_beam_search():
        # Refused once beam search reorders the rows (enough beams and steps that it must).
        with pytest.raises(RuntimeError, match="beam search"):
            _by_processor(case, {"input_ids": _one_row()}, num_beams=4, max_new_tokens=2 * STEPS)
        case.assert_restored(before)
        return
    rows, inputs = _rows(), _padded()
    width = inputs["input_ids"].shape[1]
    batched = _by_processor(case, inputs, **beams)
    case.assert_restored(before)
    assert _by_processor(case, inputs, use_cache=False, **beams).tolist() == batched.tolist()
    for i, row in enumerate(rows):
        alone = _by_processor(case, {"input_ids": row[None]}, **beams)
        assert batched[i, width:].tolist() == alone[0, len(row) :].tolist(), i
    case.assert_restored(before)
