"""The adaptive plausibility constraint against hand-computed sets."""

from __future__ import annotations

import math

import pytest
import torch

from contrastive_decoding import plausible_mask
from contrastive_decoding.core.plausibility import check_relative_top

LOGP = torch.tensor([0.5, 0.3, 0.04, 0.16]).log()


def test_relative_top_threshold_by_hand():
    # max p = 0.5: alpha 0.1 keeps p >= 0.05, alpha 0.5 keeps p >= 0.25.
    assert plausible_mask(LOGP, 0.1).tolist() == [True, True, False, True]
    assert plausible_mask(LOGP, 0.5).tolist() == [True, True, False, False]
    assert plausible_mask(LOGP, 1.0).tolist() == [True, False, False, False]


def test_min_tokens_to_keep():
    assert plausible_mask(LOGP, 0.9, min_tokens_to_keep=3).tolist() == [True, True, False, True]


def test_batched_rows_are_independent():
    rows = torch.stack([LOGP, LOGP.flip(0)])
    assert plausible_mask(rows, 0.5).tolist() == [[True, True, False, False], [False, False, True, True]]


def test_threshold_is_log_alpha_below_max():
    logp = torch.log_softmax(torch.randn(3, 50), -1)
    keep = plausible_mask(logp, 0.2)
    thresh = logp.max(-1, keepdim=True).values + math.log(0.2)
    assert torch.equal(keep, logp >= thresh)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, "0.1", True])
def test_relative_top_out_of_range(bad):
    with pytest.raises(ValueError, match="relative_top"):
        check_relative_top(bad)
