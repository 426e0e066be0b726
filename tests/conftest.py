"""Shared fixtures: tiny random models of every supported family, built from configs (no Hub)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402

VOCAB = 96
SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
_LLAMA_LIKE = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)

# model_type -> config kwargs. Six layers so that "low"/"high" buckets hold several layers.
FAMILY_CONFIGS: dict[str, dict] = {
    "llama": dict(_LLAMA_LIKE),
    "qwen2": dict(_LLAMA_LIKE),
    "qwen3": dict(_LLAMA_LIKE, head_dim=8),
    "mistral": dict(_LLAMA_LIKE, sliding_window=None),
    "gemma": dict(_LLAMA_LIKE, head_dim=8),
    "gemma2": dict(_LLAMA_LIKE, head_dim=8, sliding_window=8, final_logit_softcapping=30.0),
    "gemma3_text": dict(_LLAMA_LIKE, head_dim=8, sliding_window=8, final_logit_softcapping=30.0),
    "phi": dict(_LLAMA_LIKE, num_key_value_heads=4),
    "phi3": dict(_LLAMA_LIKE),
    "gpt2": dict(vocab_size=VOCAB, n_embd=32, n_layer=6, n_head=4, n_positions=256),
    "gpt_neox": dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        max_position_embeddings=256,
    ),
    "opt": dict(
        vocab_size=VOCAB,
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=6,
        num_attention_heads=4,
        max_position_embeddings=256,
        word_embed_proj_dim=16,
    ),
}
FAMILIES = list(FAMILY_CONFIGS)


def build_config(family: str, **overrides):
    kwargs = dict(FAMILY_CONFIGS[family], **SPECIAL)
    kwargs.update(overrides)
    return AutoConfig.for_model(family, **kwargs)


def build_model(family: str, seed: int = 0, **overrides):
    """A tiny random model of ``family`` in eval mode, deterministic for a given seed."""
    config = build_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    # Random init leaves tiny logits and flat distributions; scale the head so that greedy choices
    # are well separated and layer contrasts are non-trivial.
    with torch.no_grad():
        head = model.get_output_embeddings()
        head.weight.mul_(4.0)
    return model


_BUILT: dict[tuple, torch.nn.Module] = {}


def cached_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """``build_model`` memoised per (family, seed, overrides); tests must leave the model unchanged."""
    key = (family, seed, tuple(sorted(overrides.items())))
    if key not in _BUILT:
        _BUILT[key] = build_model(family, seed=seed, **overrides)
    return _BUILT[key]


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer over the tiny models' 96 ids, built offline.

    ids 0-3 are <pad>, <s>, </s>, <unk>; ids 4..95 are the characters " " .. "{" (no newline).
    """
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for code in range(32, 32 + VOCAB - len(vocab)):
        vocab[chr(code)] = len(vocab)
    assert sorted(vocab.values()) == list(range(VOCAB))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


_CACHE: dict[str, torch.nn.Module] = {}


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-model tests (use with ``pytestmark``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture
def tiny_model(family):
    """The family's tiny model (shared across tests; tests must leave it unchanged)."""
    if family not in _CACHE:
        _CACHE[family] = build_model(family)
    return _CACHE[family]


def prompt_ids(batch: int = 1, length: int = 7, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def left_padded(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D id tensors into (input_ids, attention_mask)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return ids, mask


def model_state(model) -> dict:
    """Everything the tests check is restored: hooks on every module and the parameters."""
    hooks = {
        name: (
            dict(m._forward_hooks),
            dict(m._forward_pre_hooks),
            dict(getattr(m, "_forward_hooks_with_kwargs", {})),
        )
        for name, m in model.named_modules()
    }
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"hooks": hooks, "params": params, "attn": model.config._attn_implementation}


def assert_same_state(before: dict, after: dict) -> None:
    assert before["hooks"] == after["hooks"]
    assert before["attn"] == after["attn"]
    assert before["params"].keys() == after["params"].keys()
    for k in before["params"]:
        assert torch.equal(before["params"][k], after["params"][k]), k


def assert_refused_before_attaching(model, processor_class, kwargs: dict, fragment: str) -> None:
    """Building the processor with bad ``kwargs`` raises a ValueError matching ``fragment`` and
    leaves the model exactly as it was."""
    before = model_state(model)
    with pytest.raises(ValueError, match=fragment):
        processor_class(model, **kwargs)
    assert_same_state(before, model_state(model))


def assert_restored_after_block(model, processor_class) -> None:
    """An exception inside the processor's ``with`` block restores the model; the processor then
    refuses to run."""
    before = model_state(model)
    with pytest.raises(ZeroDivisionError):
        with processor_class(model) as proc:
            model.generate(prompt_ids(), logits_processor=[proc], max_new_tokens=2)
            raise ZeroDivisionError
    assert_same_state(before, model_state(model))
    with pytest.raises(RuntimeError, match="detached"):
        proc(prompt_ids(), torch.zeros(1, model.config.vocab_size))


# Devices the device-parametrised tests run on: the CPU always, CUDA where torch sees a GPU
# (`bash scripts/gpu_check.sh` runs those tests on it).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
_ON_DEVICE: dict[tuple[int, str], torch.nn.Module] = {}


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def on_device(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """``model`` itself on the CPU; elsewhere a copy of it moved there (kept for later tests)."""
    if device == "cpu":
        return model
    key = (id(model), device)
    if key not in _ON_DEVICE:
        import copy

        _ON_DEVICE[key] = copy.deepcopy(model).to(device)
    return _ON_DEVICE[key]


def strategy_settings() -> dict:
    """One setting of every strategy family, name -> factory(amateur model): layer exits (with and
    without the final norm), degraded streams, a prompt amateur, a model amateur (``amateur``, for
    classic CD), a context entropy and a weighted mix. Shared by the half-precision and dispatch
    tests so that both cover the same strategies."""
    from contrastive_decoding import (
        SLED,
        ActivationDecoding,
        AutoContrastive,
        ContrastiveDecoding,
        DeCo,
        DoLa,
        InducedContrast,
        LayerCake,
        LowerLayerFusion,
        VistaLogits,
        WeightedContrast,
    )

    return {
        "dola": lambda amateur: DoLa("high"),
        "dola-final-norm": lambda amateur: DoLa("low", final_norm=True),
        "sled": lambda amateur: SLED(),
        "acd": lambda amateur: AutoContrastive(layer=2),
        "deco": lambda amateur: DeCo(),
        "vista": lambda amateur: VistaLogits(),
        "layercake": lambda amateur: LayerCake(),
        "lol": lambda amateur: LowerLayerFusion(),
        "icd": lambda amateur: InducedContrast(),
        "cd": lambda amateur: ContrastiveDecoding(amateur),
        "activation": lambda amateur: ActivationDecoding(context="all"),
        # No SLED part: its floor (-100) moves with its top-k set, which half precision can shift.
        "weighted": lambda amateur: WeightedContrast([(1.0, DoLa("high")), (0.5, InducedContrast())]),
    }


@pytest.fixture
def registry():
    """The strategy registry (the library's and the harness's own entries), restored after the test,
    so strategies a test registers never leak into others (e.g. the shared strategy tester)."""
    from contrastive_decoding.eval import strategies as harness

    import contrastive_decoding.strategies  # noqa: F401 - the built-ins, registered before the snapshot
    from contrastive_decoding.core import registry as core_registry
    saved = dict(core_registry._REGISTRY), dict(core_registry._PRESETS), dict(harness._OWN)
    yield harness.STRATEGIES
    live_tables = (core_registry._REGISTRY, core_registry._PRESETS, harness._OWN)
    for live, kept in zip(live_tables, saved, strict=True):
        live.clear()
        live.update(kept)


# The families the shared strategy tester (tests/backends/hf/test_strategy_contract.py) runs every registered
# strategy on. A per-strategy test that repeats one of its checks (state restored, processor equals
# loop, padded rows equal rows alone, uncached equals cached) on several families runs on the others.
CONTRACT_FAMILIES = ["llama", "gpt2"]
OTHER_FAMILIES = [f for f in FAMILIES if f not in CONTRACT_FAMILIES]


@torch.no_grad()
def processor_step(processor_class, model, ids: torch.Tensor, **kwargs):
    """One step of a processor outside ``generate``: ``(processor, scores)`` for the last position
    of each row of ``ids`` (the processor is detached on return)."""
    with processor_class(model, **kwargs) as proc:
        scores = model(ids).logits[:, -1].float()
        out = proc(ids, scores)
    return proc, out


def greedy_processor_generate(model, processor, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Stock greedy ``generate`` of an unpadded batch with ``processor``, exactly ``steps`` new
    tokens (``min_new_tokens`` masks EOS)."""
    return model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        logits_processor=[processor],
        do_sample=False,
        max_new_tokens=steps,
        min_new_tokens=steps,
    )


def reference_greedy(step, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding from a reference ``step(sequences) -> (B, V)`` scores (recomputed from scratch
    at each step), EOS masked as ``min_new_tokens`` does: what :func:`greedy_processor_generate`
    must give."""
    for _ in range(steps):
        scores = step(ids).clone()
        scores[:, SPECIAL["eos_token_id"]] = -torch.inf
        ids = torch.cat([ids, scores.argmax(-1, keepdim=True)], dim=1)
    return ids


SCORING_PROMPT = "Q: Where is the Eiffel tower? A:"
SCORING_CONTINUATIONS = [" Paris.", " In Rome, Italy.", " x"]


def assert_scores_match_reference(model, strategy, reference, protocol: str) -> None:
    """``score_continuations`` of :data:`SCORING_CONTINUATIONS` after :data:`SCORING_PROMPT` gives,
    for each continuation, the token scores ``reference(full, positions, targets)`` (float64
    ``(tokens,)``: ``full`` the prompt and continuation ids, ``positions`` the positions predicting
    the continuation's tokens ``targets``), and leaves the model as it was."""
    from contrastive_decoding import score_continuations

    tokenizer = char_tokenizer()
    before = model_state(model)
    got = score_continuations(
        model, tokenizer, SCORING_PROMPT, SCORING_CONTINUATIONS, strategy=strategy, protocol=protocol
    )
    assert_same_state(before, model_state(model))
    n_prefix = len(tokenizer(SCORING_PROMPT)["input_ids"])
    for cont, score in zip(SCORING_CONTINUATIONS, got, strict=True):
        full = tokenizer(SCORING_PROMPT + cont)["input_ids"]
        positions = torch.arange(n_prefix - 1, len(full) - 1)
        with torch.no_grad():
            expected = reference(full, positions, torch.tensor(full[n_prefix:]))
        assert score.token_ids == full[n_prefix:]
        torch.testing.assert_close(score.token_scores.double(), expected, rtol=1e-4, atol=1e-4)
        assert score.total == pytest.approx(float(expected.sum()), rel=1e-4, abs=1e-3)
