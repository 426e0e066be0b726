"""The README's "write your own strategy" block, executed as written on tiny models, against a
reference computed here from ``output_hidden_states`` and the formula by hand."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import char_tokenizer
from reference_impl import early_exit

pytestmark = pytest.mark.usefixtures("one_thread")

README = Path(__file__).resolve().parents[1] / "README.md"
PROMPT = "Q: What is the capital of France? A:"


def _readme_block() -> str:
    text = README.read_text()
    match = re.search(
        r"<!-- user-strategy:start -->\s*```python\n(.*?)```\s*<!-- user-strategy:end -->", text, re.S
    )
    assert match, "README lost its user-strategy block"
    return match.group(1)


def test_readme_block_is_about_twenty_lines():
    lines = [line for line in _readme_block().splitlines() if line.strip()]
    assert len(lines) <= 26


@torch.no_grad()
def _reference_scores(model, ids, layers=(1, 3), alpha=0.5, relative_top=0.1):
    out = model(ids, output_hidden_states=True, use_cache=False)
    final = F.log_softmax(out.logits[:, -1].double(), -1)
    early = torch.stack(
        [F.log_softmax(early_exit(model, out.hidden_states[j][:, -1]).double(), -1) for j in layers]
    ).mean(0)
    raw = final - alpha * early
    keep = final >= final.max(-1, keepdim=True).values + torch.log(
        torch.tensor(relative_top, dtype=torch.float64)
    )
    return raw, keep


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "opt"])
def test_readme_strategy_matches_hand_reference(family):
    from conftest import build_model

    model, tokenizer = build_model(family), char_tokenizer()
    # Like real causal-LM tokenizers, return no token_type_ids (transformers 4.57's generate rejects them).
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    namespace = {"model": model, "tokenizer": tokenizer, "prompt": PROMPT}
    exec(compile(_readme_block(), str(README), "exec"), namespace)

    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    for _ in range(8):
        raw, keep = _reference_scores(model, ids)
        nxt = torch.where(keep, raw, -torch.inf).argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
        if int(nxt) == model.generation_config.eos_token_id:
            break
    out, same = namespace["out"], namespace["same"]
    assert out.tolist() == ids.tolist()
    assert same.tolist() == ids.tolist()

    prompt_ids = tokenizer(PROMPT)["input_ids"]
    for result in namespace["scores"]:
        full = torch.tensor([prompt_ids + result.token_ids])
        expected = 0.0
        for k, token in enumerate(result.token_ids):
            raw, _ = _reference_scores(model, full[:, : len(prompt_ids) + k])
            expected += float(raw[0, token])
        assert result.total == pytest.approx(expected, rel=1e-4, abs=1e-4)
