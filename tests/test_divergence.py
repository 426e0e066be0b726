"""Layer divergences against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from contrastive_decoding import layer_divergence

P = torch.tensor([0.5, 0.25, 0.25])
Q = torch.tensor([0.25, 0.25, 0.5])
# m = (p + q) / 2 = [0.375, 0.25, 0.375]


def test_reference_divergence_by_hand():
    # KL(m||p) = 0.375 ln(0.375/0.5) + 0 + 0.375 ln(0.375/0.25) = 0.375 ln 1.125 = KL(m||q).
    expected = 0.375 * math.log(1.125) / 3  # averaged over the 3 tokens
    got = layer_divergence(P.log()[None], Q.log()[None, None], "reference")
    assert got.shape == (1, 1)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_textbook_jsd_by_hand():
    # KL(p||m) = 0.5 ln(0.5/0.375) + 0.25 ln 1 + 0.25 ln(0.25/0.375) = KL(q||m) by symmetry.
    expected = (0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3)) / 3
    got = layer_divergence(P.log()[None], Q.log()[None, None], "jsd")
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_zero_for_identical_and_shift_invariant():
    logits = torch.randn(2, 10)
    for kind in ("reference", "jsd"):
        same = layer_divergence(logits, torch.stack([logits, logits + 3.0]), kind)
        assert torch.allclose(same, torch.zeros(2, 2), atol=1e-7)


def test_jsd_handles_masked_tokens():
    final = torch.tensor([[0.0, 1.0, -math.inf]])
    layer = torch.tensor([[[1.0, 0.0, 0.0]]])
    value = layer_divergence(final, layer, "jsd")
    assert torch.isfinite(value).all() and value.item() <= math.log(2) / 3


def test_unknown_kind():
    with pytest.raises(ValueError, match="divergence"):
        layer_divergence(torch.zeros(1, 3), torch.zeros(1, 1, 3), "kl")
