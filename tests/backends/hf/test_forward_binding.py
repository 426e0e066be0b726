"""A processor trusts only the forward pass it was made for (reliability, round two).

Each step must be the last position of its own model's latest forward, in the same thread: stock
``generate`` options that verify several candidates per forward (prompt lookup, assisted
generation), another model, a stale state from an earlier call, a forward of another thread in
between, a compiled wrapper: each is refused with an error naming it, never contrasted silently.
Copies of an attached model come out clean; processors cannot be copied or pickled; an amateur that
is the model itself is refused.
"""

from __future__ import annotations

import copy
import pickle
import threading

import pytest
import torch
from conftest import assert_same_state, build_model, char_tokenizer, model_state
from transformers import LogitsProcessor, LogitsProcessorList

from contrastive_decoding import (
    ContrastiveDecoding,
    ContrastLogitsProcessor,
    DoLa,
    DoLaLogitsProcessor,
    InducedContrast,
    LayerCakeLogitsProcessor,
    LowerLayerFusion,
    SLEDLogitsProcessor,
    dola_generate,
    layercake_generate,
    score_continuations,
    strategy_generate,
)

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[3, 5, 9, 3, 5, 9, 3, 5]])  # repeats, so prompt lookup finds candidates


@pytest.fixture(scope="module")
def model():
    return build_model("llama")


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def _processors(model, tokenizer):
    return {
        "dola": lambda: DoLaLogitsProcessor(model),
        "sled": lambda: SLEDLogitsProcessor(model),
        "layercake": lambda: LayerCakeLogitsProcessor(model, tokenizer),
        "icd": lambda: ContrastLogitsProcessor(model, InducedContrast(), tokenizer=tokenizer),
    }


def _generate(model, processor, **kw):
    return model.generate(
        IDS, max_new_tokens=4, do_sample=False, logits_processor=LogitsProcessorList([processor]), **kw
    )


@pytest.mark.parametrize("name", ["dola", "sled", "layercake", "icd"])
@pytest.mark.parametrize(
    ("option", "named"),
    [("prompt_lookup", "prompt_lookup_num_tokens"), ("assistant", "assistant_model")],
)
def test_candidate_verification_is_refused_by_name(model, tokenizer, name, option, named):
    """Prompt lookup gave LayerCake [17,73,0,0] for [17,10,10,10] silently, and ICD a reshape error."""
    before = model_state(model)
    if option == "prompt_lookup":
        kw = {"prompt_lookup_num_tokens": 2}
    else:
        kw = {"assistant_model": build_model("llama", 1)}
    with _processors(model, tokenizer)[name]() as processor:
        with pytest.raises(ValueError, match=named):
            _generate(model, processor, **kw)
    assert_same_state(before, model_state(model))


@pytest.mark.parametrize(
    ("loop", "extra"),
    [
        (dola_generate, {}),
        (layercake_generate, {"classifier": "tok"}),
        (strategy_generate, {"strategy": "sled"}),
    ],
)
def test_the_generate_loops_refuse_prompt_lookup(model, tokenizer, loop, extra):
    extra = {k: tokenizer if v == "tok" else v for k, v in extra.items()}
    with pytest.raises(ValueError, match="prompt_lookup_num_tokens"):
        model.generate(IDS, custom_generate=loop, max_new_tokens=3, prompt_lookup_num_tokens=2, **extra)


def test_a_processor_refuses_another_model_even_with_matching_rows(model):
    """It gave no error and scores up to 0.047 away from the other model's own processor."""
    other = build_model("llama", seed=1)
    processor = DoLaLogitsProcessor(model)
    built_for = r"no forward pass of the model it was built for \(LlamaForCausalLM\)"
    with pytest.raises(ValueError, match=built_for):
        _generate(other, processor)
    plain = _generate(model, processor)  # its own model still works ...
    with pytest.raises(ValueError, match="another model"):  # ... and its states do not leak to the next
        _generate(other, processor)
    assert plain.shape == (1, IDS.shape[1] + 4)
    processor.detach()


def test_a_forward_between_the_step_and_the_call_is_refused(model):
    """What a second thread does: run the model between this step's forward and the processor."""

    class ForwardInAnotherThread(LogitsProcessor):
        def __call__(self, input_ids, scores):
            other = threading.Thread(target=model, args=(input_ids[:, :3],))
            other.start()
            other.join()
            return scores

    with DoLaLogitsProcessor(model) as processor:
        with pytest.raises(RuntimeError, match="another forward pass of LlamaForCausalLM ran"):
            model.generate(
                IDS,
                max_new_tokens=2,
                do_sample=False,
                logits_processor=LogitsProcessorList([ForwardInAnotherThread(), processor]),
            )


def test_two_threads_never_get_silently_different_tokens(model):
    """Two held processors generating on one model at once: each run gives the tokens of the same
    processor alone, or raises the processor's error; never other tokens."""
    with DoLaLogitsProcessor(model) as alone:
        reference = _generate(model, alone)
    outcomes = []
    for _ in range(4):
        results: dict[int, object] = {}

        def work(i, processor, results=results):
            try:
                results[i] = _generate(model, processor)
            except RuntimeError as exc:
                results[i] = exc

        with DoLaLogitsProcessor(model) as a, DoLaLogitsProcessor(model) as b:
            threads = [threading.Thread(target=work, args=(i, p)) for i, p in enumerate((a, b))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        for result in results.values():
            if isinstance(result, RuntimeError):
                assert "another forward pass" in str(result)
                outcomes.append("refused")
            else:
                assert torch.equal(result, reference)
                outcomes.append("equal")
    assert len(outcomes) == 8


def test_a_compiled_wrapper_is_refused_at_construction(model):
    compiled = torch.compile(model)  # compiles lazily: building the wrapper costs nothing
    with pytest.raises(ValueError, match="torch.compile'd wrapper.*_orig_mod"):
        DoLaLogitsProcessor(compiled)


@pytest.mark.parametrize("name", ["dola", "layercake"])
def test_a_deepcopy_of_an_attached_model_comes_out_clean(model, tokenizer, name):
    """The copy kept 3 hooks (DoLa), or 4 hooks, the swapped attention and 2 rows per forward
    (LayerCake) for good."""
    before = model_state(model)
    plain = model.generate(IDS, max_new_tokens=4, do_sample=False)
    processor = _processors(model, tokenizer)[name]()
    with_processor = _generate(model, processor)
    clone = copy.deepcopy(model)
    assert_same_state(before, model_state(clone))
    assert "__deepcopy__" not in clone.__dict__
    assert torch.equal(clone.generate(IDS, max_new_tokens=4, do_sample=False), plain)
    assert torch.equal(_generate(model, processor), with_processor)  # the original keeps its hooks
    with pytest.raises(TypeError, match="cannot be copied"):
        copy.deepcopy(processor)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(processor)
    processor.detach()
    assert_same_state(before, model_state(model))
    assert "__deepcopy__" not in model.__dict__


def test_an_amateur_that_is_the_model_itself_is_refused(model, tokenizer):
    """LowerLayerFusion(amateur=model) decoded the pad token and scored every answer 0.0."""
    before = model_state(model)
    for strategy in (LowerLayerFusion(amateur=model), ContrastiveDecoding(model)):
        with pytest.raises(ValueError, match="amateur is the model itself"):
            ContrastLogitsProcessor(model, strategy, tokenizer=tokenizer)
        with pytest.raises(ValueError, match="amateur is the model itself"):
            score_continuations(model, tokenizer, "Q: A:", [" a", " b"], strategy=strategy)
    assert_same_state(before, model_state(model))


def test_a_processor_still_equals_the_loop_after_the_checks(model):
    """The checks refuse; they never change a step: greedy with the processor == the loop."""
    with DoLaLogitsProcessor(model, dola_layers="low") as processor:
        with_processor = _generate(model, processor)
    loop = model.generate(IDS, custom_generate=strategy_generate, strategy=DoLa("low"), max_new_tokens=4)
    assert torch.equal(with_processor, loop)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_scoring_past_learned_positions_is_refused_by_name(family, tokenizer):
    """GPT-2 past its positions raised a bare IndexError in its embedding."""
    model = build_model(family)
    table = model.get_input_embeddings()  # any learned-position model: the limit is its table
    limit = next(m.num_embeddings - getattr(m, "offset", 0) for n, m in model.named_modules()
                 if n.endswith(("wpe", "embed_positions")))
    assert table is not None and limit < 1000
    before = model_state(model)
    with pytest.raises(ValueError, match=rf"reads at most {limit} positions"):
        score_continuations(model, tokenizer, "a" * (limit + 5), [" b"], strategy=DoLa())
    assert_same_state(before, model_state(model))
    fits = score_continuations(model, tokenizer, "a" * (limit - 10), [" b"], strategy=DoLa())
    assert len(fits) == 1
