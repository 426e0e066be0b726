"""The KV cache of a leading text that many prompts share (a few-shot primer), computed once.

Multiple-choice benchmarks put the same few-shot primer in front of every question; on TruthfulQA
the primer is most of each prompt. :func:`~contrastive_decoding.score_continuations` given a
:class:`PromptCache` runs only the tokens after the primer, on a copy of the primer's cache.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from contrastive_decoding.backends.hf.cache_names import cache_of_output

__all__ = ["PromptCache"]


class PromptCache:
    """The primer's KV cache for one model, reused by every prompt that starts with it.

    A prompt is served from the cache only when its text starts with the primer and its tokens
    start with the cached tokens and go past them; otherwise it runs in full, so passing a cache
    never changes which tokens are scored. Where the primer's last tokens merge with the text after
    it, the cached part is what the first such prompt shares with the primer token for token.
    Scores equal the uncached ones up to floating-point rounding (the primer and the rest run in two
    passes instead of one).

    The cache belongs to the first model it is used with; using it with another model (or after
    changing the weights) needs a new ``PromptCache``.

    Args:
        primer: the shared leading text.

    Example:
        >>> from contrastive_decoding import PromptCache
        >>> from contrastive_decoding.prompts import TRUTHFULQA_PRIMER
        >>> cache = PromptCache(TRUTHFULQA_PRIMER)
        >>> # score_continuations(model, tokenizer, TRUTHFULQA_PRIMER + "Q: ...\\nA:", answers,
        >>> #                     prompt_cache=cache)
    """

    def __init__(self, primer: str) -> None:
        if not isinstance(primer, str) or not primer:
            raise ValueError(
                f"`primer` must be a non-empty string (the shared leading text), got {primer!r}."
            )
        self.primer = primer
        self._owner: tuple[int, int] | None = None
        self._tokens: list[int] | None = None
        self._cache: Any = None
        self._side: dict[tuple, Any] = {}  # other streams' views of the primer (see side_cache)

    def __repr__(self) -> str:
        cached = "cached" if self._cache is not None else "not computed yet"
        return f"PromptCache({len(self.primer)} characters, {cached})"

    def start(
        self, model: nn.Module, tokenizer, prompt: str, prompt_ids: list[int]
    ) -> tuple[int, Any] | None:
        """``(cached tokens, a copy of their KV cache)`` for a prompt starting with the primer, or
        ``None`` when the prompt must run in full."""
        n = self._cached_length(model, tokenizer, prompt, prompt_ids)
        return None if n is None else (n, copy.deepcopy(self._cache))

    def start_batch(
        self, model: nn.Module, tokenizer, prompts: list[str], prompt_ids: list[list[int]]
    ) -> tuple[int, Any] | None:
        """``(cached tokens, a KV cache with one row per prompt)`` when every prompt can start from
        the primer, else ``None`` (the batch runs in full). Generation uses it: each row is the
        cached tokens, then its own tokens, left-padded to a common length."""
        if not prompts:
            return None
        pairs = zip(prompts, prompt_ids, strict=True)
        lengths = [self._cached_length(model, tokenizer, p, i) for p, i in pairs]
        if any(n is None for n in lengths):
            return None
        cache = copy.deepcopy(self._cache)
        cache.batch_repeat_interleave(len(prompts))
        return lengths[0], cache

    def _cached_length(self, model: nn.Module, tokenizer, prompt: str, prompt_ids: list[int]) -> int | None:
        """How many leading tokens of ``prompt_ids`` the cache holds (computing it on first use), or
        ``None`` when the prompt must run in full."""
        owner = (id(model), id(tokenizer))
        if self._owner is not None and self._owner != owner:
            raise ValueError(
                "This PromptCache holds another model's (or tokenizer's) primer; make one "
                "PromptCache per model."
            )
        if not prompt.startswith(self.primer):
            return None
        prompt_ids = list(prompt_ids)
        if self._tokens is None:
            tokens = list(tokenizer(self.primer)["input_ids"])
            # The primer's last tokens may merge with the text after it ("\n\n" + "Q" tokenizes as
            # "\n", "\n", "Q"): cache the part the first prompt shares token for token.
            pairs = enumerate(zip(tokens, prompt_ids, strict=False))
            n = next((i for i, (a, b) in pairs if a != b), min(len(tokens), len(prompt_ids)))
            if n == 0 or len(prompt_ids) <= n:
                return None
            self._tokens, self._owner = tokens[:n], owner
        n = len(self._tokens)
        if len(prompt_ids) <= n or prompt_ids[:n] != self._tokens:
            return None
        if self._cache is None:
            device = next(model.parameters()).device
            ids = torch.tensor([self._tokens], dtype=torch.long, device=device)
            with torch.no_grad():  # once per cache: not worth skipping the primer's logits
                self._cache = cache_of_output(model(input_ids=ids, use_cache=True))
        return n

    def side_cache(self, key: tuple, compute: Callable[[], Any]) -> Any:
        """A copy of another stream's KV cache of the primer (an amateur reads it after its own
        instruction), computed by ``compute`` on first use of ``key``."""
        if key not in self._side:
            with torch.no_grad():
                self._side[key] = compute()
        return copy.deepcopy(self._side[key])
