"""Per-token entropy over context positions of one layer's early exits (activation decoding).

For a layer ``j`` and the context positions ``t`` of a row, ``A[t, v]`` is the early exit of the
state entering block ``j`` at position ``t``. Activation decoding scores a token ``v`` by how sharply
its logit is concentrated on few positions: the entropy ``E(v)`` of ``softmax_t(A[t, v])``, a softmax
along the positions, not the vocabulary.

The entropy is kept online, so a decoding step adds only its new positions: per row and token, the
running maximum ``m``, ``s = sum_t exp(A_t - m)`` and ``w = sum_t exp(A_t - m) * A_t`` give
``E = m + log s - w / s``. The prompt is absorbed in chunks of positions, so the ``(T, V)`` matrix of
a long prompt never exists at once.
"""

from __future__ import annotations

import torch

from contrastive_decoding.backends.hf.capture import LayerCapture
from contrastive_decoding.backends.hf.readout import LayerReadout
from contrastive_decoding.core.specs import EntropySource
from contrastive_decoding.core.validation import check_int

__all__ = ["ContextEntropy"]

class ContextEntropy:
    """Context manager: capture one layer at every position and keep each row's context entropy.

    Args:
        readout: the model's :class:`~contrastive_decoding.LayerReadout`.
        source: the layer, context and norm (layer already validated).
        positions_per_chunk: positions per early-exit head product (bounds memory).
    """

    def __init__(self, readout: LayerReadout, source: EntropySource, positions_per_chunk: int = 64) -> None:
        self.readout = readout
        self.source = source
        # 0 would make the chunked loops never advance; refused by name instead.
        self.positions_per_chunk = check_int("positions_per_chunk", positions_per_chunk, 1)
        self.capture = LayerCapture(readout, [source.layer], positions="all")
        self.reset()

    def __enter__(self) -> ContextEntropy:
        self.reset()
        self.capture.attach()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.capture.detach()
        self.reset()

    def reset(self) -> None:
        """Forget every row's context (a new batch of sequences starts)."""
        self._acc: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._seen: torch.Tensor | None = None  # tokens of each row read so far, in generation

    # -- the captured states ------------------------------------------------------------------

    def states(self, rows: int) -> torch.Tensor:
        """The last forward's states at the layer, ``(rows, T, H)`` (stream 0 under degraded streams)."""
        return self.capture.stacked()[0][:rows]

    # -- the accumulators ---------------------------------------------------------------------

    @property
    def accumulators(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(m, s, w)``, each ``(B, V)`` float32 (``None`` before any position)."""
        return self._acc

    def load(self, accumulators: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rows: int = 1) -> None:
        """Start from saved accumulators, each row repeated ``rows`` times (scoring on a shared prompt)."""
        self._acc = tuple(a.repeat_interleave(rows, dim=0) for a in accumulators)

    def _exits(self, states: torch.Tensor) -> torch.Tensor:
        return self.readout.early_exit_logits(states, final_norm=self.source.final_norm).float()

    def _add(self, logits: torch.Tensor, mask: torch.Tensor) -> None:
        """Add positions ``logits`` ``(B, t, V)`` whose ``mask`` ``(B, t)`` is true."""
        if self._acc is None:
            rows, vocab = logits.shape[0], logits.shape[-1]
            zeros = logits.new_zeros(rows, vocab)
            self._acc = (torch.full_like(zeros, -torch.inf), zeros, zeros.clone())
        m, s, w = self._acc
        drop = ~mask[..., None].to(torch.bool)
        full = not bool(drop.any())  # the common case (no padding) skips two passes over (B, t, V)
        masked = logits if full else logits.masked_fill(drop, -torch.inf)
        m_new = torch.maximum(m, masked.amax(1))
        # A row with no position yet has m = -inf; shifting by 0 keeps exp() at 0 instead of NaN.
        shift = torch.where(torch.isfinite(m_new), m_new, 0.0)
        scale = torch.exp(m - shift)
        weights = (masked - shift[:, None]).exp_()
        s = s * scale + weights.sum(1)
        values = logits if full else logits.masked_fill(drop, 0.0)
        w = w * scale + torch.linalg.vecdot(weights, values, dim=1)
        self._acc = (m_new, s, w)

    def absorb(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add every real position of ``states`` ``(B, T, H)`` (``mask`` ``(B, T)``, ``None``: all)."""
        if mask is None:
            mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        step = self.positions_per_chunk
        for lo in range(0, states.shape[1], step):
            self._add(self._exits(states[:, lo : lo + step]), mask[:, lo : lo + step].to(states.device))

    def absorb_each(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Add the positions of ``states`` one at a time; the entropy after each, ``(B, T, V)``."""
        if mask is None:
            mask = torch.ones(states.shape[:2], dtype=torch.bool, device=states.device)
        out = []
        step = self.positions_per_chunk
        for lo in range(0, states.shape[1], step):
            exits = self._exits(states[:, lo : lo + step])
            for t in range(exits.shape[1]):
                self._add(exits[:, t : t + 1], mask[:, lo + t : lo + t + 1].to(states.device))
                out.append(self.entropy())
        return torch.stack(out, dim=1)

    def entropy(self) -> torch.Tensor:
        """Each row's entropy ``E(v)`` over its context so far, ``(B, V)`` float32, in nats."""
        if self._acc is None:
            raise RuntimeError("No context positions read yet: run a forward pass of the model first.")
        m, s, w = self._acc
        return torch.log(s) - (w / s - m)

    # -- decoding -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, fresh: bool, uncached: bool
    ) -> torch.Tensor:
        """The entropy ``(B, V)`` for the next token after the forward over ``input_ids``.

        Args:
            input_ids: every token of each row so far, ``(B, L)``.
            attention_mask: the forward's mask over those tokens, ``(B, L)`` (``None``: all real).
            fresh: the forward started from an empty cache (new sequences, or uncached decoding).
            uncached: the forward used no cache at all.
        """
        rows, length = input_ids.shape
        states = self.states(rows)
        new = states.shape[1]
        mask = attention_mask[:rows, -new:] if attention_mask is not None else None
        seen = self._seen
        extends = (
            seen is not None
            and seen.shape[0] == rows
            and seen.shape[1] < length
            and torch.equal(input_ids[:, : seen.shape[1]], seen)
        )
        # Uncached decoding reruns every position, one token longer than last time, from no cache.
        continuing = extends and (not fresh or (uncached and length == seen.shape[1] + 1))
        if not continuing and not fresh:
            if self.source.context == "all":
                raise RuntimeError(
                    "The context entropy saw its rows' earlier tokens change (beam search reorders "
                    "sequences); use context='prompt' with beam search, or greedy search / sampling."
                )
            # context="prompt": the rows are reordered within their own prompt's beams; nothing changes.
        elif not continuing:
            self.reset()
            self.absorb(states, mask)
        elif self.source.context == "all":
            added = length - seen.shape[1]
            self.absorb(states[:, -added:], None if mask is None else mask[:, -added:])
        self._seen = input_ids.clone()
        return self.entropy()
