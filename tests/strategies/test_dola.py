"""DoLa's layer buckets, argument validation, and its processor's layer history, row check and warning.

The model restored after errors (processor and loop) is checked for every strategy by
``tests/backends/hf/test_strategy_contract.py``.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_state, model_state, prompt_ids

from contrastive_decoding import DoLa, DoLaLogitsProcessor, LayerReadout, dola_candidate_layers, dola_generate


# Expected lists written out by hand from transformers' rules (start = 2 if tied, N//2 split,
# the 20-layer windows for N > 40).
@pytest.mark.parametrize(
    ("bucket", "n", "tied", "expected"),
    [
        ("high", 32, False, [16, 18, 20, 22, 24, 26, 28, 30]),
        ("low", 32, False, [0, 2, 4, 6, 8, 10, 12, 14]),
        ("low", 32, True, [2, 4, 6, 8, 10, 12, 14]),
        ("high", 30, True, [15, 17, 19, 21, 23, 25, 27, 29]),
        ("high", 40, False, [20, 22, 24, 26, 28, 30, 32, 34, 36, 38]),
        ("low", 40, True, [2, 4, 6, 8, 10, 12, 14, 16, 18]),
        ("high", 48, False, [28, 30, 32, 34, 36, 38, 40, 42, 44, 46]),
        ("low", 48, False, [0, 2, 4, 6, 8, 10, 12, 14, 16, 18]),
        ("low", 80, True, [2, 4, 6, 8, 10, 12, 14, 16, 18]),
        ("high", 80, True, [60, 62, 64, 66, 68, 70, 72, 74, 76, 78]),
        ("low", 4, True, [2]),  # start == N // 2
        ("low", 2, True, [1]),  # two layers, tied: start 1
        ("high", 2, True, [1]),
        ("low", 1, True, [0]),
    ],
)
def test_bucket_rules(bucket, n, tied, expected):
    assert dola_candidate_layers(bucket, n, tied) == expected


def test_explicit_layers_taken_as_given():
    assert dola_candidate_layers([5, 0, 3], 8, True) == [5, 0, 3]
    assert dola_candidate_layers(7, 8, False) == [7]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(dola_layers="middle"), "`dola_layers` must be 'low', 'high'"),
        (dict(dola_layers=[]), "`dola_layers` is an empty list"),
        (dict(relative_top=0.0), "`relative_top` must be in \\(0, 1\\]"),
        (dict(relative_top=1.5), "`relative_top` must be in \\(0, 1\\]"),
        (dict(layer_choice="mean"), "`layer_choice` must be one of"),
        (dict(divergence="kl"), "`divergence` must be one of"),
        (dict(min_tokens_to_keep=0), "`min_tokens_to_keep`"),
    ],
)
def test_bad_arguments_raise_before_any_hook(tiny_model, kwargs, fragment):
    before = model_state(tiny_model)
    with pytest.raises(ValueError, match=fragment):
        DoLaLogitsProcessor(tiny_model, **kwargs)
    assert_same_state(before, model_state(tiny_model))


@pytest.mark.parametrize("layers", [[1, 99], -1, [6]])
def test_out_of_range_layers_raise_before_any_hook(tiny_model, layers):
    before = model_state(tiny_model)
    with pytest.raises(ValueError, match=r"`dola_layers` has layer -?\d+, outside 0\.\.5"):
        DoLaLogitsProcessor(tiny_model, dola_layers=layers)
    with pytest.raises(ValueError, match=r"`dola_layers` has layer"):
        tiny_model.generate(prompt_ids(), custom_generate=dola_generate, dola_layers=layers, max_new_tokens=2)
    assert_same_state(before, model_state(tiny_model))


def test_loop_refuses_options_it_cannot_honour(tiny_model):
    before = model_state(tiny_model)
    with pytest.raises(ValueError, match="num_beams=2.*DoLaLogitsProcessor"):
        tiny_model.generate(prompt_ids(), custom_generate=dola_generate, num_beams=2, max_new_tokens=2)
    with pytest.raises(ValueError, match="output_hidden_states"):
        tiny_model.generate(
            prompt_ids(),
            custom_generate=dola_generate,
            max_new_tokens=2,
            return_dict_in_generate=True,
            output_hidden_states=True,
        )
    assert_same_state(before, model_state(tiny_model))


def test_processor_reset_and_history(tiny_model):
    ids = prompt_ids()
    with DoLaLogitsProcessor(tiny_model, "high") as proc:
        tiny_model.generate(ids, logits_processor=[proc], max_new_tokens=3, min_new_tokens=3, do_sample=False)
        history = proc.chosen_layers
        assert history.shape == (3, 1)
        layers = DoLa("high").premature_layers(LayerReadout.from_model(tiny_model))
        assert set(history.flatten().tolist()) <= set(layers)
        proc.reset()
        assert proc.chosen_layers.numel() == 0


def test_processor_rejects_mismatched_rows(tiny_model):
    with DoLaLogitsProcessor(tiny_model, "high") as proc:
        with torch.no_grad():
            tiny_model(prompt_ids(batch=2))
        with pytest.raises(RuntimeError, match="2 rows but `scores` has 3"):
            proc(prompt_ids(batch=3), torch.zeros(3, tiny_model.config.vocab_size))


def test_warns_when_earlier_processors_change_the_scores(tiny_model):
    with DoLaLogitsProcessor(tiny_model, "high") as proc:
        with pytest.warns(UserWarning, match="pass them in `logits_processor=` after this processor"):
            tiny_model.generate(
                prompt_ids(),
                logits_processor=[proc],
                repetition_penalty=1.5,
                max_new_tokens=3,
                do_sample=False,
            )
