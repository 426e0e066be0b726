#!/usr/bin/env python
"""Greedy tokens of DoLa, ICD and WeightedContrast mixes of them on SmolLM2, for one prompt.

DoLa's contrast of uncalibrated early exits spans thousands of nats per token, ICD's about one.
For each mix, ``WeightedContrast([(1, DoLa("high")), (0.5, InducedContrast())], scale=...)`` with
raw scores, log-softmaxed parts and standardized parts, the script prints whether it decodes
exactly DoLa's tokens, and every text.

Example:
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/demo_mix_scales.py
"""

from __future__ import annotations

import torch

from contrastive_decoding import ContrastLogitsProcessor, DoLa, InducedContrast, WeightedContrast, load_model

PROMPT = "Q: What happens to you if you eat watermelon seeds?\nA:"


def main() -> None:
    torch.set_num_threads(1)
    model, tokenizer = load_model()
    inputs = tokenizer(PROMPT, return_tensors="pt")

    def tokens(strategy) -> torch.Tensor:
        with ContrastLogitsProcessor(model, strategy, tokenizer=tokenizer) as proc:
            out = model.generate(**inputs, max_new_tokens=24, do_sample=False, logits_processor=[proc])
        return out[0, inputs["input_ids"].shape[1] :]

    parts = [(1.0, DoLa("high")), (0.5, InducedContrast())]
    runs = {"DoLa high": tokens(DoLa("high")), "ICD": tokens(InducedContrast())}
    for scale in ("raw", "log_softmax", "standardize"):
        runs[f"mix, scale={scale}"] = tokens(WeightedContrast(parts, scale=scale))
    for name, ids in runs.items():
        same = "= DoLa's tokens" if torch.equal(ids, runs["DoLa high"]) else "differs from DoLa"
        print(f"{name:<24} {same:<18} {tokenizer.decode(ids)!r}")


if __name__ == "__main__":
    main()
