"""Batched greedy generation with stop strings, with or without a decoding strategy.

Prompts of one batch are left-padded (decoder-only models continue from the last position of
every row). Given the few-shot primer every prompt starts with, the primer's KV cache is computed
once (:class:`~contrastive_decoding.PromptCache`) and each row is the primer, then its own tokens
left-padded after it: only those run at prefill, which on 8-shot GSM8K is a tenth of the prompt.
Positions come from the attention mask, so a row's tokens sit where they would alone. Each row's
text is cut at the first stop string; the premature layers a strategy used are counted over the
tokens that were kept. Rows stop early with transformers' ``StopStringCriteria``; for a tokenizer
whose vocabulary it cannot read, each row's generated text is decoded and searched instead
(:class:`DecodedTextStop`; the same rows stop at the same tokens, only slower).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from contrastive_decoding.eval.strategies import StrategyRun
from transformers import StoppingCriteria, StoppingCriteriaList, StopStringCriteria

from contrastive_decoding import PromptCache
from contrastive_decoding.backends.hf.cache_names import cache_argument
from contrastive_decoding.backends.hf.readout import LayerReadout
from contrastive_decoding.backends.hf.sources import reads_whole_prompt

__all__ = ["DecodedTextStop", "Generated", "generate_batch", "input_device"]


@dataclass
class Generated:
    """One row's output.

    Attributes:
        text: the generated text, cut before the first stop string (not stripped).
        n_tokens: generated tokens kept (up to the stop string or EOS).
        layer_counts: premature layer -> steps that used it, over the kept tokens (``None``
            when the strategy reports none).
    """

    text: str
    n_tokens: int
    layer_counts: dict[int, int] | None


def input_device(model) -> torch.device:
    """Where inputs go: the embedding's device (differs from ``model.device`` under
    ``device_map``-dispatched models only when the first module sits elsewhere)."""
    try:
        return model.get_input_embeddings().weight.device
    except AttributeError:
        return next(model.parameters()).device


def _cut(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    cut = len(text)
    for s in stop:
        pos = text.find(s)
        if 0 <= pos < cut:
            cut = pos
    return text[:cut], cut < len(text)


class DecodedTextStop(StoppingCriteria):
    """Stop each row once its generated text (decoded from ``start`` on) holds a stop string.

    The fallback for tokenizers whose vocabulary ``StopStringCriteria`` cannot map to text (it
    raises while reading it, e.g. for tokens that decode with spaces between them).

    Args:
        tokenizer: decodes the generated ids.
        stop: the stop strings.
        start: the first generated position (the prompt's padded length).
    """

    def __init__(self, tokenizer, stop: Sequence[str], start: int) -> None:
        self.tokenizer, self.stop, self.start = tokenizer, list(stop), start

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        done = [
            any(s in self.tokenizer.decode(row, skip_special_tokens=True) for s in self.stop)
            for row in input_ids[:, self.start :].tolist()
        ]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def _stop_criteria(tokenizer, stop: Sequence[str], start: int) -> StoppingCriteria:
    try:
        return StopStringCriteria(tokenizer, list(stop))
    except (ValueError, AttributeError, KeyError, TypeError, IndexError, NotImplementedError):
        # transformers maps every vocabulary token to its text first, and some tokenizers defeat
        # that (tokens decoded with spaces between them: "substring not found").
        return DecodedTextStop(tokenizer, stop, start)


def _kept_tokens(tokenizer, ids: list[int], stop: Sequence[str]) -> int:
    """The fewest leading tokens whose text already contains a stop string (all if none does)."""

    def has_stop(k: int) -> bool:
        text = tokenizer.decode(ids[:k], skip_special_tokens=True)
        return any(s in text for s in stop)

    if not stop or not has_stop(len(ids)):
        return len(ids)
    lo, hi = 1, len(ids)  # has_stop(hi) is True; find the smallest such k
    while lo < hi:
        mid = (lo + hi) // 2
        if has_stop(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


@torch.no_grad()
def generate_batch(
    model,
    tokenizer,
    prompts: Sequence[str],
    strategy: StrategyRun,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    repetition_penalty: float | None = None,
    prompt_cache: PromptCache | None = None,
) -> list[Generated]:
    """Greedy continuations of ``prompts``, decoded as one left-padded batch.

    Args:
        model: the causal LM.
        tokenizer: its tokenizer (needs a pad token; ``load_model`` sets one).
        prompts: the prompts of one batch.
        strategy: the decoding strategy (its ``generate_kwargs`` go to ``model.generate``).
        max_new_tokens: generation budget per row.
        stop: stop strings; a row's text is cut at the first one.
        repetition_penalty: generation repetition penalty (default: the strategy's; DoLa's
            authors apply 1.2 to the contrasted scores).
        prompt_cache: the cache of a primer the prompts start with; used when every prompt of the
            batch starts with it and the strategy reads only the tokens each forward runs (not
            degraded streams, an amateur or activation decoding's prompt entropy, which run in
            full).

    Returns:
        One :class:`Generated` per prompt, in order.
    """
    penalty = strategy.repetition_penalty if repetition_penalty is None else repetition_penalty
    primed = None
    if prompt_cache is not None and not reads_whole_prompt(strategy.scoring, LayerReadout.from_model(model)):
        primed = _primed_batch(model, tokenizer, list(prompts), prompt_cache)
    if primed is not None:
        enc, cache = primed
        enc[cache_argument(model)] = cache
    else:
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
        finally:
            tokenizer.padding_side = side
        enc = {k: v.to(input_device(model)) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        temperature=None,
        top_p=None,
        top_k=None,
        repetition_penalty=penalty,
        pad_token_id=tokenizer.pad_token_id,
        return_dict_in_generate=True,
    )
    if stop:
        # Built here rather than with `stop_strings=`: generate drops its `tokenizer` argument when
        # `custom_generate` is a callable, so stop strings could not be resolved there.
        start = enc["input_ids"].shape[1]
        kwargs["stopping_criteria"] = StoppingCriteriaList([_stop_criteria(tokenizer, stop, start)])
    out = model.generate(**enc, **kwargs, **strategy.generate_kwargs)
    sequences = out["sequences"] if not isinstance(out, torch.Tensor) else out
    layers = None if isinstance(out, torch.Tensor) else out.get("premature_layers")
    start = enc["input_ids"].shape[1]
    special = {tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    results = []
    for row in range(sequences.shape[0]):
        ids = sequences[row, start:].tolist()
        end = next((i for i, t in enumerate(ids) if t in special), len(ids))
        ids = ids[:end]
        text, stopped = _cut(tokenizer.decode(ids, skip_special_tokens=True), stop)
        kept = _kept_tokens(tokenizer, ids, stop) if stopped else len(ids)
        counts = None
        if layers is not None:
            used = layers[row, :kept].tolist()
            counts = dict(sorted(Counter(int(x) for x in used).items()))
        results.append(Generated(text, kept, counts))
    return results


def _has_sliding_window(config) -> bool:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_types = getattr(config, "layer_types", None) or ()
    return bool(getattr(config, "sliding_window", None)) or "sliding_attention" in layer_types


def _primed_batch(model, tokenizer, prompts: list[str], prompt_cache: PromptCache):
    """``(inputs, cache)``: each row = the primer's cached tokens, left padding, the row's own
    tokens; the cache holds the primer once per row. ``None`` when a prompt cannot use the cache."""
    ids = [list(tokenizer(p)["input_ids"]) for p in prompts]
    if len({len(row) for row in ids}) > 1 and _has_sliding_window(model.config):
        # Rows share the primer, so rows of different lengths need padding between the primer and
        # their own tokens; it would count against the window and hide primer tokens the row sees
        # when it runs alone (left padding, before everything, does not).
        return None
    start = prompt_cache.start_batch(model, tokenizer, prompts, ids)
    if start is None:
        return None
    n, cache = start
    rest = [row[n:] for row in ids]
    width = max(len(r) for r in rest)
    pad = tokenizer.pad_token_id
    input_ids = [row[:n] + [pad] * (width - len(r)) + r for row, r in zip(ids, rest, strict=True)]
    mask = [[1] * n + [0] * (width - len(r)) + [1] * len(r) for r in rest]
    device = input_device(model)
    inputs = {
        "input_ids": torch.tensor(input_ids, dtype=torch.long, device=device),
        "attention_mask": torch.tensor(mask, dtype=torch.long, device=device),
    }
    return inputs, cache
