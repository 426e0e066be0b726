"""Model-agnostic access to a decoder-only model's layer stack and output head.

Every strategy in this library reads the residual stream between decoder blocks and turns it into
vocabulary logits ("early exit", the logit lens). Transformers has no uniform accessor for the parts
that needs, so :class:`LayerReadout` finds them once per model:

* the decoder blocks (``layers``, ``h``, ...), whose inputs are ``hidden_states[j]``;
* the final norm and OPT's optional ``project_out``;
* the output head (``get_output_embeddings()``) and Gemma-2/3 final-logit soft-capping;
* the tied-embedding flag that DoLa's layer buckets depend on.

Layer indices follow ``output_hidden_states``: ``0`` is the embedding output, ``j`` in ``1..N-1`` is
the stream after block ``j``, and ``N`` (the mature layer) is the model's own output.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch import nn

from contrastive_decoding.core.specs import check_layer_indices
from contrastive_decoding.core.validation import check_usable_model

__all__ = ["LayerReadout", "UnsupportedModelError", "TESTED_MODEL_TYPES"]

# Families whose readout is checked against `output_hidden_states` by the test-suite.
TESTED_MODEL_TYPES = (
    "llama",
    "qwen2",
    "qwen3",
    "mistral",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi",
    "phi3",
    "gpt2",
    "gpt_neox",
    "opt",
)

# State-space / recurrent families: they have no attention-style residual stream that the logit
# lens and the KV-cache machinery of this library assume.
_RECURRENT_MODEL_TYPES = (
    "mamba",
    "mamba2",
    "falcon_mamba",
    "rwkv",
    "recurrent_gemma",
    "xlstm",
    "jamba",
    "zamba",
    "zamba2",
    "bamba",
    "falcon_h1",
    "lfm2",
)

_LAYER_LIST_NAMES = ("layers", "h", "blocks", "block")
_FINAL_NORM_NAMES = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "final_norm")


class UnsupportedModelError(ValueError):
    """Raised when a model's architecture cannot be read layer by layer."""


@dataclass(frozen=True)
class LayerReadout:
    """The parts of a causal LM that early-exit logits need.

    Build it with :meth:`LayerReadout.from_model`; the constructor is for tests and exotic models.

    Args:
        model: the ``*ForCausalLM`` model.
        layers: the decoder blocks, in order.
        final_norm: the final norm applied before the head (``None`` if the model has none).
        project_out: OPT's projection from hidden size to embedding size (``None`` otherwise).
        head: the output head (``model.get_output_embeddings()``).
        logit_softcap: Gemma-2/3's ``final_logit_softcapping`` (``None`` if unused).
        tied_embeddings: whether the head shares its weight with the input embeddings.
        decoder: the module that holds the blocks and receives each forward's ``input_ids``.
    """

    model: nn.Module
    layers: nn.ModuleList
    final_norm: nn.Module | None
    project_out: nn.Module | None
    head: nn.Module
    logit_softcap: float | None
    tied_embeddings: bool
    decoder: nn.Module | None = None

    @classmethod
    def from_model(cls, model: nn.Module) -> LayerReadout:
        """Locate the decoder blocks, final norm and head of ``model``.

        Raises:
            UnsupportedModelError: encoder-decoder or recurrent models, models without an output
                head, or models whose decoder blocks cannot be found; the message names the class.
            ValueError: ``model`` is not an ``nn.Module``, or has weights on the ``meta`` device.
        """
        name = type(model).__name__
        config = getattr(model, "config", None)
        if config is None:
            raise UnsupportedModelError(f"{name} has no `config`; pass a transformers `*ForCausalLM` model.")
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(config, "is_encoder_decoder", False):
            raise UnsupportedModelError(
                f"{name} is an encoder-decoder model; layer-contrastive decoding supports "
                "decoder-only causal LMs (e.g. Llama, Qwen2, Mistral, Gemma, Phi, GPT-2, OPT)."
            )
        model_type = getattr(text_config, "model_type", "") or getattr(config, "model_type", "")
        if model_type in _RECURRENT_MODEL_TYPES:
            raise UnsupportedModelError(
                f"{name} (model_type={model_type!r}) is a recurrent/state-space model; "
                "layer-contrastive decoding supports attention decoder-only causal LMs."
            )
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None or not hasattr(head, "weight"):
            raise UnsupportedModelError(
                f"{name} has no output head (`get_output_embeddings()` returned {head!r}); "
                "load the model with a language-modelling head, e.g. AutoModelForCausalLM."
            )
        decoder = _find_decoder(model)
        if decoder is None:
            raise UnsupportedModelError(
                f"{name}: could not find its decoder blocks (looked for "
                f"{', '.join(_LAYER_LIST_NAMES)} on get_decoder() and the base model); "
                "this architecture is not supported."
            )
        layers = _find_child(decoder, _LAYER_LIST_NAMES)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise UnsupportedModelError(
                f"{name}: could not find the decoder blocks on {type(decoder).__name__} "
                f"(looked for {', '.join(_LAYER_LIST_NAMES)}); this architecture is not supported."
            )
        num_layers = getattr(text_config, "num_hidden_layers", len(layers))
        if num_layers != len(layers):
            raise UnsupportedModelError(
                f"{name}: config says {num_layers} layers but {len(layers)} blocks were found."
            )
        tied = bool(
            getattr(text_config, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False))
        )
        softcap = getattr(text_config, "final_logit_softcapping", None)
        # Every strategy, processor, generate loop and scoring call passes here before attaching
        # anything: a model without real weights is refused now rather than inside a forward.
        check_usable_model(model)
        return cls(
            model=model,
            layers=layers,
            final_norm=_find_child(decoder, _FINAL_NORM_NAMES),
            project_out=getattr(decoder, "project_out", None),
            head=head,
            logit_softcap=float(softcap) if softcap else None,
            tied_embeddings=tied,
            decoder=decoder,
        )

    @property
    def vocab_size(self) -> int:
        """The number of tokens the output head scores."""
        return self.head.weight.shape[0]

    @property
    def num_layers(self) -> int:
        """N, the number of decoder blocks; layer N is the mature (final) layer."""
        return len(self.layers)

    def layout_of(self, model: nn.Module | None) -> LayerReadout:
        """The readout of another model (an amateur); ``None`` is this one."""
        return self if model is None or model is self.model else LayerReadout.from_model(model)

    def check_layers(self, layers: list[int], argument: str = "layers") -> list[int]:
        """Validate premature-layer indices for this model; see :func:`check_layer_indices`."""
        return check_layer_indices(layers, self.num_layers, argument, type(self.model).__name__)

    def early_exit_logits(self, hidden: torch.Tensor, final_norm: bool = False) -> torch.Tensor:
        """Vocabulary logits from intermediate hidden states, in one product with the head.

        Args:
            hidden: states of shape ``(..., hidden_size)``; stack several layers along a leading
                dimension so the head weights are read once for all of them.
            final_norm: apply the model's final norm (and, like the model's own output, Gemma's
                logit soft-capping) before the head. DoLa's reference applies the raw head.

        Returns:
            Logits of shape ``(..., vocab_size)`` in the model's dtype, except for float16 models:
            float32 there. Early exits without the final norm can be far larger than the model's
            own output and overflow float16 in the head product (``inf``, then ``NaN`` in every
            softmax), so each row is divided by a power of two that keeps its product in range
            (chosen from ``|h|_1 * max|W|``), multiplied back in float32, and the bias corrected;
            rows in range are computed exactly as ``head(hidden)``. bfloat16 has float32's range.
        """
        if final_norm and self.final_norm is not None:
            hidden = self.final_norm(hidden)
        half = hidden.dtype == torch.float16
        if self.project_out is not None:
            # Needed for shape (hidden size != embedding size), so applied with or without norm.
            hidden = _scaled_half_linear(self.project_out, hidden) if half else self.project_out(hidden)
        logits = _scaled_half_linear(self.head, hidden) if half else _head_product(self.head, hidden)
        if final_norm and self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits


# Largest float16 product magnitude allowed before scaling (float16's max is 65504): headroom for
# the rounding of the bound and of the bias added after the product.
_HALF_LIMIT = 2.0**14
# id(head weight) -> (a weak reference to it, its version, max |w| as a float32 scalar tensor): the
# bound is read once per weight, not every step. (Tensors cannot be WeakKeyDictionary keys: their
# `==` is elementwise.)
_WEIGHT_BOUND: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


def _max_abs_weight(weight: torch.Tensor) -> torch.Tensor:
    cached = _WEIGHT_BOUND.get(id(weight))
    if cached is None or cached[0]() is not weight or cached[1] != weight._version:
        with torch.no_grad():
            bound = weight.detach().abs().amax().float()
        key = id(weight)
        _WEIGHT_BOUND[key] = cached = (
            weakref.ref(weight, lambda _, key=key: _WEIGHT_BOUND.pop(key, None)),
            weight._version,
            bound,
        )
    return cached[2]


def _scaled_half_linear(linear: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``linear(hidden)`` in float32 for a float16 linear map (the head, OPT's ``project_out``),
    without overflow (see ``early_exit_logits``); ``hidden`` may be float16 or float32.

    Each row ``h`` runs as ``linear(h / s) * s - b * (s - 1)``, ``s`` the smallest power of two
    with ``|h|_1 * max|W| / s <= 2**14``: dividing by a power of two is exact, so rows with
    ``s = 1`` equal ``linear(h)``, and larger rows keep float16's relative precision. No float32
    copy of the weight is made, and nothing leaves the device (no host synchronisation).
    """
    weight = linear.weight
    if weight.device.type == "meta":  # offloaded: its weights exist only inside its forward
        return linear(hidden.to(torch.float16)).float()
    bound = hidden.detach().abs().float().sum(-1, keepdim=True) * _max_abs_weight(weight).to(hidden.device)
    scale = torch.exp2(torch.ceil(torch.log2(bound / _HALF_LIMIT)).clamp(min=0.0))
    out = linear((hidden.float() / scale).to(torch.float16)).float()
    scale = scale.to(out.device)
    out = out * scale
    bias = getattr(linear, "bias", None)
    if bias is not None:
        out = out - bias.to(out.device).float() * (scale - 1.0)
    return out


_HEAD_SLICE = 2048


def _head_product(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``head(hidden)``, bit for bit, computed in vocabulary slices where that is faster.

    On CPU in float32 with few rows (a decoding step's stacked layers), MKL repacks the whole
    (vocab, hidden) weight for every small product; slices of ``_HEAD_SLICE`` vocabulary rows keep
    each packed slice in cache. With one intra-op thread every logit gets the same kernel and
    summation order, so the result equals ``head(hidden)`` exactly (checked with torch.equal for
    2-1024 rows, vocab 4k-152k, with and without bias). With more threads MKL may split a small
    product differently from its slices (seen on some CPUs: 4-8 rows differ in the last bit), so the
    slices are taken only with one thread (the harness's ``--threads 1``). Sliced, 8 rows of
    SmolLM2's 576 x 49152 head took ~12.5 ms instead of ~17.5 ms. Above ~256 rows the product is
    compute-bound and slicing stops paying; gradients would not be bit-identical, hence the autograd
    guard.
    """
    weight = getattr(head, "weight", None)
    rows = hidden.numel() // hidden.shape[-1]
    sliceable = (
        type(head) is nn.Linear
        and not (head._forward_hooks or head._forward_pre_hooks or "forward" in head.__dict__)
        and torch.backends.mkl.is_available()
        and hidden.device.type == "cpu"
        and hidden.dtype == torch.float32
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and 1 < rows <= 256
        and torch.get_num_threads() == 1
        and not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad))
        and weight.shape[0] >= 2 * _HEAD_SLICE
    )
    if not sliceable:
        return head(hidden)
    flat = hidden.reshape(rows, hidden.shape[-1])
    vocab, bias = weight.shape[0], head.bias
    starts = list(range(0, vocab - _HEAD_SLICE + 1, _HEAD_SLICE))
    ends = starts[1:] + [vocab]  # the last slice takes the remainder: a small odd slice breaks bit-identity
    parts = [
        nn.functional.linear(flat, weight[a:b], None if bias is None else bias[a:b])
        for a, b in zip(starts, ends, strict=True)
    ]
    return torch.cat(parts, dim=-1).reshape(*hidden.shape[:-1], vocab)


def _find_decoder(model: nn.Module) -> nn.Module | None:
    """The module holding the decoder blocks, final norm and (OPT) project_out."""
    candidates = []
    if hasattr(model, "get_decoder"):
        candidates.append(model.get_decoder())
    # transformers 4.x: GPT-2's get_decoder() returns the LM itself; OPT's returns OPTModel.
    candidates.append(getattr(model, getattr(model, "base_model_prefix", ""), None))
    for candidate in list(candidates):
        candidates.append(getattr(candidate, "decoder", None))
    for candidate in candidates:
        if isinstance(candidate, nn.Module) and isinstance(
            _find_child(candidate, _LAYER_LIST_NAMES), nn.ModuleList
        ):
            return candidate
    return None


def _find_child(module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for attr in names:
        child = getattr(module, attr, None)
        if isinstance(child, nn.Module):
            return child
    return None
