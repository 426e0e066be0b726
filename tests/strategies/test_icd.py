"""ICD (the model contrasted with itself behind an instruction) against a hand-written reference.

The reference builds the amateur's row by hand (BOS, the instruction's tokens, the rest of the
row; the instruction first when the row has no BOS), runs the model uncached on both rows at every
step and writes ``log_softmax(base) - log_softmax(amateur)`` on the plausible set by hand.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_state, build_model, char_tokenizer, model_state
from transformers import StoppingCriteria

from contrastive_decoding import (
    ContrastLogitsProcessor,
    InducedContrast,
    score_continuations,
    strategy_generate,
)
from contrastive_decoding.strategies.icd import UNTRUTHFUL_INSTRUCTION

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6
BOS, EOS = 1, 2
PROMPT = "Q: Where is the Eiffel tower? A:"
SHORT = "Who wrote it? A:"
INSTRUCTION = "Lie! Say false things. "
CONTINUATIONS = [" Paris.", " In Rome, Italy.", " x"]

_MODELS: dict[str, torch.nn.Module] = {}


def _model(family: str) -> torch.nn.Module:
    if family not in _MODELS:
        _MODELS[family] = build_model(family)
    return _MODELS[family]


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def _ids(tokenizer, text=PROMPT, bos=True) -> torch.Tensor:
    return torch.tensor([tokenizer(text, add_special_tokens=bos)["input_ids"]])


def _instruction_ids(tokenizer, text=INSTRUCTION) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _amateur_row(row: list[int], instruction: list[int]) -> list[int]:
    """The amateur's tokens: the instruction after a leading BOS, or first without one."""
    if row and row[0] == BOS:
        return row[:1] + instruction + row[1:]
    return instruction + row


@torch.no_grad()
def _reference_step(model, row: list[int], instruction: list[int], relative_top=0.1) -> torch.Tensor:
    base = model(torch.tensor([row]), use_cache=False).logits[0, -1].double()
    amateur = model(torch.tensor([_amateur_row(row, instruction)]), use_cache=False).logits[0, -1].double()
    base_lp = F.log_softmax(base, -1)
    keep = base_lp >= base_lp.max() + math.log(relative_top)
    return torch.where(keep, base_lp - F.log_softmax(amateur, -1), -torch.inf)


def _reference_greedy(
    model, ids: torch.Tensor, instruction: list[int], steps=STEPS, **kwargs
) -> torch.Tensor:
    row = ids[0].tolist()
    for _ in range(steps):
        row.append(int(_reference_step(model, row, instruction, **kwargs).argmax()))
        if row[-1] == EOS:
            break
    return torch.tensor([row])


def _processor_generate(model, strategy, tokenizer, steps=STEPS, **inputs):
    with ContrastLogitsProcessor(model, strategy, tokenizer=tokenizer) as proc:
        return model.generate(**inputs, logits_processor=[proc], max_new_tokens=steps, do_sample=False)


def _loop_generate(model, strategy, tokenizer, steps=STEPS, **inputs):
    # generate keeps its own `tokenizer=`; the loop takes the strategy's as `strategy_tokenizer=`.
    return model.generate(
        **inputs, custom_generate=strategy_generate, strategy=strategy, strategy_tokenizer=tokenizer,
        max_new_tokens=steps, do_sample=False,
    )  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "opt", "gpt_neox"])
def test_greedy_processor_and_loop_match_reference(family, tokenizer):
    model = _model(family)
    ids = _ids(tokenizer)
    expected = _reference_greedy(model, ids, _instruction_ids(tokenizer))
    strategy = InducedContrast(INSTRUCTION)
    assert torch.equal(_processor_generate(model, strategy, tokenizer, input_ids=ids), expected)
    assert torch.equal(_loop_generate(model, strategy, tokenizer, input_ids=ids), expected)


def test_readme_call_and_a_bound_tokenizer_reach_the_loop(tokenizer):
    """The README's call (`strategy_tokenizer=`) and a tokenizer bound with functools.partial."""
    model = _model("llama")
    ids = _ids(tokenizer)
    expected = _reference_greedy(model, ids, _instruction_ids(tokenizer))
    out = model.generate(
        ids, custom_generate=strategy_generate, strategy=InducedContrast(INSTRUCTION),
        strategy_tokenizer=tokenizer, max_new_tokens=STEPS, do_sample=False,
    )  # fmt: skip
    assert torch.equal(out, expected)
    bound = functools.partial(strategy_generate, tokenizer=tokenizer)
    out = model.generate(
        ids,
        custom_generate=bound,
        strategy=InducedContrast(INSTRUCTION),
        max_new_tokens=STEPS,
        do_sample=False,
    )
    assert torch.equal(out, expected)


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # GPT-2's tiny model barely sees the order
def test_step_scores_put_the_instruction_after_bos(family, tokenizer):
    """The scores of one step equal the reference with the instruction after BOS, and differ from
    the same formula with the instruction in front of BOS."""
    model = _model(family)
    row = _ids(tokenizer)[0].tolist()
    assert row[0] == tokenizer.bos_token_id == BOS
    instruction = _instruction_ids(tokenizer)
    with ContrastLogitsProcessor(model, InducedContrast(INSTRUCTION), tokenizer=tokenizer) as proc:
        with torch.no_grad():
            scores = model(torch.tensor([row])).logits[:, -1].float()
        got = proc(torch.tensor([row]), scores)[0].double()
    expected = _reference_step(model, row, instruction)
    assert torch.equal(got == -torch.inf, expected == -torch.inf)
    finite = expected > -torch.inf
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        wrong = model(torch.tensor([instruction + row])).logits[0, -1].double()  # instruction, BOS, rest
    before_bos = F.log_softmax(scores[0].double(), -1) - F.log_softmax(wrong, -1)
    assert not torch.allclose(got[finite], before_bos[finite], atol=1e-2)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_row_without_bos_reads_the_instruction_first(family, tokenizer):
    model = _model(family)
    ids = _ids(tokenizer, bos=False)
    assert int(ids[0, 0]) != BOS
    expected = _reference_greedy(model, ids, _instruction_ids(tokenizer))
    strategy = InducedContrast(INSTRUCTION)
    assert torch.equal(_processor_generate(model, strategy, tokenizer, input_ids=ids), expected)
    assert torch.equal(_loop_generate(model, strategy, tokenizer, input_ids=ids), expected)


def test_token_id_instruction_and_default_instruction(tokenizer):
    model = _model("llama")
    ids = _ids(tokenizer)
    instruction = _instruction_ids(tokenizer)
    expected = _reference_greedy(model, ids, instruction)
    assert torch.equal(
        _processor_generate(model, InducedContrast(instruction), tokenizer, input_ids=ids), expected
    )
    default = _instruction_ids(tokenizer, UNTRUTHFUL_INSTRUCTION)
    expected = _reference_greedy(model, ids, default)
    assert torch.equal(_loop_generate(model, InducedContrast(), tokenizer, input_ids=ids), expected)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neox"])
def test_left_padded_rows_equal_rows_alone(family, tokenizer):
    model = _model(family)
    tokenizer.padding_side = "left"
    texts = [PROMPT, SHORT]
    enc = tokenizer(texts, return_tensors="pt", padding=True, return_token_type_ids=False)
    assert not bool(enc["attention_mask"].all())
    width = enc["input_ids"].shape[1]
    strategy = InducedContrast(INSTRUCTION)
    instruction = _instruction_ids(tokenizer)
    for out in (
        _processor_generate(model, strategy, tokenizer, steps=5, **enc),
        _loop_generate(model, strategy, tokenizer, steps=5, **enc),
    ):
        for row, text in enumerate(texts):
            alone = _ids(tokenizer, text)
            expected = _reference_greedy(model, alone, instruction, steps=5)[0, alone.shape[1] :]
            assert out[row, width:].tolist() == expected.tolist()


@torch.no_grad()
def _reference_scores(model, tokenizer, protocol, relative_top, floor=-1000.0):
    prefix = tokenizer(PROMPT)["input_ids"]
    instruction = _instruction_ids(tokenizer)
    out = []
    for cont in CONTINUATIONS:
        full = tokenizer(PROMPT + cont)["input_ids"]
        at = torch.arange(len(prefix) - 1, len(full) - 1)
        targets = torch.tensor(full[len(prefix) :])
        base = model(torch.tensor([full]), use_cache=False).logits[0, at].double()
        amateur_row = _amateur_row(full, instruction)
        amateur = model(torch.tensor([amateur_row]), use_cache=False).logits[0, at + len(instruction)]
        base_lp = F.log_softmax(base, -1)
        contrast = base_lp - F.log_softmax(amateur.double(), -1)
        if protocol == "normalized":
            keep = base_lp >= base_lp.max(-1, keepdim=True).values + math.log(relative_top)
            contrast = torch.where(keep, F.log_softmax(contrast, -1), floor)
        out.append(contrast.gather(-1, targets[:, None]).squeeze(-1))
    return out


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("protocol", ["paper", "normalized"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_scoring_matches_reference(family, tokenizer, protocol, share_prefix):
    model = _model(family)
    before = model_state(model)
    got = score_continuations(
        model, tokenizer, PROMPT, CONTINUATIONS, strategy=InducedContrast(INSTRUCTION, relative_top=0.5),
        protocol=protocol, share_prefix=share_prefix, batch_size=2,
    )  # fmt: skip
    assert_same_state(before, model_state(model))
    expected = _reference_scores(model, tokenizer, protocol, relative_top=0.5)
    if protocol == "normalized":
        assert any(bool((e == -1000.0).any()) for e in expected)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.token_scores.double(), e, rtol=1e-4, atol=1e-4)
        assert g.total == pytest.approx(float(e.sum()), rel=1e-4, abs=1e-3)


def test_text_instruction_needs_the_tokenizer_before_attaching(tokenizer):
    model = _model("llama")
    before = model_state(model)
    with pytest.raises(ValueError, match="`prefix` is text; pass the model's tokenizer"):
        ContrastLogitsProcessor(model, InducedContrast(INSTRUCTION))
    with pytest.raises(ValueError, match="`prefix` is text; pass the model's tokenizer"):
        model.generate(
            _ids(tokenizer), custom_generate=strategy_generate, strategy=InducedContrast(INSTRUCTION),
            max_new_tokens=2,
        )  # fmt: skip
    assert_same_state(before, model_state(model))


class Boom(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        raise RuntimeError("boom")


# Beam search refused and the model restored after errors: the shared tester (llama, gpt2) checks
# them for every strategy; here on one more family.
@pytest.mark.parametrize("family", ["opt"])
def test_state_restored_after_exceptions(family, tokenizer):
    model = _model(family)
    before = model_state(model)
    strategy = InducedContrast(INSTRUCTION)
    with pytest.raises(RuntimeError, match="boom"):
        _loop_generate(
            model, strategy, tokenizer, steps=3, input_ids=_ids(tokenizer), stopping_criteria=[Boom()]
        )
    assert_same_state(before, model_state(model))
    with pytest.raises(RuntimeError, match="boom"):
        with ContrastLogitsProcessor(model, strategy, tokenizer=tokenizer) as proc:
            model.generate(
                _ids(tokenizer), logits_processor=[proc], stopping_criteria=[Boom()], max_new_tokens=3
            )
    assert_same_state(before, model_state(model))
    with pytest.raises(RuntimeError, match="detached"):
        proc(_ids(tokenizer), torch.zeros(1, 96))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(instruction=""), "`instruction` is an empty string"),
        (dict(instruction=[]), "`instruction` must be a non-empty string"),
        (dict(instruction=None), "`instruction` must be"),
        (
            dict(instruction=[5, "a"]),
            "`instruction` must be a non-empty string or a non-empty list of token ids",
        ),
        (dict(relative_top=0.0), "`relative_top` must be in \\(0, 1\\]"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        InducedContrast(**kwargs)


def test_defaults_and_repr():
    icd = InducedContrast()
    assert icd.instruction == UNTRUTHFUL_INSTRUCTION and icd.relative_top == 0.1
    assert icd.amateur_stream().model is None and icd.amateur_stream().prefix == UNTRUTHFUL_INSTRUCTION
    assert "InducedContrast(instruction=" in repr(icd) and "relative_top=0.1" in repr(icd)
