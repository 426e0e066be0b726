"""The equivalence checks of DoLa, LayerCake, scoring and the prompt cache on every device torch
sees (``device`` fixture: the CPU always, CUDA where available), and, on CUDA, that a processor's
decoding step never waits for the host (``torch.cuda.set_sync_debug_mode("error")``).

On a CPU-only machine these run on the CPU alone; ``bash scripts/gpu_check.sh`` runs them on a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_model, char_tokenizer, on_device, prompt_ids
from reference_impl import dola_greedy, layercake_greedy

from contrastive_decoding import (
    DoLa,
    DoLaLogitsProcessor,
    LayerCake,
    LayerCakeLogitsProcessor,
    LayerReadout,
    PromptCache,
    dola_generate,
    layercake_generate,
    score_continuations,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = char_tokenizer()
STEPS = 5
FAMILIES = ["llama", "gpt2", "gemma2"]
_BASE = {family: build_model(family) for family in FAMILIES}


def _greedy(model, ids, **kwargs):
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
        **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dola_layers", ["high", [1, 3]])
def test_dola_processor_and_loop_match_the_uncached_reference(device, family, dola_layers):
    model = on_device(_BASE[family], device)
    ids = prompt_ids().to(device)
    layers = DoLa(dola_layers).premature_layers(LayerReadout.from_model(model))
    expected, history = dola_greedy(model, ids, layers, STEPS)
    with DoLaLogitsProcessor(model, dola_layers=dola_layers) as proc:
        got = _greedy(model, ids, logits_processor=[proc])
        assert proc.chosen_layers[:, 0].tolist() == [h[0] for h in history]
    assert got.tolist() == expected.tolist()
    loop = _greedy(model, ids, custom_generate=dola_generate, dola_layers=dola_layers)
    assert loop.tolist() == expected.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_layercake_processor_and_loop_match_the_reference(device, family):
    model = on_device(_BASE[family], device)
    ids = torch.tensor([TOKENIZER("Q: Why is the sky blue? A:")["input_ids"]], device=device)
    strategy = LayerCake()
    streams = strategy.degraded_streams(LayerReadout.from_model(model))
    expected = layercake_greedy(model, TOKENIZER, ids, streams, strategy.beta, strategy.relative_top, STEPS)
    with LayerCakeLogitsProcessor(model, TOKENIZER) as proc:
        assert torch.equal(_greedy(model, ids, logits_processor=[proc]), expected)
    loop = _greedy(model, ids, custom_generate=layercake_generate, classifier=TOKENIZER)
    assert torch.equal(loop, expected)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", [None, DoLa("high"), LayerCake()], ids=["plain", "dola", "layercake"])
def test_scores_and_prompt_cache_equal_the_cpu_scores(device, family, strategy):
    """Scoring on the device equals scoring on the CPU, with and without a cached primer."""
    primer = "Q: What is 2+2?\nA: 4.\n\n"
    args = (primer + "Q: Where is Paris?\nA:", [" In France.", " Rome", " x"])
    on_cpu = score_continuations(_BASE[family], TOKENIZER, *args, strategy=strategy)
    model = on_device(_BASE[family], device)
    plain = score_continuations(model, TOKENIZER, *args, strategy=strategy)
    cached = score_continuations(
        model, TOKENIZER, *args, strategy=strategy, prompt_cache=PromptCache(primer)
    )
    for cpu, dev, with_cache in zip(on_cpu, plain, cached, strict=True):
        torch.testing.assert_close(dev.token_scores.cpu(), cpu.token_scores, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(with_cache.token_scores, dev.token_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the check is of host syncs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dola_step_never_waits_for_the_host(dtype):
    """The processor's step (hooks during the forward, then ``__call__``) runs under
    ``set_sync_debug_mode("error")``: any ``.item()``, ``.tolist()`` or ``.cpu()`` there raises."""
    model = copy.deepcopy(_BASE["llama"]).to("cuda", dtype)
    ids = prompt_ids(batch=2).cuda()
    with DoLaLogitsProcessor(model, "high") as proc, torch.no_grad():
        logits = model(ids).logits[:, -1].float()  # warm-up: lazy inits may sync once
        proc(ids, logits)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                logits = model(ids).logits[:, -1].float()
                proc(ids, logits)
        finally:
            torch.cuda.set_sync_debug_mode("default")
