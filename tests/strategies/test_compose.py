"""WeightedContrast: a weighted sum of strategies on shared forward passes.

Generation is checked against a reference loop that computes each part's formula by hand from
``output_hidden_states`` (DoLa with one premature layer, VISTA's mixing) and adds them with the
weights; scoring (including a part with degraded streams) against the parts scored one by one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_state, build_model, char_tokenizer, model_state
from reference_impl import early_exit

from contrastive_decoding import (
    ContrastLogitsProcessor,
    DoLa,
    LayerCake,
    VistaLogits,
    WeightedContrast,
    score_continuations,
    strategy_generate,
)

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "Q: Where is the Eiffel tower? A:"
CONTINUATIONS = [" Paris.", " In Rome, Italy.", " x"]


@torch.no_grad()
def _reference_step(model, ids, dola_layer, vista_layers, w_dola, w_vista):
    out = model(ids, output_hidden_states=True, use_cache=False)
    final = out.logits[:, -1].double()
    final_lp = F.log_softmax(final, -1)
    early_lp = F.log_softmax(early_exit(model, out.hidden_states[dola_layer][:, -1]).double(), -1)
    keep = final_lp >= final_lp.max(-1, keepdim=True).values + torch.log(
        torch.tensor(0.1, dtype=torch.float64)
    )
    dola = torch.where(keep, final_lp - early_lp, -torch.inf)
    late = torch.stack([early_exit(model, out.hidden_states[j][:, -1]).double() for j in vista_layers]).mean(
        0
    )
    vista = 0.3 * late + 0.7 * final
    return w_dola * dola + w_vista * vista


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gemma2", "opt", "gpt_neox", "phi"])
def test_greedy_matches_weighted_sum_of_hand_formulas(family):
    model, tokenizer = build_model(family), char_tokenizer()
    combo = WeightedContrast([(1.0, DoLa(dola_layers=[2])), (0.5, VistaLogits(late_layers=[3, 5]))])
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    expected = ids
    for _ in range(6):
        step = _reference_step(model, expected, 2, [3, 5], 1.0, 0.5)
        expected = torch.cat([expected, step.argmax(-1, keepdim=True)], 1)
    with ContrastLogitsProcessor(model, combo) as proc:
        out = model.generate(
            ids, logits_processor=[proc], max_new_tokens=6, do_sample=False, min_new_tokens=6
        )
    loop = model.generate(
        ids, custom_generate=strategy_generate, strategy=combo, max_new_tokens=6, do_sample=False,
        min_new_tokens=6, output_scores=True, return_dict_in_generate=True,
    )  # fmt: skip
    assert out.tolist() == expected.tolist()
    assert loop.sequences.tolist() == expected.tolist()
    first = _reference_step(model, ids, 2, [3, 5], 1.0, 0.5).float()
    first[:, model.generation_config.eos_token_id] = -torch.inf  # min_new_tokens masks EOS
    finite = torch.isfinite(first)
    assert torch.equal(finite, torch.isfinite(loop.scores[0]))
    torch.testing.assert_close(loop.scores[0][finite], first[finite], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("protocol", ["paper", "normalized"])
@pytest.mark.parametrize("family", ["llama", "gemma2", "opt"])
def test_scoring_equals_weighted_parts_scored_alone(family, protocol):
    model, tokenizer = build_model(family), char_tokenizer()
    parts = [(1.0, DoLa("high")), (0.7, LayerCake(amateur="average")), (0.2, VistaLogits())]
    combined = score_continuations(
        model, tokenizer, PROMPT, CONTINUATIONS, strategy=WeightedContrast(parts), protocol=protocol
    )
    alone = [
        score_continuations(model, tokenizer, PROMPT, CONTINUATIONS, strategy=s, protocol=protocol)
        for _, s in parts
    ]
    for i, result in enumerate(combined):
        expected = sum(w * runs[i].token_scores for (w, _), runs in zip(parts, alone, strict=True))
        torch.testing.assert_close(result.token_scores, expected, rtol=1e-4, atol=1e-3)


def test_generation_with_streams_equals_parts_combined_by_hand():
    # LayerCake's streams and DoLa's layers in one forward: the composite's first step scores equal
    # the parts' own processors' scores on the same prompt, weighted and added.
    model, tokenizer = build_model("llama"), char_tokenizer()
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    parts = [(1.0, DoLa("low")), (0.5, LayerCake())]
    kw = dict(max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True)
    with ContrastLogitsProcessor(model, WeightedContrast(parts), tokenizer=tokenizer) as proc:
        both = model.generate(ids, logits_processor=[proc], **kw).scores[0]
    expected = 0
    for weight, strategy in parts:
        with ContrastLogitsProcessor(model, strategy, tokenizer=tokenizer) as proc:
            expected = expected + weight * model.generate(ids, logits_processor=[proc], **kw).scores[0]
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(both))
    torch.testing.assert_close(both[finite], expected[finite], rtol=1e-5, atol=1e-5)


def test_bad_parts_are_refused_and_model_untouched():
    model = build_model("llama")
    before = model_state(model)
    with pytest.raises(ValueError, match="non-empty list"):
        WeightedContrast([])
    with pytest.raises(ValueError, match="weights must be positive"):
        WeightedContrast([(0.0, DoLa())])
    with pytest.raises(ValueError, match="must hold a ContrastStrategy"):
        WeightedContrast([(1.0, "dola")])
    with pytest.raises(ValueError, match="different suppression settings"):
        WeightedContrast([LayerCake(), LayerCake(mode="bias")])
    with pytest.raises(ValueError, match="needs the token classes"):
        ContrastLogitsProcessor(model, WeightedContrast([DoLa(), LayerCake()]))
    assert_same_state(before, model_state(model))
