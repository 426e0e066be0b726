"""The strategy registry: parameters, errors, one-entry extension, and generation through it
against the library's own ``dola_generate``."""

from __future__ import annotations

import math

import pytest
import torch
from contrastive_decoding.eval import STRATEGIES, EvalError, RunConfig, StrategyEntry, run_eval
from contrastive_decoding.eval.generation import generate_batch
from contrastive_decoding.eval.strategies import build_strategy, parse_params
from evalkit import (
    char_tokenizer,
    one_thread,  # noqa: F401 - autouse fixture
    read_jsonl,
    tiny_model,
    write_gsm8k_jsonl,
    write_mc_json,
)

from contrastive_decoding import (
    SLED,
    AutoContrastive,
    AutoContrastiveLogitsProcessor,
    DeCo,
    DeCoLogitsProcessor,
    DoLa,
    SLEDLogitsProcessor,
    VistaLogits,
    VistaLogitsProcessor,
    dola_generate,
)

TOKENIZER = char_tokenizer()


def test_parse_params_types():
    assert parse_params(
        ["dola_layers=high", "relative_top=0.05", "final_norm=true", "a=14,16", "b=[1, 2]", "c=3", "d= x y "]
    ) == {
        "dola_layers": "high",
        "relative_top": 0.05,
        "final_norm": True,
        "a": [14, 16],
        "b": [1, 2],
        "c": 3,
        "d": "x y",
    }


@pytest.mark.parametrize("bad", ["dola_layers", "=3", ""])
def test_parse_params_rejects_malformed(bad):
    with pytest.raises(EvalError, match="NAME=VALUE"):
        parse_params([bad])


def test_baseline_and_presets():
    base = build_strategy(tiny_model(), "baseline")
    assert base.scoring is None and base.generate_kwargs == {} and base.repetition_penalty == 1.0
    dola = build_strategy(tiny_model(), "dola-low", {"relative_top": 0.2})
    assert isinstance(dola.scoring, DoLa)
    assert dola.scoring.dola_layers == "low" and dola.scoring.relative_top == 0.2
    assert dola.params["dola_layers"] == "low" and dola.params["divergence"] == "reference"  # defaults filled
    assert dola.repetition_penalty == 1.2  # DoLa's authors' generation setting
    assert callable(dola.generate_kwargs["custom_generate"])


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(EvalError) as exc:
        build_strategy(tiny_model(), "dolla")
    assert "'dolla'" in str(exc.value) and "baseline" in str(exc.value) and "dola-high" in str(exc.value)
    with pytest.raises(EvalError) as exc:
        build_strategy(tiny_model(), "dola", {"layers": "high"})
    assert "layers" in str(exc.value) and "dola_layers" in str(exc.value) and "relative_top" in str(exc.value)
    with pytest.raises(EvalError, match="not a parameter"):
        build_strategy(tiny_model(), "baseline", {"x": 1})
    with pytest.raises(EvalError, match="--strategy dola") as exc:
        build_strategy(tiny_model(), "dola", {"dola_layers": "middle"})
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("layers", ["high", "low", [1, 3]])
def test_generation_through_registry_equals_dola_generate(layers):
    """The registry's generation (the strategy object in the library's generic loop) gives the
    tokens of the library's documented ``custom_generate=dola_generate`` call."""
    model = tiny_model()
    run = build_strategy(model, "dola", {"dola_layers": layers})
    prompt = "Q: What is 2+2?\nA:"
    out = generate_batch(model, TOKENIZER, [prompt], run, max_new_tokens=12)[0]
    enc = TOKENIZER(prompt, return_tensors="pt")
    ids = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}  # no token_type_ids
    with torch.no_grad():
        ref = model.generate(
            **ids,
            custom_generate=dola_generate,
            dola_layers=layers,
            repetition_penalty=1.2,
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
            return_dict_in_generate=True,
        )
    new = ref["sequences"][0, ids["input_ids"].shape[1] :].tolist()
    new = new[: next((i for i, t in enumerate(new) if t in (0, 2)), len(new))]
    assert out.text == TOKENIZER.decode(new, skip_special_tokens=True)
    assert out.n_tokens == len(new)
    used = ref["premature_layers"][0, : len(new)].tolist()
    assert out.layer_counts == {layer: used.count(layer) for layer in sorted(set(used))}


class _Halfway(DoLa):
    """A toy strategy: DoLa with the premature layer fixed at the model's middle block."""

    def __init__(self, scale: float = 1.0):
        super().__init__(dola_layers=3)
        self.scale = scale


class _Lite(DoLa):
    """A toy strategy whose parameters ``dola_generate`` also accepts."""

    def __init__(self, dola_layers="high", relative_top: float = 0.1):
        super().__init__(dola_layers=dola_layers, relative_top=relative_top)


def test_a_new_strategy_is_one_entry(tmp_path, registry):
    from contrastive_decoding.eval import register

    register(StrategyEntry.for_class("halfway", _Halfway, description="toy"))
    register(StrategyEntry.for_class("lite", _Lite, generate=dola_generate))
    for name, params in (("halfway", {"scale": 2.0}), ("lite", {"dola_layers": "low"})):
        for bench, data, kw in (
            ("tfqa-hf", write_mc_json(tmp_path), {}),
            ("gsm8k", write_gsm8k_jsonl(tmp_path), {"max_new_tokens": 3, "limit": 2}),
        ):
            cfg = RunConfig(
                benchmark=bench,
                out=str(tmp_path / f"{name}-{bench}"),
                data=str(data),
                strategy=name,
                params=params,
                progress=False,
                **kw,
            )
            result = run_eval(cfg, model=tiny_model(), tokenizer=TOKENIZER)
            assert result.summary["strategy"] == name
            assert result.summary["strategy_params"] == {**STRATEGIES[name].defaults, **params}
            layers = {int(k) for r in read_jsonl(result.out / "items.jsonl") for k in r["premature_layers"]}
            assert layers == {3} if name == "halfway" else layers <= {0, 2}


def test_generate_callable_must_take_every_given_parameter(registry):
    from contrastive_decoding.eval import register

    def high_only_generate(model, input_ids, logits_processor, stopping_criteria, generation_config,
                           synced_gpus=False, streamer=None, dola_layers="high", **model_kwargs):
        return dola_generate(model, input_ids, logits_processor, stopping_criteria, generation_config,
                             synced_gpus, streamer, dola_layers=dola_layers, **model_kwargs)

    register(StrategyEntry.for_class("dola-gen", DoLa, generate=high_only_generate))
    assert build_strategy(tiny_model(), "dola-gen", {"dola_layers": "low"}).generate_kwargs == {
        "custom_generate": high_only_generate,
        "dola_layers": "low",
    }
    with pytest.raises(EvalError, match="high_only_generate takes no min_tokens_to_keep"):
        build_strategy(tiny_model(), "dola-gen", {"min_tokens_to_keep": 2})
    # The library's own loop is derived from DoLa's declaration: it takes every parameter.
    register(StrategyEntry.for_class("dola-derived", DoLa, generate=dola_generate))
    run = build_strategy(tiny_model(), "dola-derived", {"min_tokens_to_keep": 2})
    assert run.generate_kwargs["min_tokens_to_keep"] == 2


def test_layercake_is_registered_and_generates_like_layercake_generate(tmp_path):
    lc = pytest.importorskip("contrastive_decoding").__dict__.get("layercake_generate")
    if lc is None or "layercake" not in STRATEGIES:
        pytest.skip("this library version has no LayerCake")
    model = tiny_model()
    run = build_strategy(model, "layercake", {"amateur": "average", "beta": 1.0}, tokenizer=TOKENIZER)
    assert run.params["amateur"] == "average" and run.params["beta"] == 1.0
    prompt = "Q: Is water wet?\nA:"
    out = generate_batch(model, TOKENIZER, [prompt], run, max_new_tokens=8)[0]
    enc = TOKENIZER(prompt, return_tensors="pt")
    ids = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}  # no token_type_ids
    with torch.no_grad():
        ref = model.generate(
            **ids,
            custom_generate=lc,
            classifier=TOKENIZER,
            amateur="average",
            beta=1.0,
            repetition_penalty=1.2,
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
        )
    new = ref[0, ids["input_ids"].shape[1] :].tolist()
    new = new[: next((i for i, t in enumerate(new) if t in (0, 2)), len(new))]
    assert out.text == TOKENIZER.decode(new, skip_special_tokens=True)
    cfg = RunConfig(
        benchmark="tfqa-hf",
        out=str(tmp_path / "lc"),
        data=str(write_mc_json(tmp_path)),
        strategy="layercake",
        progress=False,
    )
    result = run_eval(cfg, model=model, tokenizer=TOKENIZER)
    assert result.summary["strategy"] == "layercake" and result.summary["scoring_protocol"] == "paper"


@pytest.mark.parametrize(
    ("name", "params", "cls", "processor"),
    [
        ("vista", {"weight_late": 0.5}, VistaLogits, VistaLogitsProcessor),
        ("acd", {"layer": 2}, AutoContrastive, AutoContrastiveLogitsProcessor),
        ("sled", {"evolution_scale": 10}, SLED, SLEDLogitsProcessor),
        ("deco", {"alpha": 0.5}, DeCo, DeCoLogitsProcessor),
    ],
)
def test_layer_strategies_are_registered(name, params, cls, processor):
    """Registry scoring = the class itself; registry generation = its processor in stock generate."""
    model = tiny_model()
    run = build_strategy(model, name, params, tokenizer=TOKENIZER)
    assert isinstance(run.scoring, cls)
    prompt = "Q: Is water wet?\nA:"
    out = generate_batch(model, TOKENIZER, [prompt], run, max_new_tokens=6, repetition_penalty=1.0)[0]
    enc = TOKENIZER(prompt, return_tensors="pt", return_token_type_ids=False)
    with processor(model, **params) as proc, torch.no_grad():
        ref = model.generate(
            **enc, logits_processor=[proc], max_new_tokens=6, do_sample=False, pad_token_id=0
        )
    new = ref[0, enc["input_ids"].shape[1] :].tolist()
    new = new[: next((i for i, t in enumerate(new) if t in (0, 2)), len(new))]
    assert out.text == TOKENIZER.decode(new, skip_special_tokens=True)


def _registry_vs_processor(run, strategy, prompt="Q: Is water wet?\nA:"):
    """Registry generation (left-padded batch path) = the strategy's ContrastLogitsProcessor in stock
    generate on the same prompt."""
    from contrastive_decoding import ContrastLogitsProcessor

    model = tiny_model()
    out = generate_batch(model, TOKENIZER, [prompt], run, max_new_tokens=6, repetition_penalty=1.0)[0]
    enc = TOKENIZER(prompt, return_tensors="pt", return_token_type_ids=False)
    with ContrastLogitsProcessor(model, strategy, tokenizer=TOKENIZER) as proc, torch.no_grad():
        ref = model.generate(
            **enc, logits_processor=[proc], max_new_tokens=6, do_sample=False, pad_token_id=0
        )
    new = ref[0, enc["input_ids"].shape[1] :].tolist()
    new = new[: next((i for i, t in enumerate(new) if t in (0, 2)), len(new))]
    assert out.text == TOKENIZER.decode(new, skip_special_tokens=True)


def test_icd_and_lol_are_registered():
    from contrastive_decoding import InducedContrast, LowerLayerFusion

    model = tiny_model()
    run = build_strategy(model, "icd", {"instruction": "Lie.\n"}, tokenizer=TOKENIZER)
    assert isinstance(run.scoring, InducedContrast) and run.params["instruction"] == "Lie.\n"
    _registry_vs_processor(run, InducedContrast(instruction="Lie.\n"))
    run = build_strategy(model, "lol-prompt", {"amateur_instruction": "Lie.\n"}, tokenizer=TOKENIZER)
    assert isinstance(run.scoring, LowerLayerFusion) and run.params["amateur"] == "prompt"
    _registry_vs_processor(run, LowerLayerFusion(amateur="prompt", amateur_instruction="Lie.\n"))


def test_activation_is_registered_and_runs_in_the_harness(tmp_path):
    from contrastive_decoding import ActivationDecoding

    model = tiny_model()
    params = {"alpha": 2.0, "context": "all", "relative_top": None}
    run = build_strategy(model, "activation", params, tokenizer=TOKENIZER)
    assert isinstance(run.scoring, ActivationDecoding) and run.params["context"] == "all"
    assert run.params["info_layer"] is None  # the paper's 26/32 of the depth, recorded as the default
    _registry_vs_processor(run, ActivationDecoding(**params))
    with pytest.raises(EvalError, match="context"):
        build_strategy(model, "activation", {"context": "everything"}, tokenizer=TOKENIZER)
    # One MC item end to end through the harness (run_eval scores with score_continuations).
    data = write_mc_json(tmp_path)
    cfg = RunConfig(benchmark="tfqa-hf", out=str(tmp_path / "ad"), data=str(data), strategy="activation",
                    params=params, progress=False)  # fmt: skip
    result = run_eval(cfg, model=model, tokenizer=TOKENIZER)
    assert result.summary["complete"]
    record = read_jsonl(tmp_path / "ad" / "items.jsonl")[0]
    assert set(record["metrics"]) == {"mc1", "mc2"}
    assert all(math.isfinite(x) for x in record["scores_mc1"] + record["scores_mc2"])


def test_lol_refocus_is_put_in_front_of_every_prompt(tmp_path):
    # The harness puts the refocus first (the amateur replaces it); scores equal scoring the
    # refocused prompt directly.
    from contrastive_decoding import LowerLayerFusion, score_continuations

    model = tiny_model()
    params = {"amateur": "prompt", "refocus": "Be true.\n", "amateur_instruction": "Lie.\n"}
    data = write_mc_json(tmp_path)
    cfg = RunConfig(benchmark="tfqa-hf", out=str(tmp_path / "lol"), data=str(data), strategy="lol",
                    params=params, progress=False)  # fmt: skip
    result = run_eval(cfg, model=model, tokenizer=TOKENIZER)
    assert result.summary["complete"] and result.summary["strategy_params"]["refocus"] == "Be true.\n"
    record = read_jsonl(tmp_path / "lol" / "items.jsonl")[0]
    assert record["metrics"]  # scored without the "row does not start with the refocus" error
    strategy = LowerLayerFusion(**params)
    prompt = strategy.refocus_prompt("Q: x?\nA:")
    direct = score_continuations(model, TOKENIZER, prompt, [" yes", " no"], strategy=strategy)
    assert all(torch.isfinite(torch.tensor(s.total)) for s in direct)


def test_cd_loads_the_amateur_and_refuses_a_different_vocabulary(tmp_path):
    from conftest import build_model

    from contrastive_decoding import ContrastiveDecoding

    model = tiny_model()
    with pytest.raises(EvalError, match="--param amateur="):
        build_strategy(model, "cd", {}, tokenizer=TOKENIZER)
    small = build_model("llama", seed=3, vocab_size=model.config.vocab_size, num_hidden_layers=2)
    small.save_pretrained(tmp_path / "small")
    TOKENIZER.save_pretrained(tmp_path / "small")
    run = build_strategy(model, "cd", {"amateur": str(tmp_path / "small")}, tokenizer=TOKENIZER)
    assert run.params["amateur"] == str(tmp_path / "small") and run.params["amateur_temperature"] == 0.5
    _registry_vs_processor(run, ContrastiveDecoding(run.scoring.amateur_stream().model))
    other = build_model("llama", seed=3, vocab_size=model.config.vocab_size + 8, num_hidden_layers=2)
    other.save_pretrained(tmp_path / "other")
    TOKENIZER.save_pretrained(tmp_path / "other")
    with pytest.raises(EvalError, match="same tokenizer"):
        build_strategy(model, "cd", {"amateur": str(tmp_path / "other")}, tokenizer=TOKENIZER)
