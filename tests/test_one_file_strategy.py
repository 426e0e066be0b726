"""A strategy defined in one file (this one) and registered gets every front-end, with no other file
touched: the logits processor (by name and as a derived class), the generate loops (derived and
``strategy_generate`` by name), scoring, the harness's ``--strategy`` and lm-eval's ``strategy=``,
and the shared contract of ``test_strategy_contract.py``.

Each front-end is checked against the strategy's formula computed here by hand from the model's own
``output_hidden_states`` (uncached, float64): ``log q_N - weight * log q_L`` with ``L`` the block at
``depth`` of the model, on the plausible set of ``q_N`` when decoding.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import cached_model, char_tokenizer
from reference_impl import early_exit

from contrastive_decoding import (
    ContrastLogitsProcessor,
    ContrastStrategy,
    get_strategy,
    make_strategy,
    register_strategy,
    score_continuations,
    strategy_generate,
)
from contrastive_decoding.backends.hf.frontends import generate_function, logits_processor_class
from contrastive_decoding.core.plausibility import check_min_tokens_to_keep, check_relative_top
from contrastive_decoding.core.validation import check_flag, check_number

_TESTS = Path(__file__).resolve().parent
for _folder in (_TESTS / "eval", _TESTS / "backends" / "hf"):
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))
import evalkit  # noqa: E402 - the harness tests' helpers (tiny model, tokenizer, data files)
import test_strategy_contract as contract  # noqa: E402 - the shared tester, run on this strategy too

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "one-file-exit"
PROMPT = "Q: Where is the Eiffel tower? A:"
CONTINUATIONS = [" Paris.", " In Rome, Italy.", " x"]
STEPS = 5


class DepthExitContrast(ContrastStrategy):
    """Contrast the final layer with one early exit at a fraction of the depth (a test's strategy).

    Args:
        weight: weight of the early exit's log-probabilities, a number >= 0.
        depth: the early exit, as a fraction of the depth in [0, 1).
        final_norm: apply the final norm to the early exit.
        relative_top: plausibility threshold on the final distribution (``None``: no filter).
        min_tokens_to_keep: tokens the plausibility filter always keeps.
    """

    def __init__(
        self,
        weight: float = 0.5,
        depth: float = 0.5,
        final_norm: bool = False,
        relative_top: float | None = 0.1,
        min_tokens_to_keep: int = 1,
    ) -> None:
        self.weight = check_number("weight", weight, 0.0)
        self.depth = check_number("depth", depth, 0.0, 1.0, high_open=True)
        self.final_norm = check_flag("final_norm", final_norm)
        self.relative_top = None if relative_top is None else check_relative_top(relative_top)
        self.min_tokens_to_keep = check_min_tokens_to_keep(min_tokens_to_keep)

    def premature_layers(self, layout) -> list[int]:
        super().premature_layers(layout)  # the base class's check of min_tokens_to_keep
        return [int(self.depth * layout.num_layers)]

    def combine(self, x):
        return F.log_softmax(x.final, -1) - self.weight * F.log_softmax(x.layers[0], -1)


@pytest.fixture
def registered(registry):
    """The strategy registered for one test (the `registry` fixture removes it afterwards)."""
    register_strategy(NAME, description="a test's own early-exit contrast", repetition_penalty=1.0)(
        DepthExitContrast
    )
    yield NAME


# ------------------------------------------------------------------------------------------------
# The reference: the formula by hand from output_hidden_states, no cache


@torch.no_grad()
def _contrast(model, ids: list[int], at, weight=0.5, depth=0.5, final_norm=False):
    """``(contrast, log q_N)`` at positions ``at`` of one unpadded row, float64 ``(P, V)``."""
    out = model(torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    layer = int(depth * model.config.num_hidden_layers)
    final = F.log_softmax(out.logits[0, at].double(), -1)
    early = F.log_softmax(early_exit(model, out.hidden_states[layer][0, at], final_norm).double(), -1)
    return final - weight * early, final


def _plausible(final_lp: torch.Tensor, relative_top=0.1) -> torch.Tensor:
    if relative_top is None:
        return torch.ones_like(final_lp, dtype=torch.bool)
    return final_lp >= final_lp.max(-1, keepdim=True).values + math.log(relative_top)


def _step(model, row: list[int], relative_top=0.1, **kwargs) -> torch.Tensor:
    contrast, final = _contrast(model, row, [-1], **kwargs)
    return torch.where(_plausible(final, relative_top), contrast, -torch.inf)[0]


def _reference_greedy(model, ids: torch.Tensor, steps=STEPS, **kwargs) -> list[int]:
    row = ids[0].tolist()
    for _ in range(steps):
        row.append(int(_step(model, row, **kwargs).argmax()))
        if row[-1] == model.generation_config.eos_token_id:
            break
    return row


def _reference_scores(
    model, prefix: list[int], cont: list[int], protocol="paper", relative_top=0.1, **kwargs
) -> torch.Tensor:
    at = list(range(len(prefix) - 1, len(prefix) + len(cont) - 1))
    contrast, final = _contrast(model, prefix + cont, at, **kwargs)
    if protocol == "normalized":
        contrast = torch.where(_plausible(final, relative_top), F.log_softmax(contrast, -1), -1000.0)
    return contrast.gather(-1, torch.tensor(cont)[:, None]).squeeze(-1)


def _model():
    return cached_model("llama")


def _prompt(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer(PROMPT)["input_ids"]])


# ------------------------------------------------------------------------------------------------
# Each front-end


def test_the_registry_reads_the_class_declaration(registered):
    strategy = make_strategy(registered, weight=0.25)
    assert isinstance(strategy, DepthExitContrast) and strategy.weight == 0.25
    assert repr(strategy) == (
        "DepthExitContrast(weight=0.25, depth=0.5, final_norm=False, relative_top=0.1, min_tokens_to_keep=1)"
    )
    kinds = {"weight": "number", "depth": "number", "final_norm": "bool", "relative_top": "number?"}
    assert get_strategy(registered).kinds == {**kinds, "min_tokens_to_keep": "int"}  # --param kinds
    with pytest.raises(TypeError, match="`alpha`: not a parameter of strategy 'one-file-exit'"):
        make_strategy(registered, alpha=1.0)


def test_processor_by_name_and_derived_class(registered):
    model, tokenizer = _model(), char_tokenizer()
    ids = _prompt(tokenizer)
    greedy = dict(max_new_tokens=STEPS, do_sample=False)
    with ContrastLogitsProcessor(model, registered) as proc:
        got = model.generate(ids, logits_processor=[proc], **greedy)[0].tolist()
    assert got == _reference_greedy(model, ids)
    processor_class = logits_processor_class(DepthExitContrast)
    assert processor_class.__name__ == "DepthExitContrastLogitsProcessor"
    options = dict(weight=1.5, depth=0.3, final_norm=True, relative_top=None)
    with processor_class(model, **options) as proc:
        got = model.generate(ids, logits_processor=[proc], **greedy)[0].tolist()
    expected = _reference_greedy(model, ids, **options)
    assert got == expected
    with torch.no_grad():
        assert expected != model.generate(ids, **greedy)[0].tolist()  # the contrast decides some token


def test_generate_loops_derived_and_by_name(registered):
    model, tokenizer = _model(), char_tokenizer()
    ids = _prompt(tokenizer)
    greedy = dict(max_new_tokens=STEPS, do_sample=False)
    loop = generate_function(DepthExitContrast)
    assert loop.__name__ == "depthexitcontrast_generate"
    options = dict(weight=1.5, depth=0.3, final_norm=True, relative_top=None)
    got = model.generate(ids, custom_generate=loop, **options, **greedy)
    assert got[0].tolist() == _reference_greedy(model, ids, **options)
    by_name = model.generate(ids, custom_generate=strategy_generate, strategy=registered, **greedy)
    assert by_name[0].tolist() == _reference_greedy(model, ids)


@pytest.mark.parametrize("protocol", ["paper", "normalized"])
def test_scoring(registered, protocol):
    model, tokenizer = _model(), char_tokenizer()
    # relative_top=0.5 so that "normalized" floors some tokens; "paper" has no filter at all.
    strategy = make_strategy(registered, relative_top=0.5)
    got = score_continuations(model, tokenizer, PROMPT, CONTINUATIONS, strategy=strategy, protocol=protocol)
    prefix = tokenizer(PROMPT)["input_ids"]
    floored = 0
    for cont, score in zip(CONTINUATIONS, got, strict=True):
        tokens = tokenizer(PROMPT + cont)["input_ids"][len(prefix) :]
        expected = _reference_scores(model, prefix, tokens, protocol, relative_top=0.5)
        floored += int((expected == -1000.0).sum())
        assert score.token_ids == tokens
        torch.testing.assert_close(score.token_scores.double(), expected, rtol=1e-4, atol=1e-4)
    assert (floored > 0) == (protocol == "normalized")


def test_harness_strategy_by_name(registered, tmp_path):
    from contrastive_decoding.eval import RunConfig, run_eval
    from contrastive_decoding.eval.benchmarks.truthfulqa_mc import hf_prompt

    model, tokenizer = evalkit.tiny_model(), evalkit.char_tokenizer()
    data = evalkit.write_mc_json(tmp_path)
    cfg = RunConfig(
        benchmark="tfqa-hf",
        out=str(tmp_path / "run"),
        data=str(data),
        strategy=registered,  # --strategy one-file-exit --param weight=0.25
        params={"weight": 0.25},
        progress=False,
    )
    result = run_eval(cfg, model=model, tokenizer=tokenizer)
    assert result.summary is not None and result.summary["strategy_params"]["weight"] == 0.25
    records = {r["id"]: r for r in evalkit.read_jsonl(result.out / "items.jsonl")}
    assert len(records) == len(evalkit.MC_RECORDS)
    for i, rec in enumerate(evalkit.MC_RECORDS):
        prefix = tokenizer(hf_prompt(rec["question"]))["input_ids"]
        for key in ("mc1", "mc2"):
            answers = [
                tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in rec[f"{key}_targets"]
            ]
            expected = [float(_reference_scores(model, prefix, a, weight=0.25).sum()) for a in answers]
            assert records[i][f"scores_{key}"] == pytest.approx(expected, abs=1e-3)


def test_lm_eval_strategy_by_name(registered, tmp_path_factory):
    pytest.importorskip(
        "lm_eval", reason="lm-eval is not installed (pip install contrastive-decoding[lm-eval])"
    )
    from lm_eval.api.instance import Instance

    from contrastive_decoding.lm_eval import ContrastiveLM

    folder = evalkit.tiny_model_dir(str(tmp_path_factory.mktemp("one-file-lm-eval")))
    lm = ContrastiveLM(pretrained=str(folder), strategy=registered, weight=0.25, dtype="float32")
    assert lm.strategy_params["weight"] == 0.25
    context = "Q: What is the capital of France?\nA:"
    requests = [Instance("loglikelihood", {}, (context, c), i) for i, c in enumerate([" Paris.", " x"])]
    got = lm.loglikelihood(requests)
    for request, (loglik, is_greedy) in zip(requests, got, strict=True):
        ctx, cont = lm._encode_pair(*request.args)  # lm-eval's own tokens
        expected = _reference_scores(lm.model, ctx, cont, weight=0.25)
        assert loglik == pytest.approx(float(expected.sum()), rel=1e-4, abs=1e-3)
        steps = [_step(lm.model, ctx + cont[:k], weight=0.25) for k in range(len(cont))]
        assert is_greedy == all(int(step.argmax()) == token for step, token in zip(steps, cont, strict=True))


# ------------------------------------------------------------------------------------------------
# The shared contract


@pytest.mark.parametrize(
    "check",
    [
        contract.test_processor_restores_the_model_after_with_inline_and_exceptions,
        contract.test_loop_restores_the_model_after_a_call_and_exceptions,
        contract.test_scoring_restores_the_model_after_a_call_and_an_exception,
        contract.test_bad_values_are_refused_naming_the_parameter_before_attaching,
        contract.test_settings_the_model_rules_out_are_refused_before_attaching,
        contract.test_a_missing_tokenizer_is_refused_before_attaching,
        contract.test_processor_and_loops_give_the_same_tokens_and_scores,
        contract.test_paper_scores_equal_the_processor_step_scores,
        contract.test_beam_search_keeps_the_contract_or_is_refused,
    ],
    ids=lambda f: f.__name__.removeprefix("test_"),
)
def test_the_shared_contract_covers_it(registered, check):
    """What ``test_strategy_contract.py`` checks of every registered strategy holds for this one
    (registered there at collection, it is covered the same way)."""
    check(registered, "llama")


@pytest.mark.parametrize("frontend", ["processor", "loop"])
@pytest.mark.parametrize(
    "check", [contract.test_left_padded_batch_equals_each_row_alone, contract.test_uncached_equals_cached]
)
def test_the_shared_generation_contract_covers_it(registered, check, frontend):
    check(registered, "llama", frontend)
