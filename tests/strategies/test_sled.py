"""SLED (self logits evolution decoding) against hand-written references, on every tiny family.

References use the model's own uncached forward with ``output_hidden_states=True``, the logit lens
``early_exit(model, hidden_states[n], final_norm)`` for every layer ``n = 0..N-1`` and SLED's formula
written out in float64 with explicit loops over rows, layers and candidates, as the authors'
``lm_score`` (mode "SLED") computes it (spec §4, SLED bullet): candidates = top-k of q_N;
``m_{n,i} = max(0, cos(softmax(l_n) - e_i, l_n - l_N))^2``; per-layer normalisation and layer
weights; ``P = sum_n s_n m_hat_n``; 10 steps ``l <- l - eta_t (softmax(l) - P)`` over the whole
vocabulary from ``l_N``; non-candidates at the lower bound.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import (
    VOCAB,
    assert_refused_before_attaching,
    assert_scores_match_reference,
    greedy_processor_generate,
    processor_step,
    prompt_ids,
    reference_greedy,
)
from reference_impl import early_exit

from contrastive_decoding import ContrastInputs
from contrastive_decoding.backends.hf.named import SLEDLogitsProcessor
from contrastive_decoding.strategies.sled import SLED

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4
LAYERS = 6


def _inputs(final: torch.Tensor, layer_logits: torch.Tensor) -> ContrastInputs:
    """A step's inputs from given logits, ``(R, V)`` and ``(J, R, V)``."""
    return ContrastInputs(final=final, layer_logits=layer_logits)


def _reference_row(final, layers, scale=75, rate=2.5, lower=-100.0, steps=10):
    """Evolved logits ``(V,)`` and the candidate ids for one row; loops over layers and candidates."""
    final = final.double()
    vocab = final.shape[0]
    cands = torch.topk(torch.softmax(final, -1), min(scale, vocab)).indices.tolist()
    m = []  # m[n][i]
    for layer in layers:
        layer = layer.double()
        probs = torch.softmax(layer, -1)
        diff = layer - final
        row = []
        for c in cands:
            grad = probs.clone()
            grad[c] -= 1.0
            cos = float((grad * diff).sum()) / (float(grad.norm()) * float(diff.norm()))
            row.append(max(cos, 0.0) ** 2)
        m.append(row)
    sums = [sum(row) for row in m]
    total = sum(sums)
    weights = [s / total for s in sums] if total != 0 else sums
    latent = torch.zeros(vocab, dtype=torch.float64)
    for n, row in enumerate(m):
        for i, c in enumerate(cands):
            m_hat = row[i] / sums[n] if sums[n] != 0 else 0.0
            latent[c] += weights[n] * m_hat
    logits = final.clone()
    for t in range(steps):
        logits = logits - rate * (1 - t / steps) * (torch.softmax(logits, -1) - latent)
    out = torch.full_like(logits, lower)
    out[cands] = logits[cands]
    return out, cands, latent


def _reference_logits(final, layer_logits, **kwargs):
    """``(R, V)`` evolved logits and ``(R, V)`` candidate mask from ``(R, V)``, ``(J, R, V)``."""
    rows, masks = [], []
    for r in range(final.shape[0]):
        out, cands, _ = _reference_row(
            final[r], [layer_logits[j, r] for j in range(len(layer_logits))], **kwargs
        )
        mask = torch.zeros(final.shape[-1], dtype=torch.bool)
        mask[cands] = True
        rows.append(out)
        masks.append(mask)
    return torch.stack(rows), torch.stack(masks)


@torch.no_grad()
def _exits(model, ids, positions, layers=range(LAYERS), final_norm=False):
    """Mature logits ``(R, V)`` and early exits ``(J, R, V)`` at ``positions`` of row 0, or last."""
    out = model(ids, output_hidden_states=True, use_cache=False)
    if positions is None:
        final = out.logits[:, -1]
        exits = [early_exit(model, out.hidden_states[j][:, -1], final_norm) for j in layers]
    else:
        final = out.logits[0, positions]
        exits = [early_exit(model, out.hidden_states[j][0, positions], final_norm) for j in layers]
    return final, torch.stack(exits)


def _reference_step(model, ids, layers=range(LAYERS), final_norm=False, **kwargs):
    final, exits = _exits(model, ids, None, layers, final_norm)
    return _reference_logits(final, exits, **kwargs)


def _processor_step(model, ids, **kwargs):
    return processor_step(SLEDLogitsProcessor, model, ids, **kwargs)


def test_defaults_layers_and_repr():
    sled = SLED()
    assert sled.evolution_rate == 2.5 and sled.evolution_scale == 75
    assert sled.evolution_lower_bound == -100.0 and sled.evolution_steps == 10
    assert sled.final_norm is False and sled.post_softmax is True
    assert sled.premature_layers(SimpleNamespace(num_layers=32)) == list(range(32))
    assert SLED(layers=[0, 3]).premature_layers(SimpleNamespace(num_layers=6)) == [0, 3]
    assert SLED(layers=(0.5, 1.0)).premature_layers(SimpleNamespace(num_layers=6)) == [3, 4, 5]
    assert "evolution_scale=75" in repr(sled) and "final_norm=False" in repr(sled)


def test_latent_on_random_logits_matches_reference():
    g = torch.Generator().manual_seed(0)
    final, layers = torch.randn(3, 40, generator=g) * 3, torch.randn(5, 3, 40, generator=g) * 3
    for kwargs in (dict(scale=7, rate=2.5), dict(scale=40, rate=1.0, steps=3), dict(scale=80, lower=-7.0)):
        sled = SLED(
            evolution_scale=kwargs["scale"],
            evolution_rate=kwargs.get("rate", 2.5),
            evolution_steps=kwargs.get("steps", 10),
            evolution_lower_bound=kwargs.get("lower", -100.0),
        )
        out = sled.step(_inputs(final, layers))
        assert out.chosen is None
        expected, mask = _reference_logits(final, layers, **kwargs)
        torch.testing.assert_close(out.scores.double(), expected, rtol=1e-5, atol=1e-5)
        assert int(mask.sum(-1)[0]) == min(kwargs["scale"], 40)
    _, _, latent = _reference_row(final[0], list(layers[:, 0]), scale=7)
    assert latent.sum().item() == pytest.approx(1.0)


def test_zero_rate_keeps_the_final_logits_on_candidates():
    g = torch.Generator().manual_seed(1)
    final, layers = torch.randn(2, 30, generator=g), torch.randn(3, 2, 30, generator=g)
    out = SLED(evolution_rate=0.0, evolution_scale=5).step(_inputs(final, layers)).scores
    top = final.topk(5).indices
    torch.testing.assert_close(out.gather(-1, top), final.gather(-1, top))
    assert int((out == -100.0).sum()) == 2 * 25


def test_inputs_not_edited():
    final, layers = torch.randn(2, 30), torch.randn(3, 2, 30)
    f0, l0 = final.clone(), layers.clone()
    SLED(evolution_scale=5).step(_inputs(final, layers))
    assert torch.equal(final, f0) and torch.equal(layers, l0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(evolution_scale=10, evolution_rate=1.0, layers=[1, 4]),
        dict(final_norm=True, evolution_steps=3),
    ],
    ids=["default", "k10-rate1-layers14", "norm-T3"],
)
def test_step_scores_match_reference(tiny_model, kwargs):
    ids = prompt_ids(batch=2)
    layers = kwargs.get("layers", list(range(LAYERS)))
    proc, out = _processor_step(tiny_model, ids, **kwargs)
    assert proc.layers == layers
    assert proc.chosen_layers.numel() == 0
    expected, mask = _reference_step(
        tiny_model,
        ids,
        layers,
        kwargs.get("final_norm", False),
        scale=kwargs.get("evolution_scale", 75),
        rate=kwargs.get("evolution_rate", 2.5),
        steps=kwargs.get("evolution_steps", 10),
    )
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(out > -100.0, mask)
    # The evolution moves the candidates' logits: not the model's own logits.
    with torch.no_grad():
        own = tiny_model(ids).logits[:, -1].double()
    assert not torch.allclose(out.double()[mask], own[mask], atol=1e-3)


def test_greedy_generate_equals_uncached_loop(tiny_model):
    ids = prompt_ids(batch=2)
    with SLEDLogitsProcessor(tiny_model, evolution_scale=20) as proc:
        out = greedy_processor_generate(tiny_model, proc, ids, STEPS)
    expected = reference_greedy(lambda seq: _reference_step(tiny_model, seq, scale=20)[0], ids, STEPS)
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    ("protocol", "post_softmax"), [("paper", True), ("paper", False), ("normalized", True)]
)
def test_score_continuations_equals_reference(tiny_model, protocol, post_softmax):
    def reference(full, pos, targets):
        final, exits = _exits(tiny_model, torch.tensor([full]), pos)
        evolved, mask = _reference_logits(final, exits, scale=30)
        if protocol == "normalized":
            evolved = torch.where(mask, torch.log_softmax(evolved, -1), -1000.0)
        elif post_softmax:
            evolved = torch.log_softmax(evolved, -1)
        return evolved.gather(-1, targets[:, None]).squeeze(-1)

    strategy = SLED(evolution_scale=30, post_softmax=post_softmax)
    assert_scores_match_reference(tiny_model, strategy, reference, protocol)


def test_scale_above_vocab_is_capped(tiny_model):
    ids = prompt_ids()
    _, out = _processor_step(tiny_model, ids, evolution_scale=VOCAB + 50)
    expected, mask = _reference_step(tiny_model, ids, scale=VOCAB + 50)
    assert bool(mask.all())
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(evolution_rate=-1.0), "`evolution_rate` must be >= 0"),
        (dict(evolution_rate="fast"), "`evolution_rate` must be a finite number"),
        (dict(evolution_rate=float("nan")), "`evolution_rate` must be a finite number"),
        (dict(evolution_scale=0), "`evolution_scale` must be an int >= 1"),
        (dict(evolution_scale=7.5), "`evolution_scale` must be an int >= 1"),
        (dict(evolution_lower_bound=float("-inf")), "`evolution_lower_bound` must be a finite number"),
        (dict(evolution_steps=0), "`evolution_steps` must be an int >= 1"),
        (dict(layers=[6]), "`layers` has layer 6, outside 0\\.\\.5"),
        (dict(layers=[]), "`layers` must be None"),
        (dict(layers="all"), "`layers` must be None"),
        (dict(final_norm=None), "`final_norm` must be True or False"),
        (dict(post_softmax=1), "`post_softmax` must be True or False"),
    ],
)
def test_bad_arguments_raise_before_any_hook(tiny_model, kwargs, fragment):
    assert_refused_before_attaching(tiny_model, SLEDLogitsProcessor, kwargs, fragment)
