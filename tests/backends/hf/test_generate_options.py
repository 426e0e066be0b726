"""No stock ``generate`` option changes a strategy's tokens silently.

For each option, the processor in stock ``generate`` gives the tokens of the reference (the
library's own loop, where every configured processor acts on the contrasted scores), or the option
is refused with an error naming it, or (for processors that change the scores before the contrast)
a warning says so.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import build_model, char_tokenizer
from transformers import LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

from contrastive_decoding import (
    DoLa,
    DoLaLogitsProcessor,
    LayerCake,
    LayerCakeLogitsProcessor,
    strategy_generate,
)

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.tensor([[3, 5, 9, 3, 5, 9, 3, 5], [0, 0, 4, 8, 12, 16, 20, 24]])
MASK = torch.tensor([[1] * 8, [0, 0] + [1] * 6])


@pytest.fixture(scope="module")
def model():
    model = build_model("llama")
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def _strategies(tokenizer):
    return {
        "dola": (lambda m: DoLaLogitsProcessor(m, dola_layers="low"), DoLa("low"), {}),
        "layercake": (
            lambda m: LayerCakeLogitsProcessor(m, tokenizer),
            LayerCake(),
            {"strategy_tokenizer": tokenizer},
        ),
    }


def _both(model, tokenizer, name, seed=0, **options):
    """(processor in stock generate, the loop) under the same options and seed."""
    make, strategy, loop_extra = _strategies(tokenizer)[name]
    common = dict(attention_mask=MASK, max_new_tokens=5, **options)
    with make(model) as processor:
        torch.manual_seed(seed)
        stock = model.generate(IDS, logits_processor=LogitsProcessorList([processor]), **common)
    torch.manual_seed(seed)
    loop = model.generate(IDS, custom_generate=strategy_generate, strategy=strategy, **loop_extra, **common)
    return stock, loop


def _sequences(out):
    return out.sequences if hasattr(out, "sequences") else out


OPTIONS = {
    "greedy": dict(do_sample=False),
    "min_new_tokens": dict(do_sample=False, min_new_tokens=4, eos_token_id=7),
    "bad_words_ids": dict(do_sample=False, bad_words_ids=[[5], [9]]),
    "suppress_tokens": dict(do_sample=False, suppress_tokens=[3, 4]),
    "renormalize_logits": dict(do_sample=False, renormalize_logits=True),
    "output_scores_and_logits": dict(
        do_sample=False, return_dict_in_generate=True, output_scores=True, output_logits=True
    ),
    "sampling": dict(do_sample=True, top_k=10),
    "num_return_sequences": dict(do_sample=True, num_return_sequences=2),
    "repetition_penalty_after": dict(do_sample=False, no_repeat_ngram_size=2),
    "eos_and_pad": dict(do_sample=False, eos_token_id=[7, 11], pad_token_id=0),
}


@pytest.mark.parametrize("name", ["dola", "layercake"])
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_processor_equals_the_loop_under_each_option(model, tokenizer, name, option):
    stock, loop = _both(model, tokenizer, name, **OPTIONS[option])
    assert torch.equal(_sequences(stock), _sequences(loop))
    if option == "output_scores_and_logits":
        for a, b in zip(stock.scores, loop.scores, strict=True):
            assert torch.equal(a, b)
        for a, b in zip(stock.logits, loop.logits, strict=True):  # the model's own, untouched
            assert torch.equal(a, b)


class _Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        pass


def test_a_streamer_sees_the_contrasted_tokens(model):
    ids = IDS[:1]
    with DoLaLogitsProcessor(model) as processor:
        streamer = _Collect()
        out = model.generate(
            ids, max_new_tokens=4, do_sample=False, streamer=streamer, logits_processor=[processor]
        )
    streamed = torch.cat([c.reshape(-1) for c in streamer.chunks[1:]])  # the first chunk is the prompt
    assert torch.equal(streamed, out[0, ids.shape[1]:])


def test_a_static_cache_gives_dola_the_same_tokens_and_is_refused_for_streams(model, tokenizer):
    ids = IDS[:1]
    with DoLaLogitsProcessor(model) as processor:
        dynamic = model.generate(ids, max_new_tokens=4, do_sample=False, logits_processor=[processor])
        static = model.generate(
            ids,
            max_new_tokens=4,
            do_sample=False,
            logits_processor=[processor],
            cache_implementation="static",
        )
    assert torch.equal(dynamic, static)
    with LayerCakeLogitsProcessor(model, tokenizer) as cake:
        with pytest.raises(ValueError, match="static cache"):
            model.generate(ids, max_new_tokens=2, logits_processor=[cake], cache_implementation="static")


def test_processors_that_change_scores_before_the_contrast_warn(model):
    """sequence_bias (like repetition_penalty=) acts before the processor: said, not silent."""
    with DoLaLogitsProcessor(model) as processor:
        with pytest.warns(UserWarning, match="changed the scores it contrasts"):
            model.generate(IDS[:1], max_new_tokens=3, logits_processor=[processor], sequence_bias={(5,): 3.0})


def test_low_memory_beam_search_is_refused(model):
    with DoLaLogitsProcessor(model) as processor:
        with pytest.raises((ValueError, RuntimeError), match="low_memory"):
            model.generate(
                IDS[:1], max_new_tokens=3, num_beams=2, low_memory=True, logits_processor=[processor]
            )


def test_an_empty_prompt_is_refused_by_name(model):
    empty = torch.zeros(1, 0, dtype=torch.long)
    with DoLaLogitsProcessor(model) as processor:
        # transformers 5 reaches the forward, where the processor names `input_ids`; 4.57 fails in
        # its own input preparation first (an IndexError before any forward). Never an output.
        with pytest.raises((ValueError, IndexError)) as refused:
            model.generate(empty, max_new_tokens=2, logits_processor=[processor])
        if refused.type is ValueError:
            assert "`input_ids` is empty" in str(refused.value)
    with pytest.raises(ValueError, match="`input_ids` is empty"):
        model.generate(empty, custom_generate=strategy_generate, strategy="dola-high", max_new_tokens=2)


def test_beam_search_with_a_processor_matches_itself_across_batch_rows(model):
    """Beam search is supported for early exits only; each batch row gives its own beams' result."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with DoLaLogitsProcessor(model) as processor:
            both = model.generate(
                IDS, attention_mask=MASK, max_new_tokens=3, num_beams=2, logits_processor=[processor]
            )
            first = model.generate(IDS[:1], max_new_tokens=3, num_beams=2, logits_processor=[processor])
    assert torch.equal(both[0], first[0])
