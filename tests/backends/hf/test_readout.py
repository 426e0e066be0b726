"""LayerReadout: finding the layers, norm and head of every family; early exits; refusals."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, build_config, prompt_ids
from transformers import AutoModel, MambaConfig, MambaForCausalLM, T5Config, T5ForConditionalGeneration

from contrastive_decoding import LayerCapture, LayerReadout, UnsupportedModelError


def test_capture_equals_output_hidden_states(tiny_model):
    readout = LayerReadout.from_model(tiny_model)
    ids = prompt_ids(batch=2)
    with torch.no_grad():
        hidden = tiny_model(ids, output_hidden_states=True).hidden_states
        assert len(hidden) == readout.num_layers + 1
        with LayerCapture(readout, list(range(readout.num_layers)), positions="all") as cap:
            tiny_model(ids)
            states = cap.stacked()
        with LayerCapture(readout, [0, readout.num_layers - 1], positions="last") as cap:
            tiny_model(ids)
            last = cap.stacked()
    for j in range(readout.num_layers):
        assert torch.equal(states[j], hidden[j])
    assert torch.equal(last[0], hidden[0][:, -1])
    assert torch.equal(last[1], hidden[readout.num_layers - 1][:, -1])


def test_final_norm_exit_of_last_block_reproduces_model_logits(tiny_model):
    """norm -> project_out -> head -> soft-cap applied to the last block's output = the logits."""
    readout = LayerReadout.from_model(tiny_model)
    seen = {}
    handle = readout.layers[-1].register_forward_hook(
        lambda m, a, out: seen.update(h=out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.no_grad():
            logits = tiny_model(prompt_ids()).logits
            exit_logits = readout.early_exit_logits(seen["h"], final_norm=True)
    finally:
        handle.remove()
    torch.testing.assert_close(exit_logits, logits, rtol=1e-5, atol=1e-5)


def test_stacked_exit_equals_one_exit_per_layer(tiny_model):
    readout = LayerReadout.from_model(tiny_model)
    with torch.no_grad():
        hidden = tiny_model(prompt_ids(batch=3), output_hidden_states=True).hidden_states
        stacked = torch.stack([hidden[j][:, -1] for j in (0, 2, 4)])
        together = readout.early_exit_logits(stacked)
        for k, j in enumerate((0, 2, 4)):
            torch.testing.assert_close(together[k], readout.early_exit_logits(hidden[j][:, -1]))


def test_readout_parts(family, tiny_model):
    readout = LayerReadout.from_model(tiny_model)
    config = tiny_model.config
    assert readout.num_layers == config.num_hidden_layers
    assert readout.head is tiny_model.get_output_embeddings()
    assert readout.final_norm is not None
    assert readout.tied_embeddings == bool(config.tie_word_embeddings)
    assert (readout.project_out is not None) == (family == "opt")
    assert (readout.logit_softcap == 30.0) == (family in ("gemma2", "gemma3_text"))


def test_encoder_decoder_is_refused():
    config = T5Config(vocab_size=VOCAB, d_model=16, d_ff=32, num_layers=2, num_heads=2, d_kv=8)
    with pytest.raises(UnsupportedModelError, match="T5ForConditionalGeneration.*encoder-decoder"):
        LayerReadout.from_model(T5ForConditionalGeneration(config))


def test_recurrent_model_is_refused():
    config = MambaConfig(vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=2)
    with pytest.raises(UnsupportedModelError, match="MambaForCausalLM.*recurrent"):
        LayerReadout.from_model(MambaForCausalLM(config))


def test_model_without_head_is_refused():
    base = AutoModel.from_config(build_config("llama"))
    with pytest.raises(UnsupportedModelError, match="LlamaModel has no output head"):
        LayerReadout.from_model(base)


def test_layer_validation_messages(tiny_model):
    readout = LayerReadout.from_model(tiny_model)
    with pytest.raises(ValueError, match=r"`dola_layers` has layer 6, outside 0\.\.5"):
        readout.check_layers([1, 6], argument="dola_layers")
    with pytest.raises(ValueError, match="`layers` is empty"):
        readout.check_layers([])
    with pytest.raises(ValueError, match="integer layer indices"):
        readout.check_layers(["2"])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [2, 4, 8, 64, 300])
def test_sliced_head_product_is_bit_identical(rows, bias, threads):
    """Slices with one thread; with two, MKL may split the whole product differently, so the
    product is not sliced (4-8 rows differed in the last bit on some CPUs)."""
    from contrastive_decoding.backends.hf.readout import _head_product

    torch.manual_seed(0)
    head = torch.nn.Linear(64, 10_003, bias=bias)
    hidden = torch.randn(rows // 2, 2, 64) * 5
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            assert torch.equal(_head_product(head, hidden), head(hidden))
    finally:
        torch.set_num_threads(before)
