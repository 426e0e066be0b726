"""A processor's hooks and attention swap live exactly as long as it is attached.

Used inline (``logits_processor=[DoLaLogitsProcessor(model)]``, no ``with``), every processor type
leaves the model exactly as a fresh one once ``generate`` has returned, gives the tokens of the
``with`` form, and lets any later processor attach. Processors that change the model's forward
passes refuse, with a clear error and before attaching anything, to share it with another. (Each
registered strategy's processor restored after a ``with`` block, inline use and exceptions: the
shared tester, ``tests/backends/hf/test_strategy_contract.py``.)
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import pytest
import torch
from conftest import (
    FAMILIES,
    assert_same_state,
    cached_model,
    char_tokenizer,
    model_state,
    prompt_ids,
)

from contrastive_decoding import (
    SLED,
    ActivationDecoding,
    AutoContrastiveLogitsProcessor,
    ContrastiveDecoding,
    ContrastLogitsProcessor,
    DeCoLogitsProcessor,
    DoLa,
    DoLaLogitsProcessor,
    InducedContrast,
    LayerCakeLogitsProcessor,
    LowerLayerFusion,
    SLEDLogitsProcessor,
    VistaLogitsProcessor,
    WeightedContrast,
    score_continuations,
)
from contrastive_decoding.backends.hf.suppression import _ACTIVE

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = char_tokenizer()
STEPS = 4


def _amateur():
    return cached_model("llama", seed=1, num_hidden_layers=2)


# name -> (model, tokenizer) -> a processor; every processor type the library offers.
PROCESSORS: dict[str, Callable] = {
    "DoLaLogitsProcessor": lambda m, t: DoLaLogitsProcessor(m, "high"),
    "SLEDLogitsProcessor": lambda m, t: SLEDLogitsProcessor(m),
    "AutoContrastiveLogitsProcessor": lambda m, t: AutoContrastiveLogitsProcessor(m, layer=2),
    "DeCoLogitsProcessor": lambda m, t: DeCoLogitsProcessor(m),
    "VistaLogitsProcessor": lambda m, t: VistaLogitsProcessor(m),
    "LayerCakeLogitsProcessor": lambda m, t: LayerCakeLogitsProcessor(m, t),
    "LowerLayerFusion": lambda m, t: ContrastLogitsProcessor(m, LowerLayerFusion(), tokenizer=t),
    "InducedContrast": lambda m, t: ContrastLogitsProcessor(m, InducedContrast(), tokenizer=t),
    "ContrastiveDecoding": lambda m, t: ContrastLogitsProcessor(
        m, ContrastiveDecoding(_amateur()), tokenizer=t
    ),
    "ActivationDecoding": lambda m, t: ContrastLogitsProcessor(m, ActivationDecoding(), tokenizer=t),
    "WeightedContrast": lambda m, t: ContrastLogitsProcessor(
        m, WeightedContrast([(1.0, DoLa("high")), (0.5, SLED())]), tokenizer=t
    ),
}
# Processors that change every forward of the model (degraded streams) or run extra forwards
# through it (an amateur of the same model): they may not share the model with another.
EXCLUSIVE = {"LayerCakeLogitsProcessor", "LowerLayerFusion", "InducedContrast"}


def _generate(model, processor, batch: int = 1, steps: int = STEPS) -> torch.Tensor:
    return model.generate(
        prompt_ids(batch=batch),
        attention_mask=torch.ones(batch, 7, dtype=torch.long),
        logits_processor=[processor],
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
    )


def _suppressed_modules(model) -> list[str]:
    return [name for name, module in model.named_modules() if module in _ACTIVE]


def _with_form(model, name: str, batch: int = 1) -> torch.Tensor:
    with PROCESSORS[name](model, TOKENIZER) as proc:
        return _generate(model, proc, batch)


@pytest.mark.parametrize("name", list(PROCESSORS))
def test_twenty_inline_calls_leave_no_trace_and_match_the_with_form(name):
    model = cached_model("llama")
    fresh = model_state(model)
    expected = _with_form(model, name)
    assert_same_state(fresh, model_state(model))
    for _ in range(20):
        out = _generate(model, PROCESSORS[name](model, TOKENIZER))
        assert torch.equal(out, expected)
    assert_same_state(fresh, model_state(model))
    assert _suppressed_modules(model) == []
    # The plain model after them is the plain model: same logits as before any processor.
    ids = prompt_ids()
    assert torch.equal(model(ids).logits, cached_model("llama")(ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", ["DoLaLogitsProcessor", "LayerCakeLogitsProcessor"])
def test_inline_layer_and_stream_processors_on_every_family(family, name):
    model = cached_model(family)
    fresh = model_state(model)
    expected = _with_form(model, name, batch=2)
    for _ in range(2):
        out = _generate(model, PROCESSORS[name](model, TOKENIZER), batch=2)
        assert torch.equal(out, expected)
    assert_same_state(fresh, model_state(model))


def test_every_processor_type_attaches_after_inline_use_of_every_other():
    model = cached_model("llama")
    fresh = model_state(model)
    expected = {name: _with_form(model, name) for name in PROCESSORS}
    names = list(PROCESSORS)
    # Processors are built outside `assert`: pytest's rewriting would keep them referenced.
    for first in names:
        _generate(model, PROCESSORS[first](model, TOKENIZER))
        for then in names:
            out = _generate(model, PROCESSORS[then](model, TOKENIZER))
            assert torch.equal(out, expected[then]), (first, then)
    assert_same_state(fresh, model_state(model))


@pytest.mark.parametrize("name", sorted(EXCLUSIVE))
@pytest.mark.parametrize("held", ["DoLaLogitsProcessor", "LayerCakeLogitsProcessor"])
def test_a_processor_that_changes_the_forward_refuses_to_share_the_model(name, held):
    model = cached_model("llama")
    fresh = model_state(model)
    holder = PROCESSORS[held](model, TOKENIZER)
    attached = model_state(model)
    with pytest.raises(ValueError, match="`model` already has .* attached.*detach"):
        PROCESSORS[name](model, TOKENIZER)
    assert_same_state(attached, model_state(model))
    # The reverse order is refused too.
    holder.detach()
    assert_same_state(fresh, model_state(model))
    with PROCESSORS[name](model, TOKENIZER):
        with pytest.raises(ValueError, match="cannot share it"):
            PROCESSORS[held](model, TOKENIZER)
    assert_same_state(fresh, model_state(model))


def test_scoring_beside_a_held_stream_processor_is_refused_with_the_fix():
    model = cached_model("llama")
    fresh = model_state(model)
    args = (model, TOKENIZER, "Q: Why? A:", [" yes", " no"])
    with LayerCakeLogitsProcessor(model, TOKENIZER):
        with pytest.raises(ValueError, match=r"processor\.detach\(\)"):
            score_continuations(*args, strategy=DoLa("high"))
    assert_same_state(fresh, model_state(model))
    alone = score_continuations(*args, strategy=DoLa("high"))
    with DoLaLogitsProcessor(model, "high"):  # layer exits only record: sharing is fine
        beside = score_continuations(*args, strategy=DoLa("high"))
    assert [s.total for s in beside] == [s.total for s in alone]


def test_two_held_layer_processors_share_the_model():
    model = cached_model("llama")
    fresh = model_state(model)
    first, second = DoLaLogitsProcessor(model, "high"), DoLaLogitsProcessor(model, "low")
    # While both are attached, each gives the tokens it gives alone.
    assert torch.equal(_generate(model, first), _with_form(model, "DoLaLogitsProcessor"))
    first.detach()
    with DoLaLogitsProcessor(model, "low") as alone:
        expected_low = _generate(model, alone)
    assert torch.equal(_generate(model, second), expected_low)
    second.detach()
    second.detach()  # a second detach does nothing
    assert_same_state(fresh, model_state(model))


def test_an_unreferenced_processor_is_detached_without_a_collector_run():
    model = cached_model("llama")
    fresh = model_state(model)
    gc.disable()
    try:
        _generate(model, LayerCakeLogitsProcessor(model, TOKENIZER))
        assert_same_state(fresh, model_state(model))
    finally:
        gc.enable()


@pytest.mark.parametrize(
    "name", ["DoLaLogitsProcessor", "DeCoLogitsProcessor", "AutoContrastiveLogitsProcessor"]
)
def test_chosen_layers_after_reuse_at_any_batch_size(name):
    model = cached_model("llama")
    proc = PROCESSORS[name](model, TOKENIZER)
    for batch, steps in [(1, 3), (3, 2), (2, 4), (2, 4)]:
        _generate(model, proc, batch=batch, steps=steps)
        history = proc.chosen_layers
        with PROCESSORS[name](model, TOKENIZER) as fresh:
            _generate(model, fresh, batch=batch, steps=steps)
            expected = fresh.chosen_layers
        if name == "AutoContrastiveLogitsProcessor":  # ACD has one amateur layer, no choice
            assert history.shape == expected.shape == (0, 0)
        else:
            assert history.shape == (steps, batch)
            assert torch.equal(history, expected)
    proc.reset()
    assert proc.chosen_layers.shape == (0, 0)
    proc.detach()
