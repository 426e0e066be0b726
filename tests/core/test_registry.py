"""The strategy registry: one declaration (the class's ``__init__``) read by every front-end."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import cached_model
from contrastive_decoding.eval.strategies import STRATEGIES, check_strategy

from contrastive_decoding import (
    ContrastStrategy,
    DoLa,
    DoLaLogitsProcessor,
    LayerCake,
    get_strategy,
    layercake_generate,
    make_strategy,
    register_strategy,
    registered_strategies,
)
from contrastive_decoding.backends.hf.frontends import generate_function, logits_processor_class
from contrastive_decoding.backends.hf.named import dola_generate
from contrastive_decoding.core.contract import declared_parameters

BUILT_IN = {"acd", "activation", "cd", "deco", "dola", "icd", "layercake", "lol", "sled", "vista"}


class Scaled(ContrastStrategy):
    """A toy strategy: the final logits times ``factor``."""

    def __init__(self, factor: float = 2.0, shift: int | None = None) -> None:
        self.factor = factor
        self.shift = shift

    def combine(self, inputs):
        return inputs.final * self.factor


def test_every_library_strategy_is_registered_once_with_its_class():
    found = registered_strategies()
    assert BUILT_IN <= set(found)
    classes = [found[name].strategy_class for name in BUILT_IN]
    assert len(set(classes)) == len(classes)
    assert found["dola"].strategy_class is DoLa and found["layercake"].strategy_class is LayerCake


def test_parameters_are_the_init_signature():
    """Names and defaults come from ``__init__`` itself, read a second way here with inspect."""
    for name, info in registered_strategies().items():
        signature = inspect.signature(info.strategy_class.__init__).parameters
        expected = {
            k: (None if p.default is p.empty else p.default) for k, p in signature.items() if k != "self"
        }
        assert info.defaults == expected, name


def test_kinds_are_read_from_annotations():
    kinds = get_strategy("dola").kinds
    assert kinds["relative_top"] == "number" and kinds["final_norm"] == "bool"
    assert kinds["min_tokens_to_keep"] == "int" and "dola_layers" not in kinds
    assert get_strategy("layercake").kinds["concept_gate"] == "number?"


def test_presets_resolve_and_refuse_an_override_of_their_own_parameter():
    assert make_strategy("dola-high").dola_layers == "high"
    assert make_strategy("dola-low", relative_top=0.2).relative_top == 0.2
    assert make_strategy("dola-low", dola_layers="low").dola_layers == "low"  # the same value is fine
    with pytest.raises(ValueError, match="use strategy 'dola' instead"):
        make_strategy("dola-low", dola_layers="high")


def test_unknown_names_and_parameters_are_named():
    with pytest.raises(KeyError, match="valid: .*dola-high"):
        make_strategy("dolla")
    with pytest.raises(TypeError, match="`beta`: not a parameter of strategy 'dola'"):
        make_strategy("dola", beta=1.0)


def test_repr_shows_every_declared_parameter():
    for name, info in registered_strategies().items():
        if name == "cd":
            continue  # needs a loaded amateur model
        text = repr(info.strategy_class())
        for parameter in declared_parameters(info.strategy_class):
            assert f"{parameter}=" in text, (name, parameter, text)


def test_registration_is_refused_for_bad_names_and_clashes(registry):
    with pytest.raises(ValueError, match="letters, digits"):
        register_strategy("has space")(Scaled)
    with pytest.raises(ValueError, match="registered already"):
        register_strategy("dola")(Scaled)
    with pytest.raises(ValueError, match="registered already"):
        register_strategy("scaled", presets={"dola-high": {}})(Scaled)
    with pytest.raises(ValueError, match="ContrastStrategy subclass"):
        register_strategy("not-a-strategy")(dict)


def test_a_registered_strategy_is_a_harness_name_with_its_declared_parameters(registry):
    register_strategy("scaled", presets={"scaled-3": {"factor": 3.0}})(Scaled)
    assert "scaled" in STRATEGIES and STRATEGIES["scaled"].defaults == {"factor": 2.0, "shift": None}
    assert check_strategy("scaled-3") == ("scaled", {"factor": 3.0})
    assert STRATEGIES["scaled"].kinds == {"factor": "number", "shift": "int?"}


def test_derived_front_ends_take_the_declared_parameters():
    """The processor and the loop are built from the declaration: same names, same defaults."""
    declared = declared_parameters(DoLa)
    processor = inspect.signature(DoLaLogitsProcessor.__init__).parameters
    loop = inspect.signature(dola_generate).parameters
    for name, p in declared.items():
        assert processor[name].default == p.default and loop[name].default == p.default
    assert "min_tokens_to_keep" in loop  # the hand-written loop of old lacked it
    assert "min_tokens_to_keep" in inspect.signature(layercake_generate).parameters
    assert DoLaLogitsProcessor.strategy_class is DoLa


def test_derived_processor_builds_the_same_strategy_positionally_and_by_keyword():
    model = cached_model("llama")
    with DoLaLogitsProcessor(model, [1, 3], 0.2) as p:
        assert p.strategy.dola_layers == [1, 3] and p.strategy.relative_top == 0.2
    with pytest.raises(ValueError, match="relative_top"):
        DoLaLogitsProcessor(model, relative_top=2.0)
    ScaledProcessor = logits_processor_class(Scaled)
    with ScaledProcessor(model, factor=3.0) as p:
        assert isinstance(p.strategy, Scaled) and p.strategy.factor == 3.0
    loop = generate_function(Scaled)
    ids = torch.tensor([[1, 5, 9]])
    out = model.generate(ids, custom_generate=loop, factor=3.0, max_new_tokens=3, do_sample=False)
    plain = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, plain)  # scaling the logits keeps the argmax: stock greedy is the reference


def test_the_environment_names_strategy_modules_for_new_processes(tmp_path):
    """How `lm_eval` or `accelerate launch` workers learn a user's strategy: the environment."""
    import os
    import subprocess
    import sys

    plugin = tmp_path / "mine.py"
    plugin.write_text(
        "from contrastive_decoding import ContrastStrategy, register_strategy\n\n\n"
        "@register_strategy('from-env')\n"
        "class FromEnv(ContrastStrategy):\n"
        "    '''A toy.'''\n\n"
        "    def combine(self, inputs):\n"
        "        return inputs.final\n"
    )
    code = "from contrastive_decoding.strategies import get_strategy; print(get_strategy('from-env').name)"
    env = {**os.environ, "CONTRASTIVE_DECODING_STRATEGIES": str(plugin)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "from-env", done.stderr
    env["CONTRASTIVE_DECODING_STRATEGIES"] = str(tmp_path / "missing.py")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "missing.py' is not a file" in done.stderr
