#!/usr/bin/env python
"""Plain forward time of a model before and after 20 inline uses of every processor type.

"Inline" is the transformers habit: ``model.generate(..., logits_processor=[DoLaLogitsProcessor(model)])``
with no ``with`` block and no ``detach()``. Each processor detaches itself once nothing references
it, so the model afterwards must run as fast as before (a processor left attached would keep its
hooks, or for LayerCake run every forward on twice the rows). The script prints, per processor
type, the hooks and attention implementation left on the model, and the median plain-forward time
after its 20 calls over that of an untouched copy of the model made before any processor, measured
in this same run (rounds interleaved, so a drift of the machine hits both alike).

Examples:
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_inline.py            # SmolLM2-135M, CPU
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/bench_inline.py --tiny
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from contrastive_decoding import (
    SLED,
    ActivationDecoding,
    AutoContrastiveLogitsProcessor,
    ContrastLogitsProcessor,
    DeCoLogitsProcessor,
    DoLa,
    DoLaLogitsProcessor,
    InducedContrast,
    LayerCakeLogitsProcessor,
    LowerLayerFusion,
    SLEDLogitsProcessor,
    VistaLogitsProcessor,
    WeightedContrast,
    load_model,
)

PROCESSORS = {
    "DoLaLogitsProcessor": lambda m, c, t: DoLaLogitsProcessor(m, "high"),
    "SLEDLogitsProcessor": lambda m, c, t: SLEDLogitsProcessor(m),
    "AutoContrastiveLogitsProcessor": lambda m, c, t: AutoContrastiveLogitsProcessor(m),
    "DeCoLogitsProcessor": lambda m, c, t: DeCoLogitsProcessor(m),
    "VistaLogitsProcessor": lambda m, c, t: VistaLogitsProcessor(m),
    "LayerCakeLogitsProcessor": lambda m, c, t: LayerCakeLogitsProcessor(m, c),
    "LowerLayerFusion": lambda m, c, t: ContrastLogitsProcessor(m, LowerLayerFusion(), classifier=c),
    "InducedContrast": lambda m, c, t: ContrastLogitsProcessor(m, InducedContrast([5, 6, 7]), tokenizer=t),
    "ActivationDecoding": lambda m, c, t: ContrastLogitsProcessor(m, ActivationDecoding()),
    "WeightedContrast": lambda m, c, t: ContrastLogitsProcessor(m, WeightedContrast([DoLa("high"), SLED()])),
}


def _tiny():
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), None


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _forward_ms(model, ids: torch.Tensor, repeats: int) -> list[float]:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            model(ids)
            times.append((time.perf_counter() - start) * 1000)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random llama instead of SmolLM2")
    parser.add_argument("--calls", type=int, default=20, help="inline generate calls per processor type")
    parser.add_argument("--repeats", type=int, default=30, help="plain forwards timed per measurement")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        model, tokenizer = _tiny()
        classes = lambda ids: ["punctuation" if i % 7 == 0 else "concept" for i in ids]  # noqa: E731
    else:
        model, tokenizer = load_model("smollm2")
        classes = tokenizer
    ids = torch.randint(3, 400, (1, 64))
    short = ids[:, :8]
    untouched = copy.deepcopy(model)
    fresh_hooks, fresh_attn = _hooks(model), model.config._attn_implementation
    _forward_ms(model, ids, 3)  # warm-up
    _forward_ms(untouched, ids, 3)
    print(f"{'processor':<32} {'hooks left':>10} {'attention':>12} {'forward / fresh':>16}")
    for name, build in PROCESSORS.items():
        for _ in range(args.calls):
            model.generate(
                short, attention_mask=torch.ones_like(short), max_new_tokens=2, min_new_tokens=2,
                do_sample=False, logits_processor=[build(model, classes, tokenizer)],
            )  # fmt: skip
        after, fresh = [], []
        for _ in range(args.repeats // 5):  # interleave the two so drift hits both
            after += _forward_ms(model, ids, 5)
            fresh += _forward_ms(untouched, ids, 5)
        ratio = statistics.median(after) / statistics.median(fresh)
        hooks = _hooks(model) - fresh_hooks
        attn = model.config._attn_implementation
        print(f"{name:<32} {hooks:>10} {attn:>12} {ratio:>15.3f}x")
        if hooks or attn != fresh_attn:
            raise SystemExit(f"{name} left {hooks} hooks and attention {attn!r} on the model")


if __name__ == "__main__":
    main()
