"""The amateur stream: a second forward pass with its own inputs and KV cache.

Classic contrastive decoding contrasts the model with a smaller model of the same tokenizer; ICD and
LOL contrast it with the same model behind an instruction that induces false answers. Both are an
:class:`Amateur`: the tokens the main model reads, optionally after an instruction prefix, fed to
an amateur model (by default the main model itself) in lock-step with the main model's forwards.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence

import torch
from torch import nn

from contrastive_decoding.backends.hf.cache_names import cache_argument, cache_of_output, logits_to_keep
from contrastive_decoding.backends.hf.capture import LayerCapture
from contrastive_decoding.backends.hf.padding import pad_rows
from contrastive_decoding.backends.hf.prompt_cache import PromptCache
from contrastive_decoding.backends.hf.readout import LayerReadout
from contrastive_decoding.core.specs import Amateur
from contrastive_decoding.core.validation import check_token_ids, model_vocab_size

__all__ = ["AmateurRunner", "check_same_vocabulary"]


def _token_ids(value, tokenizer, argument: str) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, str):
        return list(value)
    if tokenizer is None:
        raise ValueError(
            f"The amateur's `{argument}` is text; pass the model's tokenizer (`tokenizer=`) so it can be "
            "tokenized, or give it as token ids."
        )
    return tokenizer(value, add_special_tokens=False)["input_ids"]


def _vocab_size(model: nn.Module) -> int:
    return model.get_output_embeddings().weight.shape[0]


def check_same_vocabulary(
    main: nn.Module, amateur: nn.Module, tokenizer=None, amateur_tokenizer=None
) -> None:
    """Refuse an amateur whose logits do not index the same tokens as the main model's."""
    if tokenizer is not None and amateur_tokenizer is not None:
        if tokenizer.get_vocab() != amateur_tokenizer.get_vocab():
            raise ValueError(
                "The amateur's tokenizer differs from the model's (different vocabulary); contrastive "
                "decoding subtracts log-probabilities token by token, so use an amateur from the same "
                "model family and tokenizer (e.g. a smaller checkpoint of the same series)."
            )
    main_size, amateur_size = _vocab_size(main), _vocab_size(amateur)
    if main_size != amateur_size:
        raise ValueError(
            f"The amateur's output head has {amateur_size} tokens but the model's has {main_size}; use an "
            "amateur with the same tokenizer and vocabulary size."
        )


class AmateurRunner:
    """Runs an :class:`Amateur` beside the main model: step by step in generation, in one pass in
    scoring.

    Args:
        amateur: the amateur's description.
        model: the main model (used when ``amateur.model`` is ``None``).
        tokenizer: the main model's tokenizer (needed for a text prefix and for the BOS check).
        layers: amateur layers whose states are captured for early exits.
        positions: ``"last"`` for generation (:meth:`step`), ``"all"`` for scoring (:meth:`score_rows`).
    """

    def __init__(
        self,
        amateur: Amateur,
        model: nn.Module,
        tokenizer=None,
        layers: Sequence[int] = (),
        positions: str = "last",
    ) -> None:
        self.spec = amateur
        self.model = amateur.model if amateur.model is not None else model
        self.same_model = self.model is model
        if not self.same_model:
            check_same_vocabulary(model, self.model, tokenizer, amateur.tokenizer)
        self.prefix = _token_ids(amateur.prefix, tokenizer, "prefix")
        self.replace = _token_ids(amateur.replace, tokenizer, "replace")
        # Refused now, with the argument named, rather than as an IndexError in the embedding at the
        # first forward: the amateur model reads the prefix, the main model's rows hold `replace`.
        fix = "use token ids of the model's own tokenizer (or pass the instruction as text with it)."
        check_token_ids(self.prefix, model_vocab_size(self.model), amateur.prefix_argument, fix)
        check_token_ids(self.replace, model_vocab_size(model), amateur.replace_argument, fix)
        self.bos_id = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
        self.readout = LayerReadout.from_model(self.model)
        self.layers = self.readout.check_layers(list(layers), "amateur_layers") if layers else []
        self.capture = LayerCapture(self.readout, self.layers, positions=positions) if self.layers else None
        self._takes_positions = "position_ids" in inspect.signature(self.model.forward).parameters
        self._cache_argument = cache_argument(self.model)
        self.running = False  # True during the amateur's own forward (the main model's hooks see it)
        self._reset()

    def _reset(self) -> None:
        self._cache = None
        self._seen: torch.Tensor | None = None  # main-model tokens fed so far, (B, T)
        self._mask: torch.Tensor | None = None  # the amateur's attention mask so far
        self._next_pos: torch.Tensor | None = None
        self._start: tuple | None = None  # score_rows' last row start: (tokens, logits, states, cache)

    @property
    def attached(self) -> bool:
        return self.capture is None or self.capture.attached

    def __enter__(self) -> AmateurRunner:
        self._reset()
        if self.capture is not None:
            self.capture.attach()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.capture is not None:
            self.capture.detach()
        self._reset()

    def _with_prefix(self, row: list[int]) -> list[int]:
        head = 1 if self.bos_id is not None and row and row[0] == self.bos_id else 0
        rest = row[head:]
        if self.replace:
            if rest[: len(self.replace)] != self.replace:
                raise ValueError(
                    "A row does not start with the instruction the amateur replaces (`replace`); put it "
                    "at the very start of each prompt (e.g. with the strategy's `refocus_prompt`)."
                )
            rest = rest[len(self.replace) :]
        return row[:head] + self.prefix + rest

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> object:
        kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": True, self._cache_argument: cache}
        if self._takes_positions:
            kwargs["position_ids"] = positions
        return self.model(**kwargs)

    @torch.no_grad()
    def step(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The amateur's next-token logits ``(B, V)`` (and layer states ``(J, B, H)``) after reading
        the main model's tokens ``input_ids`` (all of them so far) under ``attention_mask``."""
        rows, length = input_ids.shape
        device = input_ids.device
        if attention_mask is None or attention_mask.shape != input_ids.shape:
            attention_mask = torch.ones_like(input_ids)
        if self._seen is None:
            real = [input_ids[i][attention_mask[i].bool()].tolist() for i in range(rows)]
            ids, self._mask = pad_rows([self._with_prefix(r) for r in real], 0, device, side="left")
        else:
            seen = self._seen.shape[1]
            if seen > length or not torch.equal(input_ids[:, :seen], self._seen):
                raise RuntimeError(
                    "The amateur stream saw its rows' earlier tokens change (beam search reorders "
                    "sequences); strategies with an amateur support greedy search and sampling."
                )
            ids, new_mask = input_ids[:, seen:], attention_mask[:, seen:]
            self._mask = torch.cat([self._mask, new_mask], dim=1)
        positions = (self._mask.cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1] :]
        self.running = True
        try:
            out = self._forward(ids, self._mask, positions, self._cache)
        finally:
            self.running = False
        self._cache = cache_of_output(out)
        self._seen = input_ids.clone()
        states = self.capture.stacked() if self.capture is not None else None
        return out.logits[:, -1, :].float(), states

    @torch.no_grad()
    def score_rows(
        self, prefix: list[int], conts: list[list[int]], primer: tuple[int, PromptCache] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-forced amateur logits for ``prefix + cont`` rows: ``(B, W, V)`` where position
        ``k`` predicts continuation token ``k`` (and states ``(J, B, W, H)``).

        The amateur's row start (its instruction, then ``prefix``) runs once and is kept for later
        calls with the same ``prefix``; the continuations run on copies of its KV cache, so an
        answer list costs one long pass and one short one, not one long pass per answer. With
        ``primer`` = ``(n, prompt_cache)`` (the first ``n`` tokens of ``prefix`` are a few-shot
        primer that ``prompt_cache`` holds), the amateur's own view of the primer (its instruction,
        then those tokens) is computed once per cache and only the rest of the start runs.
        """
        start_row = self._with_prefix(list(prefix))
        device = next(self.model.parameters()).device
        self.running = True
        try:
            shared = self._shared_start(list(prefix), start_row, primer)
            last_logits, last_states, cache = self._score_start(start_row, device, shared)
            cache = copy.deepcopy(cache)  # the cache grows in place; later calls need the start's
            cache.batch_repeat_interleave(len(conts))
            ids, mask = pad_rows(conts, 0, device)
            # Right padding after a full start: the model's default positions are the rows' own.
            full_mask = torch.cat(
                [torch.ones(len(conts), len(start_row), dtype=mask.dtype, device=device), mask], 1
            )
            out = self.model(
                input_ids=ids, attention_mask=full_mask, use_cache=True, **{self._cache_argument: cache}
            )
        finally:
            self.running = False
        logits = torch.cat([last_logits.expand(len(conts), -1, -1), out.logits], 1).float()
        if self.capture is None:
            return logits, None
        states = torch.cat([last_states.expand(-1, len(conts), -1, -1), self.capture.stacked()], 2)
        return logits, states

    def _shared_start(
        self, prefix: list[int], start_row: list[int], primer: tuple[int, PromptCache] | None
    ) -> tuple[list[int], object] | None:
        """``(tokens, a copy of their KV cache)`` of the amateur's view of the primer, or ``None``."""
        if primer is None:
            return None
        n, prompt_cache = primer
        try:
            tokens = self._with_prefix(prefix[:n])
        except ValueError:  # the primer ends inside the instruction the amateur replaces
            return None
        if not 0 < len(tokens) < len(start_row) or start_row[: len(tokens)] != tokens:
            return None

        def run() -> object:
            ids = torch.tensor([tokens], dtype=torch.long, device=next(self.model.parameters()).device)
            return cache_of_output(self.model(input_ids=ids, use_cache=True, **{self._cache_argument: None}))

        return tokens, prompt_cache.side_cache((id(self.model), tuple(tokens)), run)

    def _score_start(self, start_row: list[int], device: torch.device, shared=None) -> tuple:
        """The row start's last-position logits ``(1, 1, V)``, states ``(J, 1, 1, H)`` and KV cache;
        with ``shared`` (see :meth:`_shared_start`), only the tokens after the shared ones run."""
        key = tuple(start_row)
        if self._start is None or self._start[0] != key:
            skip, cache = (0, None) if shared is None else (len(shared[0]), shared[1])
            ids = torch.tensor([start_row[skip:]], dtype=torch.long, device=device)
            keep = logits_to_keep(self.model, 1)
            out = self.model(input_ids=ids, use_cache=True, **{self._cache_argument: cache}, **keep)
            states = self.capture.stacked()[:, :, -1:] if self.capture is not None else None
            self._start = (key, out.logits[:, -1:], states, cache_of_output(out))
        return self._start[1:]
