"""Capture intermediate residual-stream states during a model's own forward passes.

Forward pre-hooks on the decoder blocks copy out only what a step needs, so stock ``generate`` (or
any forward) runs unchanged and no full ``output_hidden_states`` tuple is ever built:

* ``positions="last"``: the last position of each chosen layer, ``(B, H)`` per layer; what a
  decoding step needs (copied, so the prefill's full-length states are freed at once);
* ``positions="all"``: every position, ``(B, T, H)``; what teacher-forced scoring needs.

The input of block ``j`` is ``hidden_states[j]`` of ``output_hidden_states`` for every supported
family (``0`` = embedding output), which is why pre-hooks, not post-hooks, are used.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch.utils.hooks import RemovableHandle

from contrastive_decoding.backends.hf.readout import LayerReadout

__all__ = ["LayerCapture"]


class LayerCapture:
    """Context manager that records chosen layers' states on every forward of the model.

    Hooks are attached on ``__enter__`` and removed on ``__exit__``, also when the body raises,
    leaving the model with exactly the hooks it had before.

    Args:
        readout: the model's :class:`LayerReadout`.
        layers: indices ``0..N-1`` of the states to keep (validated by the caller).
        positions: ``"last"`` to keep only the last position, ``"all"`` to keep every position.
        keep_logits: also keep the model's own output logits at the last position (before any
            logits processor), available as :attr:`logits`.

    Example:
        >>> with LayerCapture(readout, [2, 4], positions="last") as capture:  # doctest: +SKIP
        ...     model(input_ids)
        ...     states = capture.stacked()  # (2, batch, hidden)
    """

    def __init__(
        self,
        readout: LayerReadout,
        layers: list[int],
        positions: Literal["last", "all"] = "last",
        keep_logits: bool = False,
    ) -> None:
        if positions not in ("last", "all"):
            raise ValueError(f"`positions` must be 'last' or 'all', got {positions!r}.")
        self.readout = readout
        self.layers = list(layers)
        self.positions = positions
        self.keep_logits = keep_logits
        self.logits: torch.Tensor | None = None
        self._states: dict[int, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> LayerCapture:
        if self._handles:
            raise RuntimeError("LayerCapture is already attached; use one `with` block at a time.")
        try:
            for layer in dict.fromkeys(self.layers):
                block = self.readout.layers[layer]
                self._handles.append(
                    block.register_forward_pre_hook(self._make_hook(layer), with_kwargs=True)
                )
            if self.keep_logits:
                self._handles.append(self.readout.model.register_forward_hook(self._logits_hook))
        except BaseException:
            self.detach()
            raise
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()

    def __enter__(self) -> LayerCapture:
        return self.attach()

    def __exit__(self, *exc_info: object) -> None:
        self.detach()

    def clear(self) -> None:
        """Forget the recorded states (hooks stay attached)."""
        self._states.clear()
        self.logits = None

    def _logits_hook(self, module, args, output):
        logits = output["logits"] if isinstance(output, dict) else output[0]
        self.logits = logits[:, -1, :].detach().clone()

    def _make_hook(self, layer: int):
        keep_last = self.positions == "last"

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            # Copy the last position so the prefill's (B, T, H) tensor is not kept alive.
            self._states[layer] = hidden[:, -1, :].clone() if keep_last else hidden
            return None

        return hook

    def stacked(self) -> torch.Tensor:
        """The recorded states of ``self.layers`` stacked on a new leading dimension.

        Returns:
            ``(len(layers), B, H)`` for ``positions="last"``, ``(len(layers), B, T, H)`` for
            ``"all"``.

        Raises:
            RuntimeError: if a layer has not run since the capture was attached or cleared.
        """
        missing = [layer for layer in self.layers if layer not in self._states]
        if missing:
            raise RuntimeError(
                f"No states recorded for layers {missing}: run a forward pass of the model "
                "inside the capture first (a LogitsProcessor must be used within generate)."
            )
        return torch.stack([self._states[layer] for layer in self.layers], dim=0)
