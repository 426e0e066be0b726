"""How a request or an engine names a strategy (no vLLM needed): names, presets, parameters,
penalties and the refusals, checked against the registry and a model layout."""

from __future__ import annotations

import json

import pytest

from contrastive_decoding.backends.vllm.engine import engine_arguments, model_layout
from contrastive_decoding.backends.vllm.models import UnsupportedModelError
from contrastive_decoding.backends.vllm.selection import (
    FRONTEND_ENV,
    Layout,
    engine_settings,
    frontend_context,
    request_args,
    select,
)
from contrastive_decoding.backends.vllm.serve import server_command
from contrastive_decoding.strategies import make_strategy
from contrastive_decoding.strategies.dola import dola_candidate_layers

LAYOUT = Layout(num_layers=12, tied_embeddings=True, vocab_size=96, captured=tuple(range(12)))


def test_preset_means_what_it_means_in_the_harness():
    selection = select({"contrast": "dola-high"}, None, LAYOUT)
    assert selection.strategy.params() == make_strategy("dola-high").params()
    assert list(selection.layers) == dola_candidate_layers("high", 12, True)
    assert selection.repetition_penalty == 1.2  # DoLa's registered penalty, after the contrast


def test_request_parameters_and_penalty_override():
    args = request_args("dola", dola_layers=[3, 5], relative_top=0.2, repetition_penalty=1.0)
    selection = select(args, None, LAYOUT)
    assert selection.layers == (3, 5)
    assert selection.strategy.relative_top == 0.2
    assert selection.repetition_penalty == 1.0


def test_engine_default_and_its_per_request_overrides():
    engine = engine_settings("dola-low", repetition_penalty=1.1)
    assert select({}, engine, LAYOUT).name == "dola-low"
    assert select({}, engine, LAYOUT).repetition_penalty == 1.1
    assert select({"contrast_relative_top": 0.3}, engine, LAYOUT).strategy.relative_top == 0.3
    assert select({"contrast": "none"}, engine, LAYOUT) is None
    assert select({"contrast": "sled"}, engine, LAYOUT).name == "sled"
    assert select({"unrelated": 1}, None, LAYOUT) is None  # other plugins' keys are not ours


def test_equal_settings_share_one_strategy():
    cache = {}
    a = select({"contrast": "dola", "contrast_dola_layers": [2, 4]}, None, LAYOUT, cache)
    b = select({"contrast": "dola", "contrast_dola_layers": [2, 4]}, None, LAYOUT, cache)
    c = select({"contrast": "dola", "contrast_dola_layers": [2, 6]}, None, LAYOUT, cache)
    assert a is b and a is not c


def test_boolean_parameters_from_the_http_api():
    # vllm_xargs carry strings and numbers only
    assert (
        select({"contrast": "dola", "contrast_final_norm": "true"}, None, LAYOUT).strategy.final_norm is True
    )


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ({"contrast": "dolla"}, "Unknown strategy 'dolla'"),
        ({"contrast": 3}, "must be a strategy name"),
        ({"contrast": "dola", "contrast_relative_tpo": 0.1}, "contrast_relative_top"),
        ({"contrast": "dola", "contrast_relative_top": 2.0}, "relative_top"),
        ({"contrast": "dola", "contrast_dola_layers": [40]}, "outside 0..11"),
        ({"contrast": "dola-low", "contrast_dola_layers": "high"}, "use strategy 'dola'"),
        ({"contrast": "dola", "contrast_repetition_penalty": 0}, "contrast_repetition_penalty"),
        ({"contrast_relative_top": 0.2}, "add `contrast`"),
        ({"contrast": "none", "contrast_relative_top": 0.2}, "turns the contrast off"),
        ({"contrast": "layercake"}, "degraded attention streams"),
        ({"contrast": "icd"}, "amateur stream"),
        ({"contrast": "activation"}, "context entropy"),
    ],
)
def test_bad_requests_are_refused_with_the_key_to_fix(args, fragment):
    with pytest.raises(ValueError, match=None) as info:
        select(args, None, LAYOUT)
    assert fragment in str(info.value)


def test_uncaptured_layers_are_refused():
    narrow = Layout(12, True, 96, captured=(4, 8))
    assert select({"contrast": "dola", "contrast_dola_layers": [4, 8]}, None, narrow).layers == (4, 8)
    with pytest.raises(ValueError, match="does not capture"):
        select({"contrast": "dola-high"}, None, narrow)


def test_without_a_layout_only_layer_ranges_wait_for_the_worker():
    assert select({"contrast": "dola", "contrast_dola_layers": [99]}, None, None).layers == ()
    with pytest.raises(ValueError, match="degraded attention streams"):
        select({"contrast": "layercake"}, None, None)


def test_frontend_context_round_trip(monkeypatch, tmp_path):
    config = _llama_folder(tmp_path)
    _, frontend = engine_arguments(str(config), "dola-high")
    monkeypatch.setenv(FRONTEND_ENV, frontend)
    engine, layout = frontend_context()
    assert engine["strategy"] == "dola-high"
    assert layout == Layout(6, False, 96, tuple(range(6)))


def _llama_folder(tmp_path, family="llama"):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from tests.conftest import build_config

    config = build_config(family)
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.save_pretrained(tmp_path)
    return tmp_path


def test_engine_arguments_select_the_contrast_class(tmp_path):
    folder = _llama_folder(tmp_path)
    arguments, _ = engine_arguments(str(folder), "dola", {"dola_layers": [2, 4]}, layers=[4, 2])
    assert arguments["hf_overrides"]["architectures"] == ["ContrastLlamaForCausalLM"]
    settings = arguments["hf_overrides"]["contrastive_decoding"]
    assert settings == {"strategy": "dola", "params": {"dola_layers": [2, 4]}, "layers": [2, 4]}
    with pytest.raises(ValueError, match=r"reads layers \[0, 1, 3, 5\], which this engine does not capture"):
        engine_arguments(str(folder), "sled", layers=[2, 4])
    assert model_layout(str(folder))[1].num_layers == 6


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(strategy="dola", strategy_params={"dola_layers": [7]}), "outside 0..5"),
        (dict(strategy="lol"), "the vLLM backend runs strategies"),
        (dict(strategy="dola-high", layers=[9]), "outside 0..5"),
        (dict(strategy_params={"relative_top": 0.2}), "without a `strategy`"),
    ],
)
def test_engine_arguments_refuse_before_any_engine_starts(tmp_path, kwargs, fragment):
    with pytest.raises(ValueError) as info:
        engine_arguments(str(_llama_folder(tmp_path)), **kwargs)
    assert fragment in str(info.value)


def test_unsupported_architecture_is_refused_at_load(tmp_path):
    folder = _llama_folder(tmp_path, "gpt_neox")
    with pytest.raises(
        UnsupportedModelError, match="GPTNeoXForCausalLM is not supported by the vLLM backend"
    ):
        engine_arguments(str(folder), "dola-high")


def test_server_command_carries_the_plugin_arguments(tmp_path):
    folder = _llama_folder(tmp_path)
    command, env = server_command(
        ["--model", str(folder), "--strategy", "dola", "--param", "dola_layers=[2,4]", "--port", "8123"]
    )
    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    overrides = json.loads(command[command.index("--hf-overrides") + 1])
    assert overrides["contrastive_decoding"]["params"] == {"dola_layers": [2, 4]}
    assert command[-2:] == ["--port", "8123"]  # vLLM's own arguments pass through
    assert json.loads(env[FRONTEND_ENV])["layout"]["num_layers"] == 6
    with pytest.raises(ValueError, match="set by contrastive-decoding serve"):
        server_command(["--model", str(folder), "--logits-processors", "x:y"])
    merged, _ = server_command(["--model", str(folder), "--hf-overrides", '{"rope_theta": 5.0}'])
    assert json.loads(merged[merged.index("--hf-overrides") + 1])["rope_theta"] == 5.0
    for bad in (["--hf-overrides"], ["--hf-overrides", "{bad"], ["--hf-overrides=[1]"]):
        with pytest.raises(ValueError, match="--hf-overrides .*give a JSON object"):
            server_command(["--model", str(folder), *bad])
    listed, _ = server_command(["--model", str(folder), "--strategy", "dola", "--param", "dola_layers=2,4"])
    overrides = json.loads(listed[listed.index("--hf-overrides") + 1])
    assert overrides["contrastive_decoding"]["params"] == {"dola_layers": [2, 4]}  # as the harness's --param
