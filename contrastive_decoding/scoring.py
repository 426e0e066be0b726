"""Teacher-forced scoring of given continuations, with or without a layer contrast.

This is what multiple-choice evaluation needs: for a prompt and candidate answers, the summed
log-score of each answer's tokens. All continuations of one prompt run as right-padded rows of
batched forward passes (no Python loop of one forward per answer); the premature layers' states are
captured by hooks in the same passes.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cache_names import cache_argument, cache_of_output, logits_to_keep
from .context_entropy import ContextEntropy
from .padding import pad_rows
from .prompt_cache import PromptCache
from .sources import ContrastSources
from .strategies.base import (
    SCORING_PROTOCOLS,
    ContrastInputs,
    ContrastStrategy,
    Floor,
    RelativeFloor,
    ScoringProtocol,
)
from .validation import (
    check_flag,
    check_int,
    check_number,
    check_token_ids,
    check_usable_model,
    model_vocab_size,
)

__all__ = ["ContinuationScore", "score_continuations"]


@dataclass
class ContinuationScore:
    """The score of one continuation.

    Attributes:
        continuation: the continuation text as given.
        total: the summed per-token score.
        token_scores: the score of each continuation token, ``(tokens,)`` float32.
        token_ids: the continuation's token ids.
        premature_layers: the premature layer used for each token (``None`` for plain scoring).
        below_floor: under ``"normalized"`` with a fixed floor, how many of its tokens are plausible
            yet score below the floor given to implausible ones (the scale problem that
            :class:`~contrastive_decoding.RelativeFloor` avoids); a warning says so when any does.
    """

    continuation: str
    total: float
    token_scores: torch.Tensor
    token_ids: list[int]
    premature_layers: list[int] | None = None
    below_floor: int = 0


def _tokenize(tokenizer, prompt: str, continuations: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """The prompt's tokens and, for each continuation, the tokens that follow them."""
    prefix = tokenizer(prompt)["input_ids"]
    conts = []
    for text in continuations:
        full = tokenizer(prompt + text)["input_ids"]
        if full[: len(prefix)] != prefix:
            # The tokenizer merged across the boundary; score the continuation as its own tokens so
            # that the scored tokens are exactly the continuation's.
            full = prefix + tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(full) == len(prefix):
            raise ValueError(
                f"`continuations[{len(conts)}]` ({text!r}) tokenizes to no tokens after the prompt."
            )
        conts.append(full[len(prefix) :])
    return prefix, conts


def _check_inputs(
    tokenizer,
    prompt: str,
    continuations: Sequence[str],
    protocol: str,
    batch_size: int | None,
    floor: Floor,
    positions_per_chunk: int,
    share_prefix: bool,
) -> None:
    if tokenizer is None or not callable(tokenizer):
        raise ValueError(
            f"`tokenizer` is required: the model's own tokenizer (callable on text), got {tokenizer!r}."
        )
    if not isinstance(prompt, str):
        raise ValueError(f"`prompt` must be a string, got {type(prompt).__name__}.")
    if isinstance(continuations, str):
        raise ValueError("`continuations` must be a list of strings, not a single string; wrap it in a list.")
    # A generator has no length and a dict or set would be scored by its keys in arbitrary order.
    if isinstance(continuations, (bytes, Mapping, AbstractSet)) or not (
        hasattr(continuations, "__len__") and hasattr(continuations, "__getitem__")
    ):
        raise ValueError(
            f"`continuations` must be a list of strings, got {type(continuations).__name__}; "
            "pass list(...) of the answers."
        )
    if len(continuations) == 0:
        raise ValueError("`continuations` is empty; give at least one answer to score.")
    for i, text in enumerate(continuations):
        if not isinstance(text, str) or not text:
            raise ValueError(f"`continuations[{i}]` must be a non-empty string, got {text!r}.")
    if protocol not in SCORING_PROTOCOLS:
        raise ValueError(f"`protocol` must be one of {SCORING_PROTOCOLS}, got {protocol!r}.")
    check_int("batch_size", batch_size, 1, allow_none=True, hint="continuations per forward pass")
    if not isinstance(floor, RelativeFloor):
        hint = "the score of implausible tokens under 'normalized'; -1000 or RelativeFloor()"
        check_number("floor", floor, hint=hint)
    check_int("positions_per_chunk", positions_per_chunk, 1, hint="scored positions per head product")
    check_flag("share_prefix", share_prefix)


def _check_model(model: nn.Module) -> None:
    """What every call needs of ``model``, with or without a strategy (a strategy's
    :class:`~contrastive_decoding.LayerReadout` checks more)."""
    check_usable_model(model)
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"`model` ({type(model).__name__}) is an encoder-decoder model; score_continuations scores "
            "with decoder-only causal LMs (e.g. Llama, Qwen2, Mistral, Gemma, Phi, GPT-2, OPT), "
            "loaded with AutoModelForCausalLM."
        )


def _check_ids(prefix: list[int], conts: list[list[int]], vocab_size: int | None) -> None:
    """Refuse token ids the model cannot read (an IndexError in its embedding otherwise)."""
    fix = (
        "the `tokenizer` does not match `model`: pass the model's own tokenizer (or, after adding "
        "tokens to it, call model.resize_token_embeddings(len(tokenizer)))."
    )
    check_token_ids(prefix, vocab_size, "prompt", fix)
    for i, cont in enumerate(conts):
        check_token_ids(cont, vocab_size, f"continuations[{i}]", fix)


@torch.no_grad()
def score_continuations(
    model: nn.Module,
    tokenizer,
    prompt: str,
    continuations: Sequence[str],
    strategy: ContrastStrategy | None = None,
    protocol: ScoringProtocol = "paper",
    batch_size: int | None = None,
    floor: Floor = -1000.0,
    positions_per_chunk: int = 64,
    share_prefix: bool = True,
    prompt_cache: PromptCache | None = None,
) -> list[ContinuationScore]:
    """Score each continuation of ``prompt`` by teacher forcing.

    The text scored is ``prompt + continuation`` (include a leading space in the continuation if
    the answer is a new word, as DoLa's scripts do); the continuation's tokens are the tokens of the
    whole text after those of the prompt.

    Args:
        model: a causal LM.
        tokenizer: its tokenizer.
        prompt: the shared context.
        continuations: the candidate continuations (non-empty strings).
        strategy: ``None`` for plain log-likelihood, or any
            :class:`~contrastive_decoding.ContrastStrategy`, such as
            :class:`~contrastive_decoding.DoLa` (dynamic layer choice per token) or
            :class:`~contrastive_decoding.LayerCake` (degraded streams run as extra rows of the same
            passes; ``tokenizer`` classifies the tokens, and query rows from the one predicting the
            first continuation token onwards are suppressed, as in generation). An amateur stream
            reads each full row (its prefix, the prompt, the continuation) in its own passes.
        protocol: with a strategy, ``"paper"`` sums the raw contrast ``log q_N(y) - log q_M(y)``
            with no plausibility filter (DoLa's TruthfulQA-MC script); ``"normalized"`` log-softmaxes
            the contrast and gives implausible tokens ``floor`` (DoLa's FACTOR script). Ignored when
            ``strategy`` is ``None``.
        batch_size: rows per forward pass (default: all continuations in one pass).
        floor: the score of implausible tokens under ``"normalized"`` (a finite number).
        positions_per_chunk: scored positions per early-exit head product (bounds memory).
        share_prefix: run the prompt once and the continuations on copies of its KV cache (one
            pass for the prompt, then one per batch of continuations); ``False`` runs each row's
            full text (prompt included) in one pass per batch.
        prompt_cache: a :class:`~contrastive_decoding.PromptCache` of a primer that ``prompt``
            starts with (a few-shot primer shared by many calls): only the tokens after it run, on
            a copy of its KV cache. Used with ``share_prefix`` and strategies that read only
            the positions of each forward (none with degraded streams or a context entropy, which
            read the whole prompt; an amateur reads its own rows in full); otherwise ignored.

    Returns:
        One :class:`ContinuationScore` per continuation, in order.

    Raises:
        ValueError: naming the argument, before anything is attached: a bad argument, a model that
            is not a decoder-only causal LM or has weights on the meta device, token ids of the
            prompt or a continuation outside the model's vocabulary (a tokenizer that does not match
            the model), or a strategy setting the model rules out.

    Example:
        >>> import torch
        >>> from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
        >>> from contrastive_decoding import DoLa, score_continuations
        >>> # any causal LM and its tokenizer; see the README for a real model
        >>> scores = score_continuations(model, tokenizer, "Q: 2+2? A:", [" 4", " 5"],
        ...                              strategy=DoLa("high"))  # doctest: +SKIP
        >>> best = max(scores, key=lambda s: s.total)  # doctest: +SKIP
    """
    _check_inputs(
        tokenizer, prompt, continuations, protocol, batch_size, floor, positions_per_chunk, share_prefix
    )
    _check_model(model)
    prefix, conts = _tokenize(tokenizer, prompt, continuations)
    if not prefix:
        raise ValueError(
            "`prompt` tokenizes to no tokens; the first continuation token needs a context "
            "(give a prompt, or use a tokenizer that adds a BOS token)."
        )
    vocab_size = model_vocab_size(model)
    _check_ids(prefix, conts, vocab_size)
    # Resolve and validate the strategy's needs before anything is attached.
    sources = ContrastSources(model, strategy, tokenizer, positions="all") if strategy is not None else None

    device = next(model.parameters()).device
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None or (vocab_size is not None and not 0 <= pad_id < vocab_size):
        # Pads fill masked positions only, so any id the model can read gives the same scores; a pad
        # token added to the tokenizer without resizing the model's embeddings would not be one.
        pad_id = 0
    step = batch_size or len(conts)

    if sources is not None and sources.streams is not None:
        sources.streams.suppression.suppress_from = len(prefix) - 1
    results: list[ContinuationScore] = []
    with sources if sources is not None else nullcontext():
        prefix_pass, primer = None, None
        for lo in range(0, len(conts), step):
            chunk = conts[lo : lo + step]
            if not share_prefix:
                logits, probe = _forward_full(model, sources, prefix, chunk, pad_id, device)
            else:
                if prefix_pass is None:
                    if prompt_cache is not None and not _reads_whole_prompt(sources):
                        primer = prompt_cache.start(model, tokenizer, prompt, prefix)
                    prefix_pass = _forward_prefix(model, sources, prefix, device, primer)
                reuse = lo + step < len(conts)
                logits, probe = _forward_on_prefix(model, sources, prefix_pass, chunk, pad_id, device, reuse)
            if sources is not None and sources.amateur is not None:
                amateur_primer = None if primer is None else (primer[0], prompt_cache)
                probe["amateur"] = sources.amateur.score_rows(prefix, chunk, amateur_primer)
            # Flatten the (row, position) pairs that score a real continuation token.
            row_idx, pos_idx, targets = [], [], []
            for i, cont in enumerate(chunk):
                row_idx += [i] * len(cont)
                pos_idx += list(range(len(cont)))
                targets += cont
            row_t = torch.tensor(row_idx, device=device)
            pos_t = torch.tensor(pos_idx, device=device)
            target_t = torch.tensor(targets, device=device)
            final = logits[row_t, pos_t].float()
            if sources is None:
                token_scores = F.log_softmax(final, dim=-1).gather(-1, target_t[:, None]).squeeze(-1)
                chosen = None
            else:
                token_scores, chosen = _contrast_scores(
                    sources, probe, final, row_t, pos_t, target_t, protocol, floor, positions_per_chunk
                )
            offset = 0
            for i, cont in enumerate(chunk):
                n = len(cont)
                piece = token_scores[offset : offset + n].cpu()
                used = (
                    None
                    if chosen is None
                    else [sources.layers[j] for j in chosen[offset : offset + n].tolist()]
                )
                results.append(
                    ContinuationScore(
                        continuation=continuations[lo + i],
                        total=float(piece.sum()),
                        token_scores=piece,
                        token_ids=cont,
                        premature_layers=used,
                        below_floor=_below_floor(piece, strategy, protocol, floor),
                    )
                )
                offset += n
    _warn_below_floor(results, strategy, floor)
    return results


def _below_floor(piece: torch.Tensor, strategy, protocol: str, floor) -> int:
    """Tokens scoring below a fixed floor: an implausible token scores the floor exactly, so these
    are plausible tokens that implausible ones now outrank."""
    if strategy is None or protocol != "normalized" or isinstance(floor, RelativeFloor):
        return 0
    return int((piece < floor).sum())


def _warn_below_floor(results: list[ContinuationScore], strategy, floor) -> None:
    count = sum(r.below_floor for r in results)
    if count:
        warnings.warn(
            f"{count} plausible token(s) scored below the floor ({floor}) that {type(strategy).__name__} "
            "gives implausible tokens under protocol='normalized', so implausible tokens outrank them "
            "(early exits far larger than the model's output, e.g. without the final norm). Use "
            "floor=RelativeFloor() (harness: --floor relative), or final_norm=True.",
            stacklevel=3,
        )


def _probe(sources: ContrastSources | None, keep: slice) -> dict:
    """What the last forward recorded, at positions ``keep``: layer states ``(J, S, B, T, H)`` and
    degraded streams' logits ``(S-1, B, T, V)``."""
    if sources is None:
        return {}
    states, streams = sources.states(), sources.stream_logits()
    return {
        "states": None if states is None else states[:, :, :, keep],
        "streams": None if streams is None else streams[:, :, keep],
    }


def _forward_full(model, sources, prefix, conts, pad_id, device):
    """One pass over prompt + continuation per row.

    Returns logits ``(B, W, V)`` and the probe (see :func:`_probe`) where position ``k`` predicts
    continuation token ``k``.
    """
    ids, mask = pad_rows([prefix + c for c in conts], pad_id, device)
    start = len(prefix) - 1  # the position predicting the first continuation token
    keep = ids.shape[1] - start
    logits = model(input_ids=ids, attention_mask=mask, **logits_to_keep(model, keep)).logits[:, -keep:]
    probe = _probe(sources, slice(-keep, None))
    if sources is not None and sources.entropy is not None:
        probe["entropy"] = _row_entropy(sources.entropy, len(prefix), mask)
    return logits, probe


def _row_entropy(entropy: ContextEntropy, prefix_len: int, mask: torch.Tensor) -> torch.Tensor:
    """The context entropy at each position from the last prompt token on, ``(B, W - start, V)``,
    for full right-padded rows of the last forward."""
    rows = mask.shape[0]
    states = entropy.states(rows)
    start = prefix_len - 1
    entropy.reset()
    if entropy.source.context == "prompt":
        entropy.absorb(states[:1, :prefix_len])  # every row shares the prompt
        return entropy.entropy()[:, None].expand(rows, states.shape[1] - start, -1)
    entropy.absorb(states[:, :start], mask[:, :start])
    return entropy.absorb_each(states[:, start:], mask[:, start:])


def _reads_whole_prompt(sources: ContrastSources | None) -> bool:
    # An amateur reads its own rows here (`score_rows`), so only what hooks the main model's
    # forward (degraded streams, a context entropy) needs the prompt to run in full.
    return sources is not None and (sources.streams is not None or sources.entropy is not None)


def _forward_prefix(model, sources, prefix, device, primer=None):
    """The prompt alone, once: its last-position logits and probe, and its KV cache. With
    ``primer`` = ``(n, cache)``, only the tokens after the first ``n`` run, on ``cache``."""
    start, cache = primer if primer is not None else (0, None)
    ids = torch.tensor([prefix[start:]], dtype=torch.long, device=device)
    out = model(input_ids=ids, use_cache=True, **{cache_argument(model): cache}, **logits_to_keep(model, 1))
    probe = _probe(sources, slice(-1, None))
    if sources is not None and sources.entropy is not None:
        entropy = sources.entropy
        entropy.reset()
        entropy.absorb(entropy.states(1))
        probe["entropy"] = entropy.entropy()[:, None]
        probe["entropy_accumulators"] = entropy.accumulators
    return out.logits[:, -1:], probe, cache_of_output(out)


def _forward_on_prefix(model, sources, prefix_pass, conts, pad_id, device, reuse_cache):
    """Every continuation (but its last token) on a copy of the prompt's KV cache.

    Same return convention as :func:`_forward_full`.
    """
    prefix_logits, prefix_probe, cache = prefix_pass
    rows = len(conts)
    logits = [prefix_logits.expand(rows, -1, -1)]
    states, streams = prefix_probe.get("states"), prefix_probe.get("streams")
    entropy = prefix_probe.get("entropy")
    probes = [
        {
            "states": None if states is None else states.expand(-1, -1, rows, -1, -1),
            "streams": None if streams is None else streams.expand(-1, rows, -1, -1),
            "entropy": None if entropy is None else entropy.expand(rows, -1, -1),
        }
    ]
    if max(len(c) for c in conts) > 1:
        # The cache grows in place; copy it when other chunks still need the prompt's.
        cache = copy.deepcopy(cache) if reuse_cache else cache
        # Rows are stream-major, one per stream, so repeating each in place keeps streams grouped.
        cache.batch_repeat_interleave(rows)
        tail, tail_mask = pad_rows([c[:-1] or [pad_id] for c in conts], pad_id, device)
        tail_mask[:, 0] = 1  # one-token continuations feed a dummy token whose output is unused
        prompt_mask = torch.ones(rows, cache.get_seq_length(), dtype=torch.long, device=device)
        mask = torch.cat([prompt_mask, tail_mask], 1)
        out = model(input_ids=tail, attention_mask=mask, **{cache_argument(model): cache})
        logits.append(out.logits)
        probes.append(_probe(sources, slice(None)))
        if entropy is not None:
            probes[-1]["entropy"] = _tail_entropy(sources.entropy, prefix_probe, tail_mask)
    probe = {
        key: None if probes[0].get(key) is None else torch.cat([p[key] for p in probes], dim)
        for key, dim in (("states", 3), ("streams", 2), ("entropy", 1))
    }
    return torch.cat(logits, 1), probe


def _tail_entropy(entropy: ContextEntropy, prefix_probe: dict, tail_mask: torch.Tensor) -> torch.Tensor:
    """The context entropy at each continuation position of the last forward, ``(B, T, V)``, read
    on from the prompt's."""
    rows, length = tail_mask.shape
    if entropy.source.context == "prompt":
        return prefix_probe["entropy"].expand(rows, length, -1)
    entropy.load(prefix_probe["entropy_accumulators"], rows)
    return entropy.absorb_each(entropy.states(rows), tail_mask)


def _contrast_scores(
    sources: ContrastSources,
    probe: dict,
    final: torch.Tensor,
    row_t: torch.Tensor,
    pos_t: torch.Tensor,
    target_t: torch.Tensor,
    protocol: ScoringProtocol,
    floor: Floor,
    positions_per_chunk: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    states, streams = probe.get("states"), probe.get("streams")
    amateur_logits, amateur_states = probe.get("amateur", (None, None))
    entropy = probe.get("entropy")
    amateur_readout = None if sources.amateur is None else sources.amateur.readout
    scores, chosen = [], []
    for lo in range(0, final.shape[0], positions_per_chunk):
        sl = slice(lo, lo + positions_per_chunk)
        rows, pos = row_t[sl], pos_t[sl]
        inputs = ContrastInputs(
            final[sl],
            sources.readout,
            None if states is None else states[:, :, rows, pos],
            sources.strategy.final_norm,
            None if streams is None else streams[:, rows, pos],
            None if amateur_logits is None else amateur_logits[rows, pos],
            amateur_readout,
            None if amateur_states is None else amateur_states[:, rows, pos],
            None if entropy is None else entropy[rows, pos],
        )
        out = sources.strategy.score(inputs, target_t[sl], protocol, floor)
        scores.append(out.scores)
        chosen.append(out.chosen)
    return torch.cat(scores), (None if chosen[0] is None else torch.cat(chosen))
