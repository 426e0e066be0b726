"""Layer divergences against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from contrastive_decoding import layer_divergence
from contrastive_decoding.core.divergence import (
    divergence_and_log_probs,
    divergence_by_layer,
    layerwise_is_exact,
)

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


# (layers, rows, vocab): one row and many, vocabularies below and above PyTorch's parallel grain.
_SHAPES = [(2, 1, 300), (2, 2, 5000), (8, 1, 49152), (3, 8, 262144), (10, 3, 32000), (2, 32, 40000)]


def _kl_div_reference(final, stacked):
    """transformers 4.43-4.55's `_dola_select_contrast`, written as it is there."""
    m = 0.5 * (F.softmax(final, dim=-1)[None, :, :] + F.softmax(stacked, dim=-1))
    kl1 = F.kl_div(F.log_softmax(final, dim=-1)[None, :, :], m, reduction="none").mean(-1)
    kl2 = F.kl_div(F.log_softmax(stacked, dim=-1), m, reduction="none").mean(-1)
    return 0.5 * (kl1 + kl2)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_layer_by_layer_divergence_is_bit_identical_where_claimed(threads):
    """The low-memory path against the stacked one (itself checked against transformers' DoLa)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(threads)
        for layers, rows, vocab in _SHAPES:
            final = torch.randn(rows, vocab, generator=gen) * 6
            stacked = torch.randn(layers, rows, vocab, generator=gen) * 6
            final[:, :3] = -math.inf  # masked tokens: xlogy(0, 0) and 0 * -inf on the way
            if not layerwise_is_exact(final, stacked):
                assert rows == 1 and threads > 1, (layers, rows, vocab)
                continue
            div, log_p = divergence_by_layer(final, stacked)
            ref_div, ref_log_p, ref_log_q = divergence_and_log_probs(final, stacked)
            torch.testing.assert_close(div, ref_div, rtol=0, atol=0, equal_nan=True)
            torch.testing.assert_close(div, _kl_div_reference(final, stacked), rtol=0, atol=0, equal_nan=True)
            assert torch.equal(log_p, ref_log_p)
            pick = (ref_div.argmax(0), torch.arange(rows))
            assert torch.equal(F.log_softmax(stacked[pick], dim=-1), ref_log_q[pick])
    finally:
        torch.set_num_threads(previous)


def test_divergence_runs_on_logits_that_require_grad():
    # A processor called outside `no_grad` gets early exits that carry the head's grad flag.
    final, stacked = torch.randn(2, 40), torch.randn(3, 2, 40)
    for fn in (divergence_by_layer, divergence_and_log_probs):
        got = fn(final.requires_grad_(), stacked.requires_grad_())[0]
        assert torch.equal(got.detach(), fn(final.detach(), stacked.detach())[0])


def test_layer_by_layer_path_is_not_taken_where_unproven():
    final, stacked = torch.randn(1, 50), torch.randn(3, 1, 50)
    assert not layerwise_is_exact(final, stacked, "jsd")
    assert not layerwise_is_exact(final.expand(2, 50), torch.randn(1, 2, 50))  # a single layer
    if torch.get_num_threads() > 1:
        assert not layerwise_is_exact(final, stacked)  # one row, several threads: two-pass mean
