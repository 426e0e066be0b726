"""Each model family the vLLM backend reads (through vLLM's aux-hidden-state hook, or forward hooks
on its decoder blocks) gives the tokens of this library's transformers backend, on a tiny random
model in fp32: one engine per family, one batch mixing DoLa (dynamic and static), SLED and plain
requests of different lengths. Runs in the vLLM virtualenv (see test_vllm_engine.py)."""

from __future__ import annotations

import gc
import os

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; scripts/test.sh runs this in .venv-vllm")

import torch  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

from contrastive_decoding import make_strategy, strategy_generate  # noqa: E402
from contrastive_decoding.backends.vllm.selection import request_args  # noqa: E402
from tests.conftest import build_model  # noqa: E402

TOKENS = 8
# Sizes vLLM's CPU attention accepts (head size 64); six layers so that DoLa's buckets hold several.
SIZES = {
    "llama": dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1),
    "mistral": dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1),
    "qwen2": dict(hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1),
    "qwen3": dict(
        hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=64
    ),
    "gemma": dict(
        hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1, head_dim=64
    ),
    "gpt2": dict(n_embd=128, n_head=2),
}
PROMPTS = [[1, 17, 33, 5, 60, 22, 9], [1, 40, 41], [1, 8, 8, 70, 12, 33, 5, 90, 14, 3, 27, 61, 44]]
REQUESTS = [  # (prompt index, request name, its parameters), penalty 1.0 (checked elsewhere)
    (0, "dola-low", {}),
    (1, "dola", {"dola_layers": 3}),
    (2, "sled", {}),
    (1, None, {}),
]


def _folder(tmp_path_factory, family):
    model = build_model(family, **SIZES[family])
    model.config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model.config.model_type]]
    folder = tmp_path_factory.mktemp(family)
    model.save_pretrained(folder)
    model.generation_config.eos_token_id = None  # the reference runs all TOKENS steps, as ignore_eos
    return model, str(folder)


def _reference(model, prompt, name, params):
    ids = torch.tensor([prompt])
    kwargs = dict(max_new_tokens=TOKENS, do_sample=False)
    if name is not None:
        kwargs.update(custom_generate=strategy_generate, strategy=make_strategy(name, **params))
    return model.generate(ids, **kwargs)[0, ids.shape[1] :].tolist()


# An engine per family takes about a minute on 2 cores: CI runs one family per code path (Llama's
# aux hook, Qwen3's own model code, GPT-2's forward hooks); CD_VLLM_ALL_FAMILIES=1 runs all six.
CI_FAMILIES = ("llama", "qwen3", "gpt2")
FAMILIES = list(SIZES) if os.environ.get("CD_VLLM_ALL_FAMILIES") else list(CI_FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_the_transformers_backend(tmp_path_factory, family):
    from contrastive_decoding.vllm import LLM

    torch.set_num_threads(1)
    model, folder = _folder(tmp_path_factory, family)
    expected = [_reference(model, PROMPTS[i], name, params) for i, name, params in REQUESTS]
    llm = LLM(
        folder,
        dtype="float32",
        max_model_len=128,
        gpu_memory_utilization=0.05,
        skip_tokenizer_init=True,
        enforce_eager=True,
        seed=0,
        # scripts/gpu_check.sh sets 2 where two GPUs are lent (the models' 2 heads divide by 2)
        tensor_parallel_size=int(os.environ.get("CD_VLLM_TP", "1")),
    )
    try:
        params = [
            SamplingParams(
                temperature=0,
                max_tokens=TOKENS,
                ignore_eos=True,
                detokenize=False,
                extra_args=request_args(
                    name or "none", **({} if name is None else {"repetition_penalty": 1.0}), **p
                ),
            )
            for _, name, p in REQUESTS
        ]
        outputs = llm.generate([TokensPrompt(prompt_token_ids=PROMPTS[i]) for i, _, _ in REQUESTS], params)
    finally:
        del llm
        gc.collect()
    assert [list(o.outputs[0].token_ids) for o in outputs] == expected
