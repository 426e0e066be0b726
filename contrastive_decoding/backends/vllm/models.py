"""vLLM model classes that also publish the early exits a strategy reads: ``Contrast<Architecture>``.

Each class subclasses vLLM's own model class for that architecture (no fork, same weights loader)
and is selected with ``hf_overrides={"architectures": ["Contrast<Architecture>"]}`` (see
:func:`.llm.engine_arguments`). It captures the residual stream after ``k`` blocks (``k`` as in
transformers' ``hidden_states[k]``, 0 = embeddings):

* through vLLM's EAGLE-3 hook ``_set_aux_hidden_state_layers`` where the family has it (Llama,
  Mistral, Qwen2, Qwen3, Phi-3, Granite): it works with ``torch.compile`` and pipeline parallel;
* otherwise through forward hooks on the decoder blocks (Gemma, Gemma-2, GPT-2, OPT), which need
  ``enforce_eager=True``.

The forward returns the final state with the captured ones concatenated along the hidden
dimension, so vLLM's runner gathers them at exactly the rows it samples; ``compute_logits`` splits
them off, publishes them for the logits processor (:mod:`.exits`) and returns the model's own
logits. Classes are made on first access (``models.ContrastLlamaForCausalLM``), so vLLM imports them
by name in its worker process.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from contrastive_decoding.backends.vllm import exits
from contrastive_decoding.backends.vllm.selection import ENGINE_KEY, captured_layers

__all__ = [
    "AUX_ARCHITECTURES",
    "HOOK_ARCHITECTURES",
    "SUPPORTED_ARCHITECTURES",
    "PREFIX",
    "UnsupportedModelError",
]

PREFIX = "Contrast"
# vLLM classes whose inner model has the EAGLE-3 aux-hidden-state hook.
AUX_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",
    "GraniteForCausalLM",
)
# Families read with forward hooks on their decoder blocks (eager mode only).
HOOK_ARCHITECTURES = ("GemmaForCausalLM", "Gemma2ForCausalLM", "GPT2LMHeadModel", "OPTForCausalLM")
SUPPORTED_ARCHITECTURES = AUX_ARCHITECTURES + HOOK_ARCHITECTURES

_INNER_NAMES = ("model", "transformer")
_LAYER_NAMES = ("layers", "h")
_NORM_NAMES = ("norm", "ln_f", "final_layer_norm", "final_layernorm")


class UnsupportedModelError(ValueError):
    """An architecture (or engine setting) the vLLM backend cannot read layer by layer."""


class _LayerExitModel:
    """Mixed in before a vLLM ``*ForCausalLM`` class; see the module docstring."""

    def __init__(self, *, vllm_config: Any, prefix: str = "", **kwargs: Any) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        config = vllm_config.model_config.hf_config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        settings = getattr(config, ENGINE_KEY, None) or {}
        inner = _child(self, _INNER_NAMES)
        blocks = None if inner is None else _child(inner, _LAYER_NAMES)
        if blocks is None:
            raise UnsupportedModelError(f"{type(self).__name__}: could not find the decoder blocks.")
        num_layers = int(text.num_hidden_layers)
        captured = captured_layers(settings.get("layers", "all"), num_layers)
        self._contrast_hidden = int(text.hidden_size)
        self._contrast_captured = captured
        self._contrast_hooked: list[torch.Tensor | None] | None = None
        if hasattr(inner, "_set_aux_hidden_state_layers"):
            inner._set_aux_hidden_state_layers(captured)
        else:
            if not vllm_config.model_config.enforce_eager:
                raise UnsupportedModelError(
                    f"{type(self).__name__[len(PREFIX) :]} is read with forward hooks on its decoder "
                    "blocks, which need eager mode: pass enforce_eager=True (--enforce-eager)."
                )
            self._contrast_hooked = _install_hooks(inner, blocks, captured)
        norm = _child(inner, _NORM_NAMES)
        vocab = int(text.vocab_size)
        tied = bool(getattr(text, "tie_word_embeddings", False))
        exits.bind(exits.VllmLayerExits(self, norm, num_layers, tied, vocab, captured))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = super().forward(*args, **kwargs)
        if not self._contrast_captured:
            return out
        if self._contrast_hooked is not None:
            if not torch.is_tensor(out):  # a pipeline stage's intermediate tensors
                return out
            captured = list(self._contrast_hooked)
            self._contrast_hooked[:] = [None] * len(captured)
            return torch.cat([out, *captured], dim=-1)
        if not isinstance(out, tuple):
            return out
        hidden, aux = out
        return torch.cat([hidden, *aux], dim=-1)

    def _contrast_split(self, hidden_states: torch.Tensor) -> torch.Tensor:
        width = self._contrast_hidden
        if hidden_states.shape[-1] == width:  # no captured layers
            return hidden_states
        rows = hidden_states.shape[0]
        exits.publish(hidden_states[:, width:].reshape(rows, len(self._contrast_captured), width))
        return hidden_states[:, :width]

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return super().compute_logits(self._contrast_split(hidden_states))

    def compute_logits_local(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().compute_logits_local(self._contrast_split(hidden_states))


def _child(module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Module):
            return child
    return None


def _residual(value: Any) -> torch.Tensor:
    """The residual stream from a block's output (or input): vLLM's fused-norm families carry
    ``hidden_states`` and ``residual`` apart, and the stream is their sum."""
    if torch.is_tensor(value):
        return value
    tensors = [v for v in value if torch.is_tensor(v) and v.dim() >= 2]
    return tensors[0] if len(tensors) == 1 else tensors[0] + tensors[1]


def _install_hooks(inner: nn.Module, blocks: nn.ModuleList, captured: tuple[int, ...]) -> list:
    """Forward hooks that store the captured layers' states each forward, in ``captured`` order."""
    slots: list[torch.Tensor | None] = [None] * len(captured)

    def store(slot: int, value: Any) -> None:
        slots[slot] = _residual(value)

    for slot, layer in enumerate(captured):
        if layer == 0:  # the embedding output is block 0's input (after any position embedding)
            blocks[0].register_forward_pre_hook(
                lambda _m, args, kwargs, slot=slot: store(slot, _block_input(args, kwargs)), with_kwargs=True
            )
        else:
            blocks[layer - 1].register_forward_hook(lambda _m, _a, out, slot=slot: store(slot, out))
    return slots


def _block_input(args: tuple, kwargs: dict) -> tuple:
    """A block's hidden-state inputs (``positions`` is 1-D and left out)."""
    values = list(args) + [kwargs.get("hidden_states"), kwargs.get("residual")]
    return tuple(v for v in values if torch.is_tensor(v) and v.dim() >= 2)


def _make(name: str) -> type:
    from vllm import ModelRegistry

    base_name = name[len(PREFIX) :]
    base = ModelRegistry._try_load_model_cls(base_name) if base_name in SUPPORTED_ARCHITECTURES else None
    if base is None:
        raise AttributeError(name)
    cls = type(name, (_LayerExitModel, base), {"__module__": __name__, "__qualname__": name})
    globals()[name] = cls
    return cls


def __getattr__(name: str) -> type:
    if name.startswith(PREFIX):
        return _make(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
