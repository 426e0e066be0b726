"""Hostile inputs: every entry point refuses a bad argument with a ValueError that names it.

Each case checks the error type, that the message names the argument (``match=``), and that the
model is exactly as it was (hooks, attention implementation, weights), so a refused call never
leaves anything attached. Cases cover strategy parameters (through the strategy class and its
``LogitsProcessor`` or generate loop), scoring arguments, token ids outside the model's vocabulary,
amateurs, models that cannot run (meta device, encoder-decoder) and model paths that do not exist.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_same_state, cached_model, char_tokenizer, model_state, prompt_ids
from transformers import AutoConfig, AutoModelForCausalLM, T5Config, T5ForConditionalGeneration

from contrastive_decoding import (
    SLED,
    ActivationDecoding,
    Amateur,
    AutoContrastive,
    AutoContrastiveLogitsProcessor,
    ContextEntropy,
    ContrastiveDecoding,
    ContrastLogitsProcessor,
    DeCo,
    DeCoLogitsProcessor,
    DoLa,
    DoLaLogitsProcessor,
    EntropySource,
    InducedContrast,
    LayerCake,
    LayerCakeLogitsProcessor,
    LayerReadout,
    LowerLayerFusion,
    SLEDLogitsProcessor,
    VistaLogits,
    VistaLogitsProcessor,
    WeightedContrast,
    dola_generate,
    layercake_generate,
    load_model,
    plausible_mask,
    score_continuations,
    strategy_generate,
)
from contrastive_decoding.core.validation import check_int, check_number

pytestmark = pytest.mark.usefixtures("one_thread")

NAN, INF = float("nan"), float("inf")
PROMPT = "Q: Where is it? A:"
ANSWERS = [" Paris.", " Rome"]
AMATEUR = "<the small amateur model>"  # replaced by the model in `_strategy_kwargs`


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


def _model():
    return cached_model("llama")


def _amateur():
    return cached_model("llama", seed=1, num_hidden_layers=2)


def _strategy_kwargs(kwargs: dict) -> dict:
    return {k: (_amateur() if v is AMATEUR else v) for k, v in kwargs.items()}


_WRAPPERS = {
    DoLa: DoLaLogitsProcessor,
    SLED: SLEDLogitsProcessor,
    AutoContrastive: AutoContrastiveLogitsProcessor,
    DeCo: DeCoLogitsProcessor,
    VistaLogits: VistaLogitsProcessor,
}


def _processor(model, cls, kwargs, tokenizer):
    """The strategy's own LogitsProcessor where it has one, else the generic processor."""
    kwargs = _strategy_kwargs(kwargs)
    if cls is LayerCake:
        return LayerCakeLogitsProcessor(model, tokenizer, **kwargs)
    if cls in _WRAPPERS:
        return _WRAPPERS[cls](model, **kwargs)
    return ContrastLogitsProcessor(model, cls(**kwargs), tokenizer=tokenizer)


def _refused(model, fragment: str, call) -> None:
    """``call()`` raises a ValueError matching ``fragment`` and leaves ``model`` as it was."""
    before = model_state(model)
    with pytest.raises(ValueError, match=fragment):
        call()
    assert_same_state(before, model_state(model))


# -- 1. strategy parameters ------------------------------------------------------------------------
# (strategy, kwargs, fragment, before): `before` is what the library did before the shared checks,
# measured on the previous code: "accepted" (silently, often NaN/inf scores), an exception type for
# an unclear error, "late" for a clear error only once the strategy met a model, or None where the
# value was already refused clearly (a regression test).
ACCEPTED, LATE = "accepted", "late"
STRATEGY_CASES = [
    # LayerCake(beta=nan) generated token 0 at every step and scored NaN.
    (LayerCake, dict(beta=NAN), r"`beta` must be a finite number > -1.*got nan", ACCEPTED),
    (LayerCake, dict(beta=INF), r"`beta` must be a finite number", ACCEPTED),
    (LayerCake, dict(beta=1e39), r"`beta` must be a finite number.*float32", ACCEPTED),  # inf in float32
    (LayerCake, dict(beta=-INF), r"`beta` must be a finite number", None),
    (LayerCake, dict(beta=-1.0), r"`beta` must be > -1", None),
    (LayerCake, dict(beta="1"), r"`beta` must be a finite number", None),
    (LayerCake, dict(beta=True), r"`beta` must be a finite number", None),
    (LayerCake, dict(beta=None), r"`beta` must be a finite number", None),
    (LayerCake, dict(bias="x"), r"`bias` must be a finite number < 0", "ValueError: could not convert"),
    (LayerCake, dict(bias=NAN), r"`bias` must be a finite number < 0", LATE),
    (LayerCake, dict(bias=5.0), r"`bias` must be < 0", LATE),
    (
        LayerCake,
        dict(concept_gate=NAN),
        r"`concept_gate` must be a finite number in \[0, 1\)",
        "named `gate`",
    ),
    (LayerCake, dict(concept_gate=1.0), r"`concept_gate` must be in \[0, 1\)", "named `gate`"),
    (LayerCake, dict(min_tokens_to_keep=True), r"`min_tokens_to_keep` must be an int >= 1", ACCEPTED),
    (LayerCake, dict(relative_top=NAN), r"`relative_top` must be a finite number in \(0, 1\]", None),
    (DoLa, dict(dola_layers=2.0), r"`dola_layers` must be 'low', 'high', an int or a list", "TypeError"),
    (DoLa, dict(dola_layers=None), r"`dola_layers` must be 'low', 'high', an int or a list", "TypeError"),
    (DoLa, dict(dola_layers=True), r"`dola_layers` must be 'low', 'high', an int or a list", LATE),
    (DoLa, dict(dola_layers=[2, "4"]), r"`dola_layers` must be .* list of ints", LATE),
    (DoLa, dict(dola_layers=[2.0, 4.0]), r"`dola_layers` must be .* list of ints", LATE),
    (DoLa, dict(dola_layers=-1), r"`dola_layers` has layer -1, outside 0\.\.5", None),
    (DoLa, dict(dola_layers=10**30), r"`dola_layers` has layer 1000000000000000000000000000000", None),
    (DoLa, dict(relative_top=NAN), r"`relative_top` must be a finite number in \(0, 1\]", None),
    (DoLa, dict(relative_top=None), r"`relative_top` must be a finite number in \(0, 1\]", None),
    (DoLa, dict(relative_top="0.1"), r"`relative_top` must be a finite number", None),
    (DoLa, dict(relative_top=-0.1), r"`relative_top` must be in \(0, 1\]", None),
    (DoLa, dict(final_norm="no"), r"`final_norm` must be True or False", ACCEPTED),  # bool("no") is True
    (DoLa, dict(min_tokens_to_keep=True), r"`min_tokens_to_keep` must be an int >= 1", ACCEPTED),
    (DoLa, dict(min_tokens_to_keep=2.0), r"`min_tokens_to_keep` must be an int >= 1", None),
    # Beyond the vocabulary: was attached, then torch.topk failed at the first step.
    (DoLa, dict(min_tokens_to_keep=97), r"`min_tokens_to_keep`=97 .* vocabulary of 96", ACCEPTED),
    (SLED, dict(evolution_rate=1e39), r"`evolution_rate` must be a finite number", ACCEPTED),
    (SLED, dict(evolution_rate=INF), r"`evolution_rate` must be a finite number", None),
    (SLED, dict(evolution_lower_bound=-1e39), r"`evolution_lower_bound` must be a finite number", ACCEPTED),
    (SLED, dict(evolution_scale=None), r"`evolution_scale` must be an int >= 1", None),
    (SLED, dict(evolution_steps=-3), r"`evolution_steps` must be an int >= 1", None),
    (SLED, dict(post_softmax="yes"), r"`post_softmax` must be True or False", None),
    (AutoContrastive, dict(layer=NAN), r"`layer` as a fraction of depth must be in \[0, 1\]", None),
    (AutoContrastive, dict(layer=-INF), r"`layer` as a fraction of depth must be in \[0, 1\]", None),
    (
        AutoContrastive,
        dict(min_tokens_to_keep=500),
        r"`min_tokens_to_keep`=500 .* vocabulary of 96",
        ACCEPTED,
    ),
    (AutoContrastive, dict(relative_top=INF), r"`relative_top` must be a finite number", None),
    (DeCo, dict(alpha=INF), r"`alpha` must be a finite number >= 0", ACCEPTED),
    (DeCo, dict(alpha=NAN), r"`alpha` must be a finite number >= 0", None),
    (DeCo, dict(top_p=NAN), r"`top_p` must be a finite number in \(0, 1\]", None),
    (DeCo, dict(top_k=-1), r"`top_k` must be an int >= 1", None),
    (DeCo, dict(layers=(NAN, 0.5)), r"`layers`", None),
    (VistaLogits, dict(weight_late=NAN), r"`weight_late` must be a finite number in \[0, 1\]", None),
    (VistaLogits, dict(weight_late=True), r"`weight_late` must be a finite number in \[0, 1\]", None),
    (VistaLogits, dict(weight_late=None), r"`weight_late` must be a finite number in \[0, 1\]", None),
    (VistaLogits, dict(late_layers=(0.5, INF)), r"`late_layers`", None),
    (LowerLayerFusion, dict(weight=NAN), r"`weight` must be a finite number >= 0", ACCEPTED),
    (LowerLayerFusion, dict(weight=INF), r"`weight` must be a finite number >= 0", ACCEPTED),
    (LowerLayerFusion, dict(min_tokens_to_keep=0), r"`min_tokens_to_keep` must be an int >= 1", ACCEPTED),
    (LowerLayerFusion, dict(min_tokens_to_keep="2"), r"`min_tokens_to_keep` must be an int >= 1", ACCEPTED),
    (
        LowerLayerFusion,
        dict(min_tokens_to_keep=None),
        r"`min_tokens_to_keep` must be an int >= 1",
        "TypeError",
    ),
    (LowerLayerFusion, dict(final_norm="no"), r"`final_norm` must be True or False", ACCEPTED),
    (LowerLayerFusion, dict(suppression={"betaa": 1.0}), r"`suppression` has unknown LayerCake", "TypeError"),
    (LowerLayerFusion, dict(suppression=[("beta", 1.0)]), r"`suppression` must be a dict", "TypeError"),
    (LowerLayerFusion, dict(suppression={"beta": NAN}), r"`beta` must be a finite number", ACCEPTED),
    (LowerLayerFusion, dict(lower_layer=NAN), r"`lower_layer`", None),
    (InducedContrast, dict(min_tokens_to_keep=-3), r"`min_tokens_to_keep` must be an int >= 1", ACCEPTED),
    (InducedContrast, dict(min_tokens_to_keep=1.5), r"`min_tokens_to_keep` must be an int >= 1", ACCEPTED),
    # A negative id in the amateur's instruction: was accepted, then an IndexError in the embedding.
    (InducedContrast, dict(instruction=[5, -1]), r"`instruction` has token id -1", ACCEPTED),
    (InducedContrast, dict(relative_top=0), r"`relative_top` must be in \(0, 1\]", None),
    (ActivationDecoding, dict(alpha=INF), r"`alpha` must be a finite number >= 0", ACCEPTED),
    (ActivationDecoding, dict(min_tokens_to_keep=0), r"`min_tokens_to_keep` must be an int >= 1", ACCEPTED),
    (ActivationDecoding, dict(info_layer=NAN), r"`info_layer`", None),
    (
        ContrastiveDecoding,
        dict(amateur_model=AMATEUR, amateur_temperature=INF),
        r"`amateur_temperature`",
        ACCEPTED,
    ),
    (
        ContrastiveDecoding,
        dict(amateur_model=AMATEUR, amateur_temperature=NAN),
        r"`amateur_temperature`",
        None,
    ),
    (
        ContrastiveDecoding,
        dict(amateur_model=AMATEUR, min_tokens_to_keep=0),
        r"`min_tokens_to_keep`",
        ACCEPTED,
    ),
    (ContrastiveDecoding, dict(amateur_model=None), r"`amateur_model` must be a causal LM", None),
]


def _case_id(case) -> str:
    cls, kwargs, _, _ = case
    return f"{cls.__name__}-" + "-".join(f"{k}={v!r}"[:30] for k, v in kwargs.items())


@pytest.mark.parametrize("case", STRATEGY_CASES, ids=[_case_id(c) for c in STRATEGY_CASES])
def test_strategy_parameter_refused_by_processor(case, tokenizer):
    cls, kwargs, fragment, _ = case
    model = _model()
    _refused(model, fragment, lambda: _processor(model, cls, kwargs, tokenizer))


@pytest.mark.parametrize("case", STRATEGY_CASES, ids=[_case_id(c) for c in STRATEGY_CASES])
def test_strategy_parameter_refused_by_scoring(case, tokenizer):
    cls, kwargs, fragment, _ = case
    model = _model()

    def call():
        score_continuations(model, tokenizer, PROMPT, ANSWERS, strategy=cls(**_strategy_kwargs(kwargs)))

    _refused(model, fragment, call)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(dola_layers=2.0), "`dola_layers` must be"),  # was: TypeError
        (dict(dola_layers=None), "`dola_layers` must be"),  # was: TypeError
        (dict(relative_top=NAN), "`relative_top` must be a finite number"),
        (dict(final_norm="no"), "`final_norm` must be True or False"),  # was: accepted as True
    ],
)
def test_dola_generate_refuses(kwargs, fragment):
    model = _model()
    _refused(
        model,
        fragment,
        lambda: model.generate(prompt_ids(), custom_generate=dola_generate, max_new_tokens=2, **kwargs),
    )


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(beta=NAN), "`beta` must be a finite number"),  # was: token 0 every step
        (dict(bias="strong"), "`bias` must be a finite number"),  # was: float('strong') error
        (dict(concept_gate=-0.1), "`concept_gate` must be in"),  # was: named `gate`
    ],
)
def test_layercake_generate_refuses(kwargs, fragment, tokenizer):
    model = _model()
    _refused(
        model,
        fragment,
        lambda: model.generate(
            prompt_ids(), custom_generate=layercake_generate, classifier=tokenizer, max_new_tokens=2, **kwargs
        ),
    )


@pytest.mark.parametrize(
    ("parts", "fragment"),
    [
        # An infinite weight was accepted: -inf (ruled-out tokens) times inf gave NaN / -inf totals.
        ([(INF, DoLa())], r"`parts\[0\]` must be a finite number > 0 \(the part's weight.*got inf"),
        ([(NAN, DoLa())], r"`parts\[0\]` must be a finite number > 0.*got nan"),
        ([(0.5, DoLa()), (-1.0, VistaLogits())], r"`parts\[1\]` must be > 0.*got -1\.0"),
        ([(True, DoLa())], r"`parts\[0\]` must be a finite number > 0.*got True"),
        # was: "too many values to unpack", naming nothing
        ([(1.0, DoLa(), 2.0)], r"`parts\[0\]` must be a strategy or a \(weight, strategy\) pair"),
        ([3], r"`parts\[0\]` must be a strategy or a \(weight, strategy\) pair"),  # was: TypeError
        ([(1.0, "dola")], r"`parts\[0\]` must hold a ContrastStrategy"),
        ([], "`parts` must be a non-empty list"),
        (
            [DoLa(min_tokens_to_keep=200)],
            r"`min_tokens_to_keep`=200 .* vocabulary of 96",
        ),  # was: topk error later
    ],
)
def test_weighted_contrast_refuses(parts, fragment, tokenizer):
    model = _model()
    _refused(
        model,
        fragment,
        lambda: ContrastLogitsProcessor(model, WeightedContrast(parts), tokenizer=tokenizer),
    )


def test_min_tokens_to_keep_equal_to_the_vocabulary_is_valid(tokenizer):
    """The vocabulary check refuses only what cannot work: keeping every token is allowed."""
    model = _model()
    with DoLaLogitsProcessor(model, min_tokens_to_keep=96) as dola:
        out = model.generate(prompt_ids(), logits_processor=[dola], max_new_tokens=2, do_sample=False)
    assert out.shape == (1, 9)


def test_min_tokens_to_keep_beyond_the_vocabulary_refused_by_generate_loop():
    model = _model()  # was: RuntimeError from torch.topk at the first step
    _refused(
        model,
        "`min_tokens_to_keep`=100",
        lambda: model.generate(
            prompt_ids(),
            custom_generate=strategy_generate,
            strategy=DoLa(min_tokens_to_keep=100),
            max_new_tokens=2,
        ),  # fmt: skip
    )


# -- 2. scoring ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(continuations=[]), "`continuations` is empty"),
        (dict(continuations=" Paris"), "`continuations` must be a list of strings"),
        (dict(continuations=[" a", ""]), r"`continuations\[1\]` must be a non-empty string"),
        (dict(continuations=[" a", None]), r"`continuations\[1\]` must be a non-empty string"),
        (dict(continuations=(a for a in ANSWERS)), "`continuations` must be a list"),  # was: TypeError len()
        (dict(continuations={" a": 1}), "`continuations` must be a list"),  # was: KeyError 0
        (dict(prompt=None), "`prompt` must be a string"),
        (dict(prompt=b"Q: A:"), "`prompt` must be a string"),
        (dict(protocol="PAPER"), "`protocol` must be one of"),
        (dict(batch_size=0), "`batch_size` must be"),
        (dict(batch_size=True), "`batch_size` must be"),  # was: accepted as 1
        (dict(batch_size=2.0), "`batch_size` must be"),
        (dict(floor=NAN), "`floor` must be a finite number"),  # was: accepted (NaN for floored tokens)
        (dict(floor=-INF), "`floor` must be a finite number"),  # was: accepted (-inf totals)
        (dict(floor="low"), "`floor` must be a finite number"),  # was: torch TypeError / accepted
        (dict(positions_per_chunk=0), "`positions_per_chunk` must be an int >= 1"),  # was: range() error
        (dict(positions_per_chunk=-4), "`positions_per_chunk` must be an int >= 1"),  # was: torch.cat error
        (dict(share_prefix="no"), "`share_prefix` must be True or False"),  # was: truthy string
        (dict(tokenizer=None), "`tokenizer` is required"),  # was: TypeError NoneType not callable
        (dict(strategy=DoLa), "`strategy` must be a ContrastStrategy"),  # the class, not an instance
        (dict(strategy="dolla"), "Unknown strategy 'dolla'"),  # a registered name is accepted, a typo is not
    ],
)
@pytest.mark.parametrize("with_strategy", [False, True])
def test_scoring_arguments_refused(kwargs, fragment, with_strategy, tokenizer):
    model = _model()
    args = dict(
        model=model,
        tokenizer=tokenizer,
        prompt=PROMPT,
        continuations=ANSWERS,
        strategy=DoLa() if with_strategy else None,
        protocol="normalized",
    )
    args.update(kwargs)
    _refused(model, fragment, lambda: score_continuations(**args))


def _small_vocab_model():
    """A model with 64 token ids: the character tokenizer's lower-case letters (ids >= 64) exceed it."""
    return cached_model("llama", vocab_size=64)


@pytest.mark.parametrize("strategy", [None, DoLa(), InducedContrast(instruction=[5, 6])], ids=str)
@pytest.mark.parametrize(
    ("prompt", "answers", "fragment"),
    [
        ("Q: WHERE? A:", [" PARIS.", " rome"], r"`continuations\[1\]` has token id 86"),  # was: IndexError
        ("Q: where? A:", [" PARIS."], r"`prompt` has token id 91"),  # was: IndexError
    ],
)
def test_scoring_token_ids_outside_the_vocabulary(strategy, prompt, answers, fragment, tokenizer):
    model = _small_vocab_model()
    _refused(
        model,
        fragment + r", outside the model's vocabulary \(ids 0\.\.63\).*tokenizer",
        lambda: score_continuations(model, tokenizer, prompt, answers, strategy=strategy),
    )


@pytest.mark.parametrize("strategy", [None, DoLa()], ids=str)
def test_scoring_pad_id_outside_the_vocabulary_only_fills_masked_positions(strategy):
    """A pad token added to the tokenizer without resizing the model (id >= vocab) pads masked
    positions only: scores equal those with a pad id the model has (was: IndexError)."""
    model = _small_vocab_model()
    tokenizer = char_tokenizer()
    answers = [" PARIS.", " R"]  # different lengths, so rows are padded
    expected = score_continuations(model, tokenizer, "Q: A:", answers, strategy=strategy)
    tokenizer.pad_token = "z"  # id 94 >= 64
    before = model_state(model)
    got = score_continuations(model, tokenizer, "Q: A:", answers, strategy=strategy)
    assert_same_state(before, model_state(model))
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g.token_scores, e.token_scores)


def test_scoring_an_encoder_decoder_model(tokenizer):
    config = T5Config(
        vocab_size=96, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2, decoder_start_token_id=0
    )
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config).eval()
    for strategy in (None, DoLa()):  # None was: an obscure error from T5's forward
        _refused(
            model,
            "encoder-decoder model; .*decoder-only causal LMs",
            lambda strategy=strategy: score_continuations(
                model, tokenizer, PROMPT, ANSWERS, strategy=strategy
            ),
        )


def test_scoring_something_that_is_not_a_model(tokenizer):
    with pytest.raises(ValueError, match="`model` must be a causal LM"):  # was: AttributeError
        score_continuations("gpt2", tokenizer, PROMPT, ANSWERS)


# -- 3. models on the meta device ------------------------------------------------------------------
@pytest.fixture(scope="module")
def meta_model():
    config = AutoConfig.for_model(
        "llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config).eval()


def _hooks(model) -> dict:
    # model_state clones the weights, which a meta model does not have; the hooks are what matter.
    state = model_state(model)
    return {"hooks": state["hooks"], "attn": state["attn"]}


@pytest.mark.parametrize(
    "call",
    [
        lambda m, tok: DoLaLogitsProcessor(m),  # was: attached; generate then failed inside torch
        lambda m, tok: LayerCakeLogitsProcessor(m, tok),
        lambda m, tok: ContrastLogitsProcessor(m, InducedContrast(), tokenizer=tok),
        lambda m, tok: score_continuations(m, tok, PROMPT, ANSWERS),  # was: "Cannot copy out of meta"
        lambda m, tok: score_continuations(m, tok, PROMPT, ANSWERS, strategy=SLED()),
        lambda m, tok: LayerReadout.from_model(m),
        lambda m, tok: m.generate(prompt_ids(), custom_generate=dola_generate, max_new_tokens=2),
    ],
    ids=[
        "dola-processor",
        "layercake-processor",
        "icd-processor",
        "plain-scoring",
        "sled-scoring",
        "readout",
        "dola-generate",
    ],  # fmt: skip
)
def test_meta_device_model_refused(call, meta_model, tokenizer):
    before = _hooks(meta_model)
    with pytest.raises(ValueError, match="`model` .*'meta' device"):
        call(meta_model, tokenizer)
    assert _hooks(meta_model) == before


def test_meta_device_amateur_refused(meta_model, tokenizer):
    model = _model()  # was: attached; the amateur's forward then failed inside torch
    _refused(
        model,
        "'meta' device",
        lambda: ContrastLogitsProcessor(model, ContrastiveDecoding(meta_model), tokenizer=tokenizer),
    )


# -- 4. amateurs -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("strategy", "fragment"),
    [
        # ICD / LOL instructions with ids the model cannot read: was IndexError at the first step.
        (lambda: InducedContrast(instruction=[5, 500]), r"`instruction` has token id 500.*ids 0\.\.95"),
        (lambda: InducedContrast(instruction=[5, 10**12]), r"`instruction` has token id 1000000000000"),
        (
            lambda: LowerLayerFusion(amateur="prompt", amateur_instruction=[96]),
            r"`amateur_instruction` has token id 96",
        ),
        (
            lambda: ContrastiveDecoding(_small_vocab_model()),
            "output head has 64 tokens but the model's has 96",
        ),
    ],
)
def test_amateur_ids_outside_the_vocabulary_refused(strategy, fragment, tokenizer):
    model = _model()
    _refused(model, fragment, lambda: ContrastLogitsProcessor(model, strategy(), tokenizer=tokenizer))
    _refused(
        model, fragment, lambda: score_continuations(model, tokenizer, PROMPT, ANSWERS, strategy=strategy())
    )


def test_text_instruction_outside_a_small_vocabulary_refused(tokenizer):
    model = _small_vocab_model()  # lower-case letters tokenize to ids >= 64: was IndexError
    _refused(
        model,
        r"`instruction` has token id \d+, outside the model's vocabulary \(ids 0\.\.63\)",
        lambda: ContrastLogitsProcessor(model, InducedContrast(instruction="lie"), tokenizer=tokenizer),
    )


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(prefix=[4, -2]), "`prefix` has token id -2"),  # was: accepted
        (dict(prefix="x", replace=[-1]), "`replace` has token id -1"),  # was: accepted
        (dict(prefix=[4.0]), "`prefix` must be a non-empty string or a non-empty list of token ids"),
        (dict(prefix=torch.tensor([4.5])), "`prefix` must be a non-empty string or a non-empty list"),
        (dict(prefix=torch.tensor([[4, 5]])), "`prefix` must be a non-empty string or a non-empty list"),
        (dict(model="gpt2"), "`model` must be a causal LM"),
    ],
)
def test_amateur_arguments_refused(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        Amateur(**kwargs)


def test_amateur_ids_as_integer_tensor_accepted():
    """Token ids as an integer tensor or NumPy ints are ids, taken as Python ints."""
    assert Amateur(prefix=torch.tensor([4, 5])).prefix == [4, 5]


@pytest.mark.parametrize("path", ["/no/such/amateur-dir", "./no-such-model", "~/no/such/model"])
def test_amateur_path_that_does_not_exist(path):
    # was: transformers' "Repo id must be in the form 'repo_name' or 'namespace/repo_name'"
    with pytest.raises(ValueError, match=r"`amateur_model`=.* is a path that does not exist"):
        ContrastiveDecoding(path)
    with pytest.raises(ValueError, match=r"`name_or_path`=.* does not exist.*Hub id"):
        load_model(path)


def test_amateur_given_as_an_existing_path_or_hub_id_says_load_it(tmp_path):
    for name in (str(tmp_path), "HuggingFaceTB/SmolLM2-135M"):
        with pytest.raises(ValueError, match="`amateur_model` must be a causal LM.*load_model"):
            ContrastiveDecoding(name)


def test_missing_model_path_is_still_an_os_error():
    """Callers that catch OSError (a missing file) keep working."""
    with pytest.raises(OSError, match="does not exist"):
        load_model("/no/such/model-dir")


# -- 5. the shared checks and the plausibility filter ----------------------------------------------
@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        (NAN, r"`x` must be a finite number >= 0 \(hint\), got nan\."),
        (INF, r"`x` must be a finite number >= 0 \(hint\), got inf\."),
        (
            1e39,
            r"`x` must be a finite number >= 0 \(hint\) \(the scores are computed in float32, .*got 1e\+39",
        ),
        (10**400, "`x` must be a finite number >= 0"),
        (torch.tensor(1.0), r"`x` must be a finite number >= 0 \(hint\), got tensor\(1\.\) \(Tensor\)"),
        (-0.5, r"`x` must be >= 0 \(hint\), got -0\.5\."),
        ([1.0], "`x` must be a finite number"),
    ],
)
def test_check_number_messages(value, fragment):
    with pytest.raises(ValueError, match=fragment):
        check_number("x", value, 0.0, hint="hint")


def test_check_helpers_accept_numpy_scalars_and_return_python_types():
    np = pytest.importorskip("numpy")
    assert type(check_number("x", np.float32(0.5), 0.0, 1.0)) is float
    assert type(check_int("n", np.int64(3), 1)) is int
    with pytest.raises(ValueError, match="`n` must be an int >= 1"):
        check_int("n", np.float64(3.0), 1)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(relative_top=NAN), "`relative_top` must be a finite number"),  # was: every token masked
        (dict(relative_top=0.0), "`relative_top` must be in"),  # was: log(0) error
        # was: RuntimeError from torch.topk
        (dict(relative_top=0.1, min_tokens_to_keep=11), "`min_tokens_to_keep`=11 .* vocabulary of 10"),
        (
            dict(relative_top=0.1, min_tokens_to_keep=0),
            "`min_tokens_to_keep` must be an int >= 1",
        ),  # accepted
    ],
)
def test_plausible_mask_refuses(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        plausible_mask(torch.randn(2, 10).log_softmax(-1), **kwargs)


def test_plausible_mask_refuses_a_tensor_without_a_vocabulary_dimension():
    with pytest.raises(ValueError, match="`log_probs` must have a vocabulary dimension"):  # was: accepted
        plausible_mask(torch.tensor(-0.5), 0.1)


@pytest.mark.parametrize("chunk", [0, 2.5, None])
def test_context_entropy_chunk_refused(chunk):
    readout = LayerReadout.from_model(_model())
    with pytest.raises(ValueError, match="`positions_per_chunk` must be an int >= 1"):  # was: accepted
        ContextEntropy(readout, EntropySource(3), positions_per_chunk=chunk)


def test_valid_inputs_still_give_finite_scores(tokenizer):
    """Regression guard: the checks refuse only bad values; a valid LayerCake still scores."""
    model = _model()
    scores = score_continuations(model, tokenizer, PROMPT, ANSWERS, strategy=LayerCake(beta=0.5))
    assert all(math.isfinite(s.total) for s in scores)
