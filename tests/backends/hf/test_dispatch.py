"""Models dispatched with a ``device_map`` (accelerate's hooks; blocks and head offloaded to CPU
memory or to disk) give the same tokens and scores as the same model undispatched, for every
strategy family: layer exits, degraded streams, amateurs and context entropy.

On a CPU-only machine "cpu" and "disk" are the two places weights can live; each offloaded module
runs through accelerate's ``AlignDevicesHook``, which loads its weights inside its own forward (the
parameters sit on the ``meta`` device in between) -- the same code path as a model split across
GPUs with offloading.
"""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, char_tokenizer, prompt_ids, strategy_settings
from transformers import AutoModelForCausalLM

from contrastive_decoding import (
    ContrastLogitsProcessor,
    LayerReadout,
    score_continuations,
    strategy_generate,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = char_tokenizer()
FAMILIES = ["llama", "gpt2", "gemma2", "opt", "gpt_neox", "qwen2"]
STEPS = 4

STRATEGIES = strategy_settings()


def _device_map(model: torch.nn.Module) -> dict[str, str]:
    """Every module with weights of its own: the second half of the blocks and the head (unless
    tied to the embeddings) on "disk", everything else on "cpu"."""
    readout = LayerReadout.from_model(model)
    names = {module: name for name, module in model.named_modules()}
    blocks = list(readout.layers)
    half = len(blocks) // 2
    placed = {names[b]: ("cpu" if i < half else "disk") for i, b in enumerate(blocks)}
    head_tied = readout.head.weight is model.get_input_embeddings().weight
    device_map: dict[str, str] = {}
    for name, module in model.named_modules():
        if not [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            continue
        block = next((prefix for prefix in placed if name == prefix or name.startswith(prefix + ".")), None)
        if block is not None:
            device_map[block] = placed[block]
        elif module is readout.head and not head_tied:
            device_map[name] = "disk"
        else:
            device_map[name] = "cpu"
    return device_map


_PAIRS: dict[str, tuple] = {}


def _pair(family: str, tmp_path_factory) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The family's tiny model and the same weights loaded with a device_map that offloads."""
    if family not in _PAIRS:
        model = build_model(family)
        folder = tmp_path_factory.mktemp(f"dispatch-{family}")
        model.save_pretrained(folder)
        plain = AutoModelForCausalLM.from_pretrained(folder).eval()
        dispatched = AutoModelForCausalLM.from_pretrained(
            folder, device_map=_device_map(plain), offload_folder=str(folder / "offload")
        ).eval()
        assert any(p.is_meta for p in dispatched.parameters()), "nothing was offloaded"
        _PAIRS[family] = (plain, dispatched)
    return _PAIRS[family]


def _generate(model, strategy) -> torch.Tensor:
    with ContrastLogitsProcessor(model, strategy, tokenizer=TOKENIZER) as proc:
        return model.generate(
            prompt_ids(batch=2),
            attention_mask=torch.ones(2, 7, dtype=torch.long),
            logits_processor=[proc],
            max_new_tokens=STEPS,
            min_new_tokens=STEPS,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )


_AMATEUR = build_model("llama", seed=1, num_hidden_layers=2)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_processor_tokens_and_scores_equal_the_undispatched_model(name, family, tmp_path_factory):
    plain, dispatched = _pair(family, tmp_path_factory)
    amateur = _AMATEUR if family in ("llama", "qwen2", "gemma2") else build_model(family, seed=1)
    expected = _generate(plain, STRATEGIES[name](amateur))
    got = _generate(dispatched, STRATEGIES[name](amateur))
    assert torch.equal(got.sequences, expected.sequences)
    for a, b in zip(got.scores, expected.scores, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("protocol", ["paper", "normalized"])
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_scores_of_continuations_equal_the_undispatched_model(name, protocol, family, tmp_path_factory):
    plain, dispatched = _pair(family, tmp_path_factory)
    amateur = _AMATEUR if family == "llama" else build_model(family, seed=1)
    args = ("Q: Where is Paris? A:", [" In France.", " Rome", " x"])
    expected, got = (
        score_continuations(model, TOKENIZER, *args, strategy=STRATEGIES[name](amateur), protocol=protocol)
        for model in (plain, dispatched)
    )
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.token_scores, e.token_scores, rtol=1e-5, atol=1e-5)
        assert g.premature_layers == e.premature_layers


@pytest.mark.parametrize("name", ["dola", "layercake", "icd"])
def test_generate_loop_equals_the_undispatched_model(name, tmp_path_factory):
    plain, dispatched = _pair("llama", tmp_path_factory)
    kwargs = dict(
        custom_generate=strategy_generate,
        strategy_tokenizer=TOKENIZER,
        max_new_tokens=STEPS,
        min_new_tokens=STEPS,
        do_sample=False,
    )
    ids = prompt_ids(batch=2)
    expected = plain.generate(ids, strategy=STRATEGIES[name](_AMATEUR), **kwargs)
    got = dispatched.generate(ids, strategy=STRATEGIES[name](_AMATEUR), **kwargs)
    assert torch.equal(got, expected)
