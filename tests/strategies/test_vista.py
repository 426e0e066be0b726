"""VISTA's self-logits augmentation against hand-written references, on every tiny family.

References use the model's own uncached forward with ``output_hidden_states=True``, the logit lens
``early_exit(model, hidden_states[j], final_norm)`` and the mixing formula written out in float64:
``0.3 * mean_j(l_j) + 0.7 * l_N`` (spec §4, VISTA bullet).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import (
    assert_refused_before_attaching,
    assert_scores_match_reference,
    greedy_processor_generate,
    prompt_ids,
    reference_greedy,
)
from reference_impl import early_exit

from contrastive_decoding.backends.hf.named import VistaLogitsProcessor
from contrastive_decoding.strategies.vista import VISTA_LATE_LAYERS, VistaLogits

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 5


@torch.no_grad()
def _reference_mixed(model, ids, layers, weight=0.3, final_norm=False):
    """Mixed logits at the last position of each row of ``ids``, float64, ``(B, V)``."""
    out = model(ids, output_hidden_states=True, use_cache=False)
    final = out.logits[:, -1].double()
    exits = [early_exit(model, out.hidden_states[j][:, -1], final_norm).double() for j in layers]
    late = sum(exits) / len(exits)
    return weight * late + (1.0 - weight) * final


def test_default_band_resolves_like_vista():
    # Layers 25-30 of 32 on a 32-layer model; the band scales with depth (6 layers: block 5 only).
    vista = VistaLogits()
    assert vista.late_layers == list(VISTA_LATE_LAYERS)
    assert vista.premature_layers(SimpleNamespace(num_layers=32)) == [25, 26, 27, 28, 29, 30]
    assert vista.premature_layers(SimpleNamespace(num_layers=6)) == [5]
    assert VistaLogits(late_layers=[1, 3]).premature_layers(SimpleNamespace(num_layers=6)) == [1, 3]
    assert "weight_late=0.3" in repr(vista) and "final_norm=False" in repr(vista)


@pytest.mark.parametrize(
    ("kwargs", "layers"),
    [
        (dict(), [5]),
        (dict(late_layers=(0.3, 0.8), weight_late=0.5), [2, 3, 4, 5]),
        (dict(late_layers=[1, 4], final_norm=True), [1, 4]),
    ],
)
def test_step_scores_match_reference(tiny_model, kwargs, layers):
    ids = prompt_ids(batch=2)
    weight = kwargs.get("weight_late", 0.3)
    expected = _reference_mixed(tiny_model, ids, layers, weight, kwargs.get("final_norm", False))
    with VistaLogitsProcessor(tiny_model, **kwargs) as proc:
        assert proc.layers == layers
        with torch.no_grad():
            scores = tiny_model(ids).logits[:, -1].float()
        out = proc(ids, scores)
    assert proc.chosen_layers.numel() == 0  # an interpolation: no layer choice
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    if kwargs.get("final_norm"):  # the norm is really applied (the reference differs without it)
        assert not torch.allclose(out.double(), _reference_mixed(tiny_model, ids, layers), atol=1e-3)


def test_zero_weight_is_the_model_itself(tiny_model):
    ids = prompt_ids()
    with torch.no_grad():
        scores = tiny_model(ids).logits[:, -1].float()
    with VistaLogitsProcessor(tiny_model, weight_late=0.0) as proc:
        tiny_model(ids)
        out = proc(ids, scores)
    torch.testing.assert_close(out, scores)


def test_greedy_generate_equals_uncached_loop(tiny_model):
    ids = prompt_ids(batch=2)
    with VistaLogitsProcessor(tiny_model) as proc:
        out = greedy_processor_generate(tiny_model, proc, ids, STEPS)
    assert torch.equal(out, reference_greedy(lambda seq: _reference_mixed(tiny_model, seq, [5]), ids, STEPS))


@pytest.mark.parametrize("protocol", ["paper", "normalized"])
def test_score_continuations_equals_reference(tiny_model, protocol):
    def reference(full, pos, targets):
        out = tiny_model(torch.tensor([full]), output_hidden_states=True)
        exits = [early_exit(tiny_model, out.hidden_states[j][0, pos]).double() for j in (2, 4)]
        mixed = 0.3 * (exits[0] + exits[1]) / 2 + 0.7 * out.logits[0, pos].double()
        return torch.log_softmax(mixed, -1).gather(-1, targets[:, None]).squeeze(-1)

    assert_scores_match_reference(tiny_model, VistaLogits(late_layers=[2, 4]), reference, protocol)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(weight_late=1.5), "`weight_late` must be in \\[0, 1\\]"),
        (dict(weight_late=-0.1), "`weight_late` must be in \\[0, 1\\]"),
        (dict(weight_late="0.3"), "`weight_late` must be a finite number"),
        (dict(late_layers=[]), "`late_layers` is empty"),
        (dict(late_layers="late"), "`late_layers` must be a list"),
        (dict(late_layers=(0.9, 0.2)), "`late_layers`=.*0 <= start <= end <= 1"),
        (dict(late_layers=(0.1, 0.5, 0.9)), "`late_layers`=.*pair"),
        (dict(late_layers=[1, 6]), "`late_layers` has layer 6, outside 0\\.\\.5"),
        (dict(late_layers=[-1]), "`late_layers` has layer -1"),
        (dict(final_norm="yes"), "`final_norm` must be True or False"),
    ],
)
def test_bad_arguments_raise_before_any_hook(tiny_model, kwargs, fragment):
    assert_refused_before_attaching(tiny_model, VistaLogitsProcessor, kwargs, fragment)
