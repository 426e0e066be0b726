"""DeCo (dynamic correction decoding) against hand-written references, on every tiny family.

References use the model's own uncached forward with ``output_hidden_states=True``, the logit lens
``early_exit(model, hidden_states[j], final_norm=True)`` and DeCo's formula written out in float64
with explicit loops over layers and candidates (spec §4, DeCo bullet; candidate cut and tie order
as the authors' ``deco_greedy_search``): ``C`` = the top-k of ``q_N`` up to and including the token
where the cumulative probability reaches ``top_p``; ``(j*, c*) = argmax q_j(c)`` (first maximum,
layers outer); ``l_N + alpha * q_{j*}(c*) * l_{j*}`` on ``C``, ``-inf`` elsewhere.
"""

from __future__ import annotations

import math
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

from contrastive_decoding import ContrastInputs
from contrastive_decoding.backends.hf.named import DeCoLogitsProcessor
from contrastive_decoding.strategies.deco import DECO_LATE_LAYERS, DeCo

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 5
DEFAULT_LAYERS = [4, 5]  # round(20/32 * 6) .. round(28/32 * 6) for the six-layer tiny models


def _inputs(final: torch.Tensor, layer_logits: torch.Tensor) -> ContrastInputs:
    """A step's inputs from given logits, ``(R, V)`` and ``(J, R, V)``."""
    return ContrastInputs(final=final, layer_logits=layer_logits)


def _reference_row(final, exits, alpha=0.6, top_k=20, top_p=0.9):
    """(DeCo logits with -inf outside C, unmasked logits, chosen position, candidates) for one row.

    ``final`` is ``(V,)``, ``exits`` a list of ``(V,)`` early-exit logits, all made float64 here.
    """
    final = final.double()
    exits = [e.double() for e in exits]
    q_n = torch.softmax(final, -1).tolist()
    order = sorted(range(len(q_n)), key=lambda t: (-q_n[t], t))[:top_k]
    candidates, cumulative = [], 0.0
    for token in order:
        candidates.append(token)
        cumulative += q_n[token]
        if cumulative >= top_p:
            break
    best, chosen = -1.0, None
    for j, exit_logits in enumerate(exits):
        q_j = torch.softmax(exit_logits, -1).tolist()
        for c in candidates:
            if q_j[c] > best:
                best, chosen = q_j[c], j
    unmasked = final + alpha * best * exits[chosen]
    masked = torch.full_like(final, -math.inf)
    for c in candidates:
        masked[c] = unmasked[c]
    return masked, unmasked, chosen, candidates


@torch.no_grad()
def _reference_step(model, ids, layers=DEFAULT_LAYERS, final_norm=True, **kwargs):
    """Per-row references at the last position: ``(B, V)`` masked logits and chosen positions."""
    out = model(ids, output_hidden_states=True, use_cache=False)
    rows, chosen = [], []
    for b in range(ids.shape[0]):
        exits = [early_exit(model, out.hidden_states[j][b, -1], final_norm) for j in layers]
        masked, _, pick, _ = _reference_row(out.logits[b, -1], exits, **kwargs)
        rows.append(masked)
        chosen.append(pick)
    return torch.stack(rows), chosen


def _processor_step(model, ids, **kwargs):
    return processor_step(DeCoLogitsProcessor, model, ids, **kwargs)


def _assert_same_scores(got, expected):
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got.double()[finite], expected[finite], rtol=1e-4, atol=1e-4)


def test_defaults_and_layer_resolution():
    deco = DeCo()
    assert (deco.alpha, deco.top_k, deco.top_p, deco.final_norm) == (0.6, 20, 0.9, True)
    assert deco.layers == list(DECO_LATE_LAYERS)
    assert deco.premature_layers(SimpleNamespace(num_layers=32)) == list(range(20, 29))  # range(20, 29)
    assert deco.premature_layers(SimpleNamespace(num_layers=6)) == DEFAULT_LAYERS
    assert DeCo(layers=[1, 3]).premature_layers(SimpleNamespace(num_layers=6)) == [1, 3]
    assert "alpha=0.6" in repr(deco) and "final_norm=True" in repr(deco)


@pytest.mark.parametrize(
    ("kwargs", "layers"),
    [
        (dict(), DEFAULT_LAYERS),
        (dict(layers=[1, 3, 5], alpha=0.5, top_p=0.3), [1, 3, 5]),
        (dict(layers=(0.3, 0.8), top_k=5, final_norm=False), [2, 3, 4, 5]),
    ],
    ids=["default", "idx-alpha0.5-p0.3", "frac-k5-raw"],
)
def test_step_scores_match_reference(tiny_model, kwargs, layers):
    ids = prompt_ids(batch=3)
    proc, out = _processor_step(tiny_model, ids, **kwargs)
    assert proc.layers == layers
    ref_kwargs = {k: kwargs[k] for k in ("alpha", "top_k", "top_p") if k in kwargs}
    expected, chosen = _reference_step(tiny_model, ids, layers, kwargs.get("final_norm", True), **ref_kwargs)
    _assert_same_scores(out, expected)
    assert proc.chosen_layers.tolist() == [[layers[c] for c in chosen]]


def test_final_norm_default_applies_the_norm(tiny_model):
    ids = prompt_ids(batch=2)
    _, out = _processor_step(tiny_model, ids, layers=[1, 2, 3])
    raw, _ = _reference_step(tiny_model, ids, [1, 2, 3], final_norm=False)
    finite = torch.isfinite(out)
    assert not torch.allclose(out.double()[finite], raw[finite], atol=1e-3)


def test_candidate_set_cuts(tiny_model):
    ids = prompt_ids(batch=2)
    with torch.no_grad():
        own = tiny_model(ids).logits[:, -1].float()
    # A tiny top_p keeps only the model's own top token.
    _, out = _processor_step(tiny_model, ids, top_p=1e-6)
    assert torch.equal(torch.isfinite(out), torch.nn.functional.one_hot(own.argmax(-1), own.shape[-1]).bool())
    # top_k caps the set; top_p=1 with top_k >= V keeps every token.
    _, out = _processor_step(tiny_model, ids, top_k=3, top_p=1.0)
    assert torch.isfinite(out).sum(-1).tolist() == [3, 3]
    _, out = _processor_step(tiny_model, ids, top_k=1000, top_p=1.0)
    assert bool(torch.isfinite(out).all())


def test_zero_alpha_is_the_model_on_its_candidates(tiny_model):
    ids = prompt_ids(batch=2)
    with torch.no_grad():
        own = tiny_model(ids).logits[:, -1].float()
    _, out = _processor_step(tiny_model, ids, alpha=0.0)
    finite = torch.isfinite(out)
    torch.testing.assert_close(out[finite], own[finite])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vectorised_contrast_equals_loops(seed):
    g = torch.Generator().manual_seed(seed)
    final = torch.randn(5, 40, generator=g) * 3
    layer_logits = torch.randn(4, 5, 40, generator=g) * 3
    deco = DeCo(alpha=0.55, top_k=7, top_p=0.8)
    out = deco.step(_inputs(final, layer_logits))
    for b in range(5):
        masked, _, chosen, _ = _reference_row(final[b], list(layer_logits[:, b]), 0.55, 7, 0.8)
        _assert_same_scores(out.scores[b], masked)
        assert int(out.chosen[b]) == chosen


def test_layer_choice_follows_the_most_confident_exit():
    # Row 0: layer 2 is sure of candidate 1; row 1: layer 0 is sure of candidate 0; a layer sure
    # of a non-candidate (token 5) never wins. Ties go to the first layer, as the authors' argmax.
    final = torch.tensor([[4.0, 3.9, -9, -9, -9, -9], [4.0, 3.9, -9, -9, -9, -9]])
    layers = torch.zeros(3, 2, 6)
    layers[1, :, 5] = 50.0
    layers[2, 0, 1] = 10.0
    layers[0, 1, 0] = 10.0
    out = DeCo(alpha=1.0).step(_inputs(final, layers))
    assert out.chosen.tolist() == [2, 0]
    q = torch.softmax(torch.tensor([0.0, 10, 0, 0, 0, 0]), -1)[1]
    torch.testing.assert_close(out.scores[0, :2], final[0, :2] + q * layers[2, 0, :2])
    assert bool(torch.isinf(out.scores[:, 2:]).all())
    tie = DeCo().step(_inputs(final, torch.zeros(3, 2, 6)))
    assert tie.chosen.tolist() == [0, 0]


def test_greedy_generate_equals_uncached_loop(tiny_model):
    ids = prompt_ids(batch=2)
    with DeCoLogitsProcessor(tiny_model) as proc:
        out = greedy_processor_generate(tiny_model, proc, ids, STEPS)
        history = proc.chosen_layers
    expected_history = []

    def step(seq):
        scores, chosen = _reference_step(tiny_model, seq)
        expected_history.append([DEFAULT_LAYERS[c] for c in chosen])
        return scores

    assert torch.equal(out, reference_greedy(step, ids, STEPS))
    assert history.tolist() == expected_history


@pytest.mark.parametrize("protocol", ["paper", "normalized"])
def test_score_continuations_equals_reference(tiny_model, protocol):
    layers = [2, 4]
    scored = floored = 0

    def reference(full, positions, targets):
        nonlocal scored, floored
        out = tiny_model(torch.tensor([full]), output_hidden_states=True)
        hidden = [out.hidden_states[j][0] for j in layers]
        expected = []
        for pos, target in zip(positions.tolist(), targets.tolist(), strict=True):
            exits = [early_exit(tiny_model, h[pos], True) for h in hidden]
            masked, unmasked, _, candidates = _reference_row(out.logits[0, pos], exits)
            scored += 1
            if target not in candidates:
                expected.append(-1000.0)
                floored += 1
            elif protocol == "paper":
                expected.append(float(torch.log_softmax(masked, -1)[target]))
            else:
                expected.append(float(torch.log_softmax(unmasked, -1)[target]))
        return torch.tensor(expected, dtype=torch.float64)

    assert_scores_match_reference(tiny_model, DeCo(layers=layers), reference, protocol)
    assert floored < scored  # not every target is floored


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(alpha=-0.1), "`alpha` must be (a finite number )?>= 0"),
        (dict(alpha="0.6"), "`alpha` must be (a finite number )?>= 0"),
        (dict(alpha=float("nan")), "`alpha` must be (a finite number )?>= 0"),
        (dict(top_k=0), "`top_k` must be an int >= 1"),
        (dict(top_k=2.5), "`top_k` must be an int >= 1"),
        (dict(top_k=True), "`top_k` must be an int >= 1"),
        (dict(top_p=0.0), "`top_p` must be in \\(0, 1\\]"),
        (dict(top_p=1.5), "`top_p` must be in \\(0, 1\\]"),
        (dict(final_norm=None), "`final_norm` must be True or False"),
        (dict(layers=[6]), "`layers` has layer 6, outside 0\\.\\.5"),
        (dict(layers=[]), "`layers` is empty"),
        (dict(layers="late"), "`layers` must be a list"),
        (dict(layers=(0.9, 0.2)), "`layers`=\\(0.9, 0.2\\) as fractions"),
        (dict(layers=[True, 2]), "`layers` must hold ints"),
    ],
)
def test_bad_arguments_raise_before_any_hook(tiny_model, kwargs, fragment):
    assert_refused_before_attaching(tiny_model, DeCoLogitsProcessor, kwargs, fragment)
