"""Early exits inside a vLLM worker: the model's layer states of the current step, and the head.

The model class (:mod:`.models`) widens its forward output with the captured layers' states, so that
vLLM's runner gathers them with the final state at the rows it samples; its ``compute_logits``
splits them off and publishes them here. The logits processor (:mod:`.processor`), which runs next
in the same worker process, reads them back and turns the ones each request needs into logits with
the model's own head. One model per worker process: vLLM runs one engine's model per worker.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

__all__ = ["VllmLayerExits", "bind", "bound", "publish", "current", "take_records", "RECORDS"]


class VllmLayerExits:
    """A :class:`~contrastive_decoding.core.contract.LayerExits` over a vLLM causal LM.

    Args:
        model: the vLLM ``*ForCausalLM`` module (it owns ``lm_head`` and ``logits_processor``).
        norm: the final norm (``None``: none).
        num_layers: decoder blocks.
        tied_embeddings: whether the head shares the input embeddings' weight.
        vocab_size: tokens the head scores.
        captured: the layer indices whose states the model publishes, in order.
    """

    def __init__(
        self,
        model: nn.Module,
        norm: nn.Module | None,
        num_layers: int,
        tied_embeddings: bool,
        vocab_size: int,
        captured: tuple[int, ...],
    ) -> None:
        self._model = weakref.ref(model)
        self._norm = norm
        self.num_layers = num_layers
        self.tied_embeddings = tied_embeddings
        self.vocab_size = vocab_size
        self.captured = captured
        self.column = {layer: i for i, layer in enumerate(captured)}

    def layout_of(self, model: Any) -> VllmLayerExits:
        if model is None:
            return self
        raise ValueError("The vLLM backend runs one model; amateur models are not supported there.")

    def early_exit_logits(self, states: torch.Tensor, final_norm: bool = False) -> torch.Tensor:
        """Vocabulary logits of hidden states ``(..., H)``, through vLLM's own head.

        Without ``final_norm`` it is the raw head product (as the transformers backend's readout,
        and DoLa's reference); with it, the final norm and the model's own logits post-processing
        (soft-capping, scale), as its final output.
        """
        model = self._model()
        shape = states.shape
        flat = states.reshape(-1, shape[-1])
        if final_norm:
            if self._norm is not None:
                flat = self._norm(flat)
            logits = model.logits_processor(model.lm_head, flat)
        else:
            logits = model.logits_processor._get_logits(flat, model.lm_head, None)
        return logits.reshape(*shape[:-1], logits.shape[-1])


# This worker's model and the captured states of the rows it samples this step, ``(rows, J, H)``.
_bound: VllmLayerExits | None = None
_step: torch.Tensor | None = None
# Request record key -> {output position: chosen layer}, read by the LLM wrapper after a run.
RECORDS: dict[str, dict[int, int]] = {}


def bind(exits: VllmLayerExits) -> None:
    """Make ``exits`` this worker's model (a new engine in the process replaces the old one)."""
    global _bound, _step
    _bound, _step = exits, None


def bound() -> VllmLayerExits | None:
    return _bound


def publish(states: torch.Tensor) -> None:
    """Called by the model's ``compute_logits``: the states of the rows about to be sampled."""
    global _step
    _step = states


def current() -> torch.Tensor | None:
    """The states :func:`publish` gave last, ``(rows, J, H)``."""
    return _step


def take_records(keys: list[str]) -> dict[str, list[int]]:
    """Pop the chosen layers recorded for ``keys``, in output order."""
    out = {}
    for key in keys:
        record = RECORDS.pop(key, {})
        out[key] = [record[i] for i in sorted(record)]
    return out
