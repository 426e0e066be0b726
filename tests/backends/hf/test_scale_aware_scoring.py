"""Scale-aware scoring: the ``normalized`` floor cannot silently rank implausible tokens above
plausible ones, and ``WeightedContrast`` can put its parts on one scale.

A strategy whose contrast is huge (early exits without the final norm on a large residual stream)
gives plausible tokens normalized scores far below DoLa's fixed -1000 floor. The library counts
and warns about such tokens (``ContinuationScore.below_floor``), and :class:`RelativeFloor` puts the
floor ``margin`` below each position's lowest plausible score instead. Every number is checked
against a computation written out here from the model's own logits.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import build_model, char_tokenizer, prompt_ids

from contrastive_decoding import (
    ContrastLogitsProcessor,
    ContrastStrategy,
    DoLa,
    InducedContrast,
    RelativeFloor,
    WeightedContrast,
    plausible_mask,
    score_continuations,
)
from contrastive_decoding.core import protocol_token_scores

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = char_tokenizer()
MODEL = build_model("llama")
PROMPT, ANSWERS = "Q: Where is Paris? A:", [" In France.", " Rome", " x y"]
SCALE = 1e4


class Sharpened(ContrastStrategy):
    """The model's own logits times 1e4: plausible tokens other than the top one get normalized
    scores of order -1e4, far below a -1000 floor (what huge early exits do to a contrast)."""

    def combine(self, inputs):
        return inputs.final * SCALE


def _score(strategy, protocol: str, **kwargs):
    args = (MODEL, TOKENIZER, PROMPT, ANSWERS)
    return score_continuations(*args, strategy=strategy, protocol=protocol, **kwargs)


def _reference(answer: str, floor) -> torch.Tensor:
    """Per-token normalized scores written out from the model's logits."""
    prefix = TOKENIZER(PROMPT)["input_ids"]
    ids = TOKENIZER(PROMPT + answer)["input_ids"]
    with torch.no_grad():
        logits = MODEL(torch.tensor([ids])).logits[0].float()
    rows = logits[len(prefix) - 1 : len(ids) - 1]
    targets = torch.tensor(ids[len(prefix) :])
    contrast = F.log_softmax(rows * SCALE, dim=-1)
    keep = plausible_mask(F.log_softmax(rows, dim=-1), 0.1, 1)
    if isinstance(floor, RelativeFloor):
        value = torch.where(keep, contrast, torch.inf).amin(-1, keepdim=True) - floor.margin
    else:
        value = torch.full_like(contrast[:, :1], floor)
    return torch.where(keep, contrast, value).gather(-1, targets[:, None]).squeeze(-1), keep, contrast


def test_relative_floor_by_hand():
    scores = torch.tensor([[-5.0e4, -4.0e4, 0.0, -2.0], [-1.0, -3.0, -2.0, -9.0]])
    keep = torch.tensor([[True, True, False, False], [False, True, True, False]])
    assert RelativeFloor(1000.0).values(scores, keep).tolist() == [[-51000.0], [-1003.0]]
    got = protocol_token_scores(scores, lambda: keep, torch.tensor([2, 3]), "normalized", RelativeFloor(10.0))
    lowest = [
        F.log_softmax(scores[0], -1)[:2].min().item() - 10.0,
        F.log_softmax(scores[1], -1)[1:3].min().item() - 10.0,
    ]
    torch.testing.assert_close(got, torch.tensor(lowest))


@pytest.mark.parametrize("margin", [float("nan"), float("inf"), 0.0, -5.0, True, "1000", None])
def test_relative_floor_refuses_a_bad_margin(margin):
    with pytest.raises(ValueError, match="`margin` must be a finite number > 0"):
        RelativeFloor(margin)


def test_fixed_floor_below_plausible_scores_is_counted_and_warned():
    with pytest.warns(UserWarning, match=r"plausible token\(s\) scored below the floor.*RelativeFloor"):
        scores = _score(Sharpened(), "normalized")
    total = 0
    for answer, score in zip(ANSWERS, scores, strict=True):
        expected, keep, contrast = _reference(answer, -1000.0)
        torch.testing.assert_close(score.token_scores, expected, rtol=1e-5, atol=1e-3)
        # By hand: plausible targets whose normalized contrast is below -1000.
        prefix = len(TOKENIZER(PROMPT)["input_ids"])
        targets = torch.tensor(TOKENIZER(PROMPT + answer)["input_ids"][prefix:])
        plausible = keep.gather(-1, targets[:, None]).squeeze(-1)
        below = plausible & (contrast.gather(-1, targets[:, None]).squeeze(-1) < -1000.0)
        assert score.below_floor == int(below.sum())
        total += score.below_floor
    assert total > 0, "the sharpened contrast must put some plausible answer token below -1000"


def test_relative_floor_keeps_every_implausible_token_below_the_plausible_ones():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no below-floor warning with a relative floor
        scores = _score(Sharpened(), "normalized", floor=RelativeFloor())
    for answer, score in zip(ANSWERS, scores, strict=True):
        expected, keep, contrast = _reference(answer, RelativeFloor())
        torch.testing.assert_close(score.token_scores, expected, rtol=1e-5, atol=1e-3)
        assert score.below_floor == 0
        prefix = len(TOKENIZER(PROMPT)["input_ids"])
        targets = torch.tensor(TOKENIZER(PROMPT + answer)["input_ids"][prefix:])
        lowest_plausible = torch.where(keep, contrast, torch.inf).amin(-1)
        implausible = ~keep.gather(-1, targets[:, None]).squeeze(-1)
        assert (score.token_scores[implausible] < lowest_plausible[implausible]).all()


def test_paper_protocol_and_the_plain_model_are_never_counted():
    for strategy, protocol in [(Sharpened(), "paper"), (None, "normalized")]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            scores = _score(strategy, protocol)
        assert all(s.below_floor == 0 for s in scores)


def _first_step_scores(strategy) -> torch.Tensor:
    ids = prompt_ids(batch=2)
    with ContrastLogitsProcessor(MODEL, strategy, tokenizer=TOKENIZER) as proc:
        out = MODEL.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            logits_processor=[proc],
            max_new_tokens=1,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    return out.scores[0]


def _z_by_hand(row: torch.Tensor) -> torch.Tensor:
    """z-scores of one row's finite entries, in float64, one entry at a time."""
    out = torch.full_like(row, -torch.inf)
    kept = [i for i in range(row.numel()) if row[i] > -torch.inf]
    values = [float(row[i]) for i in kept]
    mean = sum(values) / len(values)
    std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
    for i, v in zip(kept, values, strict=True):
        out[i] = (v - mean) / std if std > 0 else 0.0
    return out


def _rescaled(scores: torch.Tensor, scale: str) -> torch.Tensor:
    if scale == "log_softmax":
        return F.log_softmax(scores, dim=-1)
    return torch.stack([_z_by_hand(row) for row in scores])


@pytest.mark.parametrize("scale", ["log_softmax", "standardize"])
def test_weighted_contrast_on_one_scale_is_the_weighted_sum_of_rescaled_parts(scale):
    parts = [(1.0, DoLa("high")), (0.5, InducedContrast())]
    composite = _first_step_scores(WeightedContrast(parts, scale=scale))
    expected = sum(w * _rescaled(_first_step_scores(s), scale) for w, s in parts)
    torch.testing.assert_close(composite, expected, rtol=1e-4, atol=1e-4)
    raw = _first_step_scores(WeightedContrast(parts))
    expected_raw = sum(w * _first_step_scores(s) for w, s in parts)
    torch.testing.assert_close(raw, expected_raw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", ["log_softmax", "standardize"])
@pytest.mark.parametrize("protocol", ["paper", "normalized"])
def test_weighted_contrast_on_one_scale_scores_the_first_token_as_its_step(protocol, scale):
    """The first answer token's score is the composite's decoding row at the prompt's end (the
    part's rescaled step, or the floor where a part rules the token out)."""
    parts = [(1.0, DoLa("high")), (0.5, InducedContrast())]
    strategy = WeightedContrast(parts, scale=scale)
    prefix = TOKENIZER(PROMPT)["input_ids"]
    ids = torch.tensor([prefix])
    expected_row = torch.zeros(MODEL.config.vocab_size)
    for weight, part in parts:
        with ContrastLogitsProcessor(MODEL, part, tokenizer=TOKENIZER) as proc:
            out = MODEL.generate(
                ids, attention_mask=torch.ones_like(ids), logits_processor=[proc], max_new_tokens=1,
                do_sample=False, output_scores=True, return_dict_in_generate=True,
            )  # fmt: skip
        rescaled = _rescaled(out.scores[0][:1], scale)[0]
        expected_row += weight * torch.where(rescaled > -torch.inf, rescaled, -1000.0)
    scores = score_continuations(MODEL, TOKENIZER, PROMPT, ANSWERS, strategy=strategy, protocol=protocol)
    for answer, score in zip(ANSWERS, scores, strict=True):
        first = TOKENIZER(PROMPT + answer)["input_ids"][len(prefix)]
        torch.testing.assert_close(score.token_scores[0], expected_row[first], rtol=1e-4, atol=1e-4)


def test_weighted_contrast_refuses_an_unknown_scale():
    with pytest.raises(ValueError, match="`scale` must be one of"):
        WeightedContrast([DoLa()], scale="softmax")
