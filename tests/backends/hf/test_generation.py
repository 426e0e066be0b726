"""DoLa in generation, on every family: processor in stock `generate` and the `dola_generate` loop."""

from __future__ import annotations

import pytest
import torch
from conftest import OTHER_FAMILIES, left_padded, prompt_ids
from reference_impl import dola_greedy, dola_step
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from contrastive_decoding import (
    ContrastOutput,
    DoLa,
    DoLaLogitsProcessor,
    LayerContrastLogitsProcessor,
    LayerContrastStrategy,
    LayerReadout,
    dola_generate,
)

STEPS = 6


def _generate(model, ids, mask=None, **kwargs):
    kwargs.setdefault("do_sample", False)
    kwargs.setdefault("min_new_tokens", STEPS)
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids) if mask is None else mask,
        max_new_tokens=STEPS,
        pad_token_id=0,
        **kwargs,
    )


class PassThrough(LayerContrastStrategy):
    """A strategy that captures layers but returns the mature scores unchanged."""

    def premature_layers(self, readout):
        return list(range(readout.num_layers))

    def contrast(self, final_logits, layer_logits, raw_logits=None):
        return ContrastOutput(final_logits.clone())

    def score_tokens(self, final_logits, layer_logits, targets, protocol, floor):
        raise NotImplementedError


def test_processor_without_effect_leaves_generate_unchanged(tiny_model):
    ids = prompt_ids(batch=2)
    stock = _generate(tiny_model, ids, output_scores=True, return_dict_in_generate=True)
    with LayerContrastLogitsProcessor(tiny_model, PassThrough()) as proc:
        ours = _generate(
            tiny_model, ids, logits_processor=[proc], output_scores=True, return_dict_in_generate=True
        )
    assert torch.equal(stock.sequences, ours.sequences)
    for a, b in zip(stock.scores, ours.scores, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dola_layers", ["high", "low", [1, 3]])
def test_dola_greedy_matches_uncached_reference(tiny_model, dola_layers):
    ids = prompt_ids()
    layers = DoLa(dola_layers).premature_layers(LayerReadout.from_model(tiny_model))
    expected, history = dola_greedy(tiny_model, ids, layers, STEPS)
    with DoLaLogitsProcessor(tiny_model, dola_layers=dola_layers) as proc:
        got = _generate(tiny_model, ids, logits_processor=[proc])
        assert proc.chosen_layers[:, 0].tolist() == [h[0] for h in history]
    assert got.tolist() == expected.tolist()
    loop = _generate(tiny_model, ids, custom_generate=dola_generate, dola_layers=dola_layers)
    assert loop.tolist() == expected.tolist()


def test_dola_with_repetition_penalty_matches_reference(tiny_model):
    ids = prompt_ids()
    layers = DoLa("high").premature_layers(LayerReadout.from_model(tiny_model))
    expected, _ = dola_greedy(tiny_model, ids, layers, STEPS, repetition_penalty=1.2)
    loop = _generate(
        tiny_model, ids, custom_generate=dola_generate, dola_layers="high", repetition_penalty=1.2
    )
    assert loop.tolist() == expected.tolist()
    with DoLaLogitsProcessor(tiny_model, "high") as dola:
        procs = LogitsProcessorList([dola, RepetitionPenaltyLogitsProcessor(1.2)])
        got = _generate(tiny_model, ids, logits_processor=procs)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("family", OTHER_FAMILIES)  # CONTRACT_FAMILIES: the shared tester
def test_cached_equals_uncached(tiny_model):
    ids = prompt_ids(batch=2)
    with DoLaLogitsProcessor(tiny_model, "high") as proc:
        cached = _generate(tiny_model, ids, logits_processor=[proc], use_cache=True)
        uncached = _generate(tiny_model, ids, logits_processor=[proc], use_cache=False)
    assert torch.equal(cached, uncached)
    loop_cached = _generate(tiny_model, ids, custom_generate=dola_generate, use_cache=True)
    loop_uncached = _generate(tiny_model, ids, custom_generate=dola_generate, use_cache=False)
    assert torch.equal(loop_cached, loop_uncached)
    assert torch.equal(loop_cached, cached)


@pytest.mark.parametrize("family", OTHER_FAMILIES)  # CONTRACT_FAMILIES: the shared tester
def test_left_padded_row_equals_row_alone(tiny_model):
    short, long = prompt_ids(length=4, seed=3)[0], prompt_ids(length=9, seed=4)[0]
    ids, mask = left_padded([short, long])
    with DoLaLogitsProcessor(tiny_model, "high") as proc:
        batched = _generate(tiny_model, ids, mask, logits_processor=[proc])
        alone = [
            _generate(tiny_model, row[None], logits_processor=[proc])[0, -STEPS:] for row in (short, long)
        ]
    loop = _generate(tiny_model, ids, mask, custom_generate=dola_generate)
    for i in range(2):
        assert batched[i, -STEPS:].tolist() == alone[i].tolist()
        assert loop[i, -STEPS:].tolist() == alone[i].tolist()


def test_per_row_layer_choice_and_batch_mean_flag(tiny_model):
    ids = prompt_ids(batch=3, seed=7)
    readout = LayerReadout.from_model(tiny_model)
    layers = DoLa("high").premature_layers(readout)
    _, per_row_expected = dola_step(tiny_model, ids, layers)
    with DoLaLogitsProcessor(tiny_model, "high") as proc:
        with torch.no_grad():
            scores = tiny_model(ids).logits[:, -1].float()
        proc(ids, scores)
        assert proc.chosen_layers[0].tolist() == per_row_expected
    with DoLaLogitsProcessor(tiny_model, "high", layer_choice="batch_mean") as proc:
        with torch.no_grad():
            tiny_model(ids)
        proc(ids, scores)
        chosen = proc.chosen_layers[0].tolist()
    assert len(set(chosen)) == 1


def test_sampling_processor_equals_loop(tiny_model):
    ids = prompt_ids(batch=2)
    torch.manual_seed(123)
    with DoLaLogitsProcessor(tiny_model, "high") as proc:
        a = _generate(tiny_model, ids, logits_processor=[proc], do_sample=True, top_k=0)
    torch.manual_seed(123)
    b = _generate(tiny_model, ids, custom_generate=dola_generate, do_sample=True, top_k=0)
    assert torch.equal(a, b)


def test_beam_search_scores_are_dola_scores(tiny_model):
    ids = prompt_ids()
    layers = DoLa("high").premature_layers(LayerReadout.from_model(tiny_model))
    with DoLaLogitsProcessor(tiny_model, "high") as proc:
        out = _generate(
            tiny_model,
            ids,
            logits_processor=[proc],
            num_beams=3,
            length_penalty=0.0,
            # min_new_tokens would mask EOS before DoLa sees the scores, shifting every score by
            # the renormalisation; the reference below has no such mask.
            min_new_tokens=None,
            return_dict_in_generate=True,
            output_scores=True,
        )
        assert proc.chosen_layers.shape[1] == 3
    # The best beam's score is the sum of DoLa scores of its tokens given its own prefix (the
    # scores reach the processor as log-probabilities, which DoLa's log_softmax leaves unchanged).
    seq = out.sequences[0]
    total = 0.0
    for t in range(ids.shape[1], seq.shape[0]):
        step_scores, _ = dola_step(tiny_model, seq[None, :t], layers)
        total += float(step_scores[0, seq[t]])
    assert out.sequences_scores[0].item() == pytest.approx(total, rel=1e-4, abs=1e-3)


def test_scores_are_not_edited_in_place(tiny_model):
    ids = prompt_ids()
    with DoLaLogitsProcessor(tiny_model, "high") as proc:
        with torch.no_grad():
            scores = tiny_model(ids).logits[:, -1].float()
        before = scores.clone()
        out = proc(ids, scores)
    assert torch.equal(scores, before)
    assert out.data_ptr() != scores.data_ptr()


def test_loop_returns_premature_layers(tiny_model):
    ids = prompt_ids(batch=2)
    out = _generate(
        tiny_model, ids, custom_generate=dola_generate, return_dict_in_generate=True, output_scores=True
    )
    assert out.premature_layers.shape == (2, STEPS)
    assert len(out.scores) == STEPS
