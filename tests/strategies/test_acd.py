"""ACD (auto-contrastive decoding) against hand-written references, on every tiny family.

References use the model's own uncached forward with ``output_hidden_states=True``, the logit lens
``early_exit(model, hidden_states[j], final_norm)`` and ACD's formula written out in float64 in
probability space, as the authors' ``calculate_contrasted_logits`` does (spec §4, ACD bullet):
inside the head set ``V_h = {p_u >= 0.1 * max p_u}``, ``p = softmax_{V_h}(log p_u - log p_l) *
sum_{V_h} p_u``; outside it ``p = p_u``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import (
    assert_refused_before_attaching,
    assert_scores_match_reference,
    greedy_processor_generate,
    processor_step,
    prompt_ids,
    reference_greedy,
)
from reference_impl import early_exit

from contrastive_decoding.backends.hf.named import AutoContrastiveLogitsProcessor
from contrastive_decoding.strategies.acd import AutoContrastive

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 5
MIDDLE = 3  # N // 2 for the six-layer tiny models


def _reference_acd(final: torch.Tensor, amateur: torch.Tensor, alpha: float = 0.1):
    """(log p, head mask, p_u) for ``(..., V)`` expert and amateur logits, float64."""
    p_u = torch.softmax(final.double(), -1)
    p_l = torch.softmax(amateur.double(), -1)
    head = p_u >= alpha * p_u.max(-1, keepdim=True).values
    contrast = torch.where(head, p_u.log() - p_l.log(), -torch.inf)
    inside = torch.softmax(contrast, -1) * torch.where(head, p_u, 0.0).sum(-1, keepdim=True)
    return torch.where(head, inside, p_u).log(), head, p_u


@torch.no_grad()
def _reference_step(model, ids, layer=MIDDLE, final_norm=True, alpha=0.1):
    out = model(ids, output_hidden_states=True, use_cache=False)
    amateur = early_exit(model, out.hidden_states[layer][:, -1], final_norm)
    return _reference_acd(out.logits[:, -1], amateur, alpha)


def _processor_step(model, ids, **kwargs):
    return processor_step(AutoContrastiveLogitsProcessor, model, ids, **kwargs)


def test_layer_resolution_and_repr():
    readout = SimpleNamespace(num_layers=24)
    assert AutoContrastive().premature_layers(readout) == [12]  # the paper's GPT-2 Medium 24 vs 12
    assert AutoContrastive(layer=0.5).premature_layers(readout) == [12]
    assert AutoContrastive(layer=0.25).premature_layers(readout) == [6]
    assert AutoContrastive(layer=1.0).premature_layers(readout) == [23]
    assert AutoContrastive(layer=7).premature_layers(readout) == [7]
    assert AutoContrastive().premature_layers(SimpleNamespace(num_layers=7)) == [3]
    acd = AutoContrastive()
    assert acd.final_norm is True and acd.relative_top == 0.1
    assert "relative_top=0.1" in repr(acd) and "final_norm=True" in repr(acd)


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(layer=1, final_norm=False), dict(layer=0.7, relative_top=0.3)],
    ids=["default", "raw-layer1", "frac0.7-alpha0.3"],
)
def test_step_scores_match_reference(tiny_model, kwargs):
    ids = prompt_ids(batch=2)
    layer = {None: MIDDLE, 1: 1, 0.7: 4}[kwargs.get("layer")]  # round(0.7 * 6) = 4
    proc, out = _processor_step(tiny_model, ids, **kwargs)
    assert proc.layers == [layer]
    assert proc.chosen_layers.numel() == 0
    expected, head, p_u = _reference_step(
        tiny_model, ids, layer, kwargs.get("final_norm", True), kwargs.get("relative_top", 0.1)
    )
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    _check_distribution(out, head, p_u)


def _check_distribution(out, head, p_u):
    """A normalised distribution that keeps the expert's mass, on V_h and off it."""
    p = out.double().exp()
    torch.testing.assert_close(p.sum(-1), torch.ones_like(p[:, 0]), rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.where(head, 0.0, p), torch.where(head, 0.0, p_u), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close((p * head).sum(-1), (p_u * head).sum(-1), rtol=1e-5, atol=1e-6)


def test_outside_head_set_keeps_the_expert(tiny_model):
    # The tiny models' distributions are flat (alpha=0.1 keeps most tokens); a threshold at the
    # median's relative probability leaves tokens on both sides of V_h in every row.
    ids = prompt_ids(batch=2)
    _, _, p_u = _reference_step(tiny_model, ids)
    alpha = float((p_u.median(-1).values / p_u.max(-1).values).max())
    _, out = _processor_step(tiny_model, ids, relative_top=alpha)
    expected, head, p_u = _reference_step(tiny_model, ids, alpha=alpha)
    assert bool(head.any(-1).all()) and bool((~head).any(-1).all())
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.double()[~head], p_u.log()[~head], rtol=1e-5, atol=1e-5)
    _check_distribution(out, head, p_u)
    # Inside V_h the ranking follows the contrast, not the expert: the scores differ there.
    assert not torch.allclose(out.double()[head], p_u.log()[head], atol=1e-4)


def test_final_norm_default_applies_the_norm(tiny_model):
    ids = prompt_ids()
    _, out = _processor_step(tiny_model, ids)
    raw, _, _ = _reference_step(tiny_model, ids, final_norm=False)
    assert not torch.allclose(out.double(), raw, atol=1e-3)


def test_single_token_head_set_is_the_expert(tiny_model):
    # relative_top=1 keeps only the top token in V_h: its mass is its own, so p = p_u everywhere.
    ids = prompt_ids()
    _, out = _processor_step(tiny_model, ids, relative_top=1.0)
    with torch.no_grad():
        expert = torch.log_softmax(tiny_model(ids).logits[:, -1].float(), -1)
    torch.testing.assert_close(out, expert, rtol=1e-5, atol=1e-5)


def test_greedy_generate_equals_uncached_loop(tiny_model):
    ids = prompt_ids(batch=2)
    with AutoContrastiveLogitsProcessor(tiny_model) as proc:
        out = greedy_processor_generate(tiny_model, proc, ids, STEPS)
    assert torch.equal(out, reference_greedy(lambda seq: _reference_step(tiny_model, seq)[0], ids, STEPS))


@pytest.mark.parametrize("protocol", ["paper", "normalized"])
def test_score_continuations_equals_reference(tiny_model, protocol):
    def reference(full, pos, targets):
        out = tiny_model(torch.tensor([full]), output_hidden_states=True)
        amateur = early_exit(tiny_model, out.hidden_states[2][0, pos], True)
        log_p, _, _ = _reference_acd(out.logits[0, pos], amateur)
        return log_p.gather(-1, targets[:, None]).squeeze(-1)

    assert_scores_match_reference(tiny_model, AutoContrastive(layer=2), reference, protocol)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(layer=6), "`layer` has layer 6, outside 0\\.\\.5"),
        (dict(layer=-1), "`layer` has layer -1"),
        (dict(layer=1.5), "`layer` as a fraction of depth must be in \\[0, 1\\]"),
        (dict(layer="middle"), "`layer` must be None"),
        (dict(layer=True), "`layer` must be None"),
        (dict(relative_top=0.0), "`relative_top` must be in \\(0, 1\\]"),
        (dict(relative_top=2.0), "`relative_top` must be in \\(0, 1\\]"),
        (dict(final_norm=None), "`final_norm` must be True or False"),
        (dict(min_tokens_to_keep=0), "`min_tokens_to_keep`"),
    ],
)
def test_bad_arguments_raise_before_any_hook(tiny_model, kwargs, fragment):
    assert_refused_before_attaching(tiny_model, AutoContrastiveLogitsProcessor, kwargs, fragment)
