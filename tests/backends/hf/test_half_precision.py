"""Every strategy on float16 and bfloat16 models: no NaN or +inf where float32 has none, and scores
within a stated tolerance of the float32 model's.

Two sets of tiny models share the same weights in each dtype:

* ``large``: embeddings scaled so that the residual stream reaches the thousands (as in real
  models' middle layers) and an untied head scaled so that early exits without the final norm pass
  float16's range (65504) in the head product, which without care gives ``inf`` logits and ``NaN``
  softmaxes. Here only finiteness is asserted: a float16 hidden state of 4e3 carries an error of
  about 1, which moves early exits of 3e5 by hundreds of nats in any computation, so their
  log-softmax contrasts are not comparable with float32.
* ``moderate``: the unscaled tiny models, where the contrasts are well conditioned and must be
  within ``RTOL`` of float32 (relative to the larger of 10 nats and the row's largest score).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_model, char_tokenizer, prompt_ids, strategy_settings

from contrastive_decoding import (
    ContrastLogitsProcessor,
    LayerReadout,
    score_continuations,
    strategy_generate,
)

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = char_tokenizer()
FAMILIES = ["llama", "gpt2", "gemma2", "opt", "phi", "qwen2"]
HALF = [torch.float16, torch.bfloat16]
# Allowed difference from float32, relative to the larger of 10 nats and the largest finite float32
# score of the row (contrasts are differences of log-probabilities, each rounded at its own scale):
# float16 keeps 11 significant bits, bfloat16 8, and every layer rounds again.
RTOL = {torch.float16: 0.02, torch.bfloat16: 0.1}
SCALE_FLOOR = 10.0
EMBEDDING_SCALE = 3000.0
HEAD_SCALE = 50.0

STRATEGIES = strategy_settings()

_MODELS: dict[tuple, torch.nn.Module] = {}


def _model(
    family: str, dtype: torch.dtype, large: bool = False, layers: int | None = None
) -> torch.nn.Module:
    """The family's tiny model (``large``: with large activations), cast to ``dtype``."""
    key = (family, dtype, large, layers)
    if key not in _MODELS:
        extra = {} if layers is None else {"num_hidden_layers": layers}
        base = _MODELS.get((family, torch.float32, large, layers))
        if base is None:
            base = build_model(family, seed=0 if layers is None else 1, **extra)
            if large:
                with torch.no_grad():
                    # A tied head gets its own copy, so only the residual stream grows with the
                    # embeddings: the final norm keeps the model's own logits moderate.
                    head = base.get_output_embeddings()
                    head.weight = torch.nn.Parameter(head.weight.detach().clone() * HEAD_SCALE)
                    base.get_input_embeddings().weight.mul_(EMBEDDING_SCALE)
            _MODELS[(family, torch.float32, large, layers)] = base
        _MODELS[key] = base if dtype == torch.float32 else copy.deepcopy(base).to(dtype)
    return _MODELS[key]


def _strategy(name: str, family: str, dtype: torch.dtype, large: bool = False):
    return STRATEGIES[name](_model(family, dtype, large, layers=2))


def _step_scores(model, strategy) -> torch.Tensor:
    """The contrasted scores of the first generated token for two rows."""
    with ContrastLogitsProcessor(model, strategy, tokenizer=TOKENIZER) as proc:
        out = model.generate(
            prompt_ids(batch=2),
            attention_mask=torch.ones(2, 7, dtype=torch.long),
            logits_processor=[proc],
            max_new_tokens=1,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    return out.scores[0].float()


def _row_floor(scores: torch.Tensor) -> torch.Tensor:
    return scores.where(torch.isfinite(scores), torch.inf).amin(-1, keepdim=True)


def _assert_finite_where_full_is(half: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """No NaN or +inf; most of float32's finite entries finite too (the plausibility boundary may
    move by a rounding). Returns where both are finite, floors (SLED's lower bound, the normalized
    protocol's -1000: a row's minimum, moving with the candidate set) left out."""
    assert not torch.isnan(full).any() and not (full == torch.inf).any()
    assert not torch.isnan(half).any(), "NaN in the half-precision scores"
    assert not (half == torch.inf).any(), "+inf in the half-precision scores"
    finite = torch.isfinite(full)
    both = finite & torch.isfinite(half)
    assert both.sum() >= 0.9 * finite.sum()
    return both & (full > _row_floor(full)) & (half > _row_floor(half))


def _assert_close_where_finite(half: torch.Tensor, full: torch.Tensor, rtol: float) -> None:
    both = _assert_finite_where_full_is(half, full)
    scale = full.abs().where(torch.isfinite(full), 0.0).amax(-1, keepdim=True).clamp(min=SCALE_FLOOR)
    diff = (half - full).abs().where(both, 0.0)
    assert (diff <= rtol * scale).all(), f"max relative difference {(diff / scale).max().item():.3g}"


def _compare(half: torch.Tensor, full: torch.Tensor, dtype: torch.dtype, large: bool) -> None:
    if large:
        _assert_finite_where_full_is(half, full)
    else:
        _assert_close_where_finite(half, full, RTOL[dtype])


def test_large_activations_overflow_a_plain_float16_head_product():
    """The models are hard enough: the plain float16 head product of an early exit overflows, the
    library's early exit stays finite and matches float32."""
    model = _model("gemma2", torch.float16, large=True)
    hidden = model(prompt_ids(), output_hidden_states=True).hidden_states[3][0, -1]
    head = model.get_output_embeddings()
    assert torch.isinf(head(hidden)).any()
    ours = LayerReadout.from_model(model).early_exit_logits(hidden)
    # The same float16 state through a float32 copy of the head: only the product's rounding differs.
    full = head.float()(hidden.float())
    head.half()
    assert torch.isfinite(ours).all() and ours.dtype == torch.float32
    assert ((ours - full).abs() <= 2**-10 * full.abs().max()).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_in_range_equal_the_plain_float16_product(family):
    """A float16 early exit whose product cannot overflow is bit for bit the head's own product."""
    model = _model(family, torch.float16)
    readout = LayerReadout.from_model(model)
    hidden = torch.randn(3, model.config.hidden_size, dtype=torch.float16) * 0.01
    plain = hidden if readout.project_out is None else readout.project_out(hidden)
    assert torch.equal(readout.early_exit_logits(hidden), readout.head(plain).float())


@pytest.mark.parametrize("large", [False, True], ids=["moderate", "large"])
@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_processor_step_scores_match_float32(name, family, dtype, large):
    full = _step_scores(_model(family, torch.float32, large), _strategy(name, family, torch.float32, large))
    half = _step_scores(_model(family, dtype, large), _strategy(name, family, dtype, large))
    _compare(half, full, dtype, large)


@pytest.mark.parametrize("large", [False, True], ids=["moderate", "large"])
@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("family", ["gpt2", "gemma2", "opt"])
@pytest.mark.parametrize("protocol", ["paper", "normalized"])
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_scores_of_continuations_match_float32(name, protocol, family, dtype, large):
    args = ("Q: Where is Paris? A:", [" In France.", " Rome", " x y z"])
    runs = {}
    for run_dtype in (torch.float32, dtype):
        model, strategy = _model(family, run_dtype, large), _strategy(name, family, run_dtype, large)
        runs[run_dtype] = score_continuations(model, TOKENIZER, *args, strategy=strategy, protocol=protocol)
    full, half = runs[torch.float32], runs[dtype]
    for h, f in zip(half, full, strict=True):
        _compare(h.token_scores[None], f.token_scores[None], dtype, large)


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_generate_loop_runs_in_half_precision(name, dtype):
    model = _model("gemma2", dtype, large=True)
    out = model.generate(
        prompt_ids(batch=2),
        attention_mask=torch.ones(2, 7, dtype=torch.long),
        custom_generate=strategy_generate,
        strategy=_strategy(name, "gemma2", dtype, large=True),
        strategy_tokenizer=TOKENIZER,
        max_new_tokens=3,
        min_new_tokens=3,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    assert out.sequences.shape == (2, 10)
    for scores in out.scores:
        assert not torch.isnan(scores).any() and not (scores == torch.inf).any()
