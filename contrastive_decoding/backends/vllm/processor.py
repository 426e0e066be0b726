"""The vLLM (v1) logits processor that applies each request's strategy to its row of logits.

vLLM applies custom logits processors that can change the argmax before its own penalties, so a
request's ``repetition_penalty`` acts on the contrasted scores, as in the transformers backend. Rows
are grouped by equal settings and each group is contrasted in one batch, from the early exits the
model published this step (:mod:`.exits`). Requests without a strategy are left untouched.

A request the frontend could not check against the model (a layer it does not have) is refused here
without stopping the engine: its row allows only the end-of-sequence token, so it ends at once, and
the reason is logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from contrastive_decoding.backends.vllm import exits
from contrastive_decoding.backends.vllm.selection import (
    ENGINE_KEY,
    PENALTY_KEY,
    RECORD_KEY,
    Selection,
    frontend_context,
    select,
)
from contrastive_decoding.core.contract import ContrastInputs

__all__ = ["ContrastLogitsProcessor"]

logger = logging.getLogger(__name__)


@dataclass
class _Row:
    selection: Selection | None  # None: refused
    output: list[int]  # vLLM's live list of the request's output tokens
    penalty: float  # applied here after the contrast (1.0: none, or vLLM's own applies)
    record: str | None
    eos: int | None
    # The tokens the penalty acts on (the prompt's, then the output's as they come), kept across
    # steps so that each step reads only the new output tokens.
    seen: set[int] = field(default_factory=set)
    counted: int = 0  # output tokens folded into `seen`
    seen_ids: torch.Tensor | None = None  # `seen` as a sorted tensor, rebuilt when it grows

    def penalised_ids(self, device: torch.device) -> torch.Tensor | None:
        grown = False
        # With async scheduling the newest output entries may be placeholders (< 0), filled in later.
        while self.counted < len(self.output) and self.output[self.counted] >= 0:
            token = self.output[self.counted]
            grown |= token not in self.seen
            self.seen.add(token)
            self.counted += 1
        if grown or self.seen_ids is None:
            self.seen_ids = torch.tensor(sorted(self.seen), dtype=torch.long, device=device)
        return self.seen_ids if self.seen else None


class ContrastLogitsProcessor(LogitsProcessor):
    """Per-request layer contrast inside vLLM's sampler (see :mod:`.selection` for the keys)."""

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        """Refuse a bad request at admission (the server answers HTTP 400 with the message)."""
        engine, layout = frontend_context()
        selection = select(sampling_params.extra_args, engine, layout)
        _check_penalties(selection, sampling_params)

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        config = vllm_config.model_config.hf_config
        self._engine = getattr(config, ENGINE_KEY, None)
        self._eos = getattr(config, "eos_token_id", None)
        if isinstance(self._eos, list):
            self._eos = self._eos[0] if self._eos else None
        self._rows: dict[int, _Row] = {}
        self._cache: dict[str, Selection] = {}

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._rows.pop(index, None)
        for index, params, prompt, output in batch_update.added:
            self._rows.pop(index, None)
            row = self._admit(params, prompt, output)
            if row is not None:
                self._rows[index] = row
        for a, b, direction in batch_update.moved:
            row_a, row_b = self._rows.pop(a, None), self._rows.pop(b, None)
            if row_a is not None:
                self._rows[b] = row_a
            if direction == MoveDirectionality.SWAP and row_b is not None:
                self._rows[a] = row_b

    def _admit(self, params: Any, prompt: list[int] | None, output: list[int]) -> _Row | None:
        extra = params.extra_args or {}
        exits_ = exits.bound()  # the served model's layout (a Layout by duck type), or None
        try:
            selection = select(extra, self._engine, exits_, self._cache)
            if selection is not None and exits_ is None:
                raise ValueError(
                    "this engine's model publishes no early exits: start it through "
                    "contrastive_decoding's LLM or `contrastive-decoding serve` (hf_overrides "
                    "architectures Contrast<Architecture>)"
                )
            own_penalty = _check_penalties(selection, params)
        except ValueError as exc:
            logger.error("contrastive_decoding: request refused (it ends at once): %s", exc)
            return _Row(None, output, 1.0, None, self._eos)
        if selection is None:
            return None
        record = extra.get(RECORD_KEY)
        if record is not None:
            exits.RECORDS[str(record)] = {}
        seen = set(prompt or []) if own_penalty != 1.0 else set()
        return _Row(selection, output, own_penalty, None if record is None else str(record), self._eos, seen)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self._rows:
            return logits
        rows = {i: r for i, r in self._rows.items() if i < logits.shape[0]}
        if not rows:
            return logits
        out = logits.clone()
        groups: dict[str, list[int]] = {}
        for index, row in rows.items():
            if row.selection is None:
                out[index] = _only(row.eos, out[index])
                continue
            groups.setdefault(row.selection.key, []).append(index)
        if groups:
            states = exits.current()
            layer_exits = exits.bound()
            if states is None or states.shape[0] != logits.shape[0]:
                raise RuntimeError(
                    "contrastive_decoding: the early exits published this step do not match the sampled "
                    f"rows ({None if states is None else states.shape[0]} vs {logits.shape[0]}); "
                    "speculative decoding is not supported with layer contrast."
                )
            for indices in groups.values():
                self._contrast(out, logits, indices, [rows[i] for i in indices], states, layer_exits)
        return out

    def _contrast(self, out, logits, indices, rows, states, layer_exits) -> None:
        selection = rows[0].selection
        strategy = selection.strategy
        index = torch.tensor(indices, device=logits.device)
        columns = torch.tensor([layer_exits.column[k] for k in selection.layers], device=logits.device)
        picked = states.index_select(0, index).index_select(1, columns)  # (r, J, H)
        inputs = ContrastInputs(
            final=logits.index_select(0, index).float(),
            readout=layer_exits,
            states=picked.transpose(0, 1).unsqueeze(1),  # (J, 1, r, H): the intact stream only
            final_norm=bool(strategy.final_norm),
        )
        result = strategy.step(inputs)
        scores = result.scores
        for j, row in enumerate(rows):
            if row.penalty != 1.0:
                scores[j] = _penalise(scores[j], row)
            if row.record is not None and result.chosen is not None:
                record = exits.RECORDS.get(row.record)
                if record is not None:  # keyed by output position: a chunked prefill's discarded
                    record[len(row.output)] = selection.layers[int(result.chosen[j])]  # step is overwritten
        out.index_copy_(0, index, scores.to(out.dtype))


def _check_penalties(selection: Selection | None, params: Any) -> float:
    """The penalty this processor applies: the strategy's, unless the request sets vLLM's own."""
    if selection is None:
        return 1.0
    own = getattr(params, "repetition_penalty", 1.0)
    if own != 1.0 and PENALTY_KEY in (params.extra_args or {}):
        raise ValueError(
            f"Both `repetition_penalty={own}` and `{PENALTY_KEY}` are set; give one (both act after "
            "the contrast)."
        )
    if own != 1.0:
        return 1.0  # vLLM applies it, after this processor: on the contrasted scores
    return selection.repetition_penalty


def _penalise(scores: torch.Tensor, row: _Row) -> torch.Tensor:
    """transformers' (and vLLM's) repetition penalty on the prompt's and output's tokens."""
    ids = row.penalised_ids(scores.device)
    if ids is None:
        return scores
    picked = scores.index_select(0, ids)
    picked = torch.where(picked < 0, picked * row.penalty, picked / row.penalty)
    return scores.index_copy(0, ids, picked)


def _only(token: int | None, row: torch.Tensor) -> torch.Tensor:
    result = torch.full_like(row, -torch.inf)
    if token is not None:
        result[token] = 0.0
    return result
