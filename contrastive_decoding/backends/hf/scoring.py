"""Teacher-forced scoring of given continuations, with or without a layer contrast.

This is what multiple-choice evaluation needs: for a prompt and candidate answers, the summed
log-score of each answer's tokens. :func:`score_continuations` takes text and tokenizes it;
:func:`score_token_continuations` takes token ids (what an evaluation framework that tokenizes by
itself, such as lm-eval, has) and does the scoring for both.

All continuations of one prompt run as right-padded rows of batched forward passes (no Python loop
of one forward per answer); the premature layers' states are captured by hooks in the same passes.
A strategy with degraded streams (:class:`~contrastive_decoding.LayerCake`) runs them as extra rows
of the same passes, with query rows suppressed from the one predicting the first continuation token
on, as in generation; an amateur stream reads each full row (its prefix, the prompt, the
continuation) in its own passes.
"""

from __future__ import annotations

import copy
import numbers
import sys
import warnings
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from contrastive_decoding.backends.hf.cache_names import cache_argument, cache_of_output, logits_to_keep
from contrastive_decoding.backends.hf.context_entropy import ContextEntropy
from contrastive_decoding.backends.hf.padding import pad_rows
from contrastive_decoding.backends.hf.prompt_cache import PromptCache
from contrastive_decoding.backends.hf.sources import ContrastSources
from contrastive_decoding.core import (
    SCORING_PROTOCOLS,
    ContrastStrategy,
    Floor,
    RelativeFloor,
    ScoringProtocol,
)
from contrastive_decoding.core.validation import (
    check_flag,
    check_int,
    check_number,
    check_token_ids,
    check_usable_model,
    model_vocab_size,
)

__all__ = ["ContinuationScore", "score_continuations", "score_token_continuations"]


@dataclass
class ContinuationScore:
    """The score of one continuation.

    Attributes:
        continuation: the continuation text as given (``None`` from :func:`score_token_continuations`,
            which has no text).
        total: the summed per-token score.
        token_scores: the score of each continuation token, ``(tokens,)`` float32.
        token_ids: the continuation's token ids.
        premature_layers: the premature layer used for each token (``None`` for plain scoring).
        below_floor: under ``"normalized"`` with a fixed floor, how many of its tokens are plausible
            yet score below the floor given to implausible ones (the scale problem that
            :class:`~contrastive_decoding.RelativeFloor` avoids); a warning says so when any does.
        is_greedy: with ``output_greedy=True``, whether every token is the argmax of the decoding
            scores at its position (the model's logits, or the strategy's contrast after its
            plausibility filter): what greedy decoding would pick, before any repetition penalty.
            ``None`` otherwise.
    """

    continuation: str | None
    total: float
    token_scores: torch.Tensor
    token_ids: list[int]
    premature_layers: list[int] | None = None
    below_floor: int = 0
    is_greedy: bool | None = None


# ------------------------------------------------------------------------------------------------
# The text API


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
    *,
    output_greedy: bool = False,
) -> list[ContinuationScore]:
    """Score each continuation of ``prompt`` by teacher forcing.

    The text scored is ``prompt + continuation`` (include a leading space in the continuation if
    the answer is a new word, as DoLa's scripts do); the continuation's tokens are the tokens of the
    whole text after those of the prompt, scored by :func:`score_token_continuations`.

    Args:
        model: a decoder-only causal LM.
        tokenizer: its tokenizer (it also gives degraded streams their token classes).
        prompt: the shared context.
        continuations: the candidate continuations (non-empty strings).
        strategy: ``None`` for plain log-likelihood, or any
            :class:`~contrastive_decoding.ContrastStrategy`, e.g. :class:`~contrastive_decoding.DoLa`.
        protocol: with a strategy, ``"paper"`` sums the raw contrast ``log q_N(y) - log q_M(y)``
            with no plausibility filter (DoLa's TruthfulQA-MC script); ``"normalized"`` log-softmaxes
            the contrast and gives implausible tokens ``floor`` (DoLa's FACTOR script).
        batch_size: rows per forward pass (default: all continuations in one pass).
        floor: the score of implausible tokens under ``"normalized"`` (a finite number).
        positions_per_chunk: scored positions per early-exit head product (bounds memory).
        share_prefix: run the prompt once and the continuations on copies of its KV cache;
            ``False`` runs each row's full text (prompt included) in one pass per batch.
        prompt_cache: a :class:`~contrastive_decoding.PromptCache` of a primer that ``prompt``
            starts with: only the tokens after it run, on a copy of its KV cache (with
            ``share_prefix``, for strategies without degraded streams or a context entropy).
        output_greedy: also report each :attr:`ContinuationScore.is_greedy`.

    Returns:
        One :class:`ContinuationScore` per continuation, in order.

    Raises:
        ValueError: naming the argument, before anything is attached: a bad argument, a model that
            is not a decoder-only causal LM or has weights on the meta device, token ids outside the
            model's vocabulary (a tokenizer that does not match it), or a strategy setting the model
            rules out.

    Example:
        >>> from contrastive_decoding import DoLa, score_continuations
        >>> scores = score_continuations(model, tokenizer, "Q: 2+2? A:", [" 4", " 5"],
        ...                              strategy=DoLa("high"))  # doctest: +SKIP
        >>> best = max(scores, key=lambda s: s.total)  # doctest: +SKIP
    """
    _check_texts(tokenizer, prompt, continuations)
    _check_options(protocol, batch_size, floor, positions_per_chunk, share_prefix, output_greedy)
    prefix, conts = _text_ids(model, tokenizer, prompt, continuations)
    results = score_token_continuations(
        model, prefix, conts, strategy, tokenizer=tokenizer, protocol=protocol, batch_size=batch_size,
        floor=floor, positions_per_chunk=positions_per_chunk, share_prefix=share_prefix,
        prompt_cache=prompt_cache, context_text=prompt, output_greedy=output_greedy,
    )  # fmt: skip
    for result, text in zip(results, continuations, strict=True):
        result.continuation = text
    return results


def _text_ids(model: nn.Module, tokenizer, prompt: str, continuations: Sequence[str]):
    """The prompt's and the continuations' token ids, checked against ``model``."""
    _check_model(model, "score_continuations")
    prefix, conts = _tokenize(tokenizer, prompt, continuations)
    if not prefix:
        raise ValueError(
            "`prompt` tokenizes to no tokens; the first continuation token needs a context "
            "(give a prompt, or use a tokenizer that adds a BOS token)."
        )
    fix = (
        "the `tokenizer` does not match `model`: pass the model's own tokenizer (or, after adding "
        "tokens to it, call model.resize_token_embeddings(len(tokenizer)))."
    )
    _check_ids(prefix, conts, model_vocab_size(model), ("prompt", "continuations"), fix)
    _check_positions(model, prefix, conts, ("prompt", "continuations"))
    return prefix, conts


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


def _check_texts(tokenizer, prompt: str, continuations: Sequence[str]) -> None:
    if tokenizer is None or not callable(tokenizer):
        raise ValueError(
            f"`tokenizer` is required: the model's own tokenizer (callable on text), got {tokenizer!r}."
        )
    if not isinstance(prompt, str):
        raise ValueError(f"`prompt` must be a string, got {type(prompt).__name__}.")
    if isinstance(continuations, str):
        raise ValueError("`continuations` must be a list of strings, not a single string; wrap it in a list.")
    if not _is_sequence(continuations):
        raise ValueError(
            f"`continuations` must be a list of strings, got {type(continuations).__name__}; "
            "pass list(...) of the answers."
        )
    if len(continuations) == 0:
        raise ValueError("`continuations` is empty; give at least one answer to score.")
    for i, text in enumerate(continuations):
        if not isinstance(text, str) or not text:
            raise ValueError(f"`continuations[{i}]` must be a non-empty string, got {text!r}.")


# ------------------------------------------------------------------------------------------------
# The token-id API


def score_token_continuations(
    model: nn.Module,
    context_ids: Sequence[int] | torch.Tensor,
    continuation_ids: Sequence[Sequence[int] | torch.Tensor],
    strategy: ContrastStrategy | None = None,
    *,
    tokenizer=None,
    protocol: ScoringProtocol = "paper",
    batch_size: int | None = None,
    floor: Floor = -1000.0,
    positions_per_chunk: int = 64,
    share_prefix: bool = True,
    prompt_cache: PromptCache | None = None,
    context_text: str | None = None,
    output_greedy: bool = False,
) -> list[ContinuationScore]:
    """Score each continuation of a context given as token ids, by teacher forcing.

    The ids are scored as given: ``context_ids`` is the whole context (a BOS token included if the
    model wants one) and each continuation's ids follow it. :func:`score_continuations` is this
    after tokenizing text; see it for ``strategy``, ``protocol``, ``batch_size``,
    ``positions_per_chunk``, ``share_prefix`` and ``output_greedy``.

    Args:
        model: a decoder-only causal LM.
        context_ids: the context's token ids: a non-empty list of ints or a 1-D integer tensor.
        continuation_ids: one non-empty list of token ids (or 1-D tensor) per continuation.
        tokenizer: the model's tokenizer, for what needs one: degraded streams (token classes), an
            amateur's text instruction, ``prompt_cache`` (its primer); its pad id pads rows.
        floor: the score of implausible tokens under ``"normalized"`` (a number or a ``RelativeFloor``).
        prompt_cache: a :class:`~contrastive_decoding.PromptCache` of a primer: a context whose ids
            start with the primer's (as ``tokenizer`` encodes it) runs only the ids after them, on a
            copy of the primer's KV cache. Needs ``tokenizer``.
        context_text: the text ``context_ids`` encode, if known: ``prompt_cache`` then also requires
            that it start with the primer (as :func:`score_continuations` does).

    Returns:
        One :class:`ContinuationScore` per continuation, in order, with ``continuation=None``.

    Raises:
        ValueError: naming the argument and the fix, before anything is attached: an empty context,
            continuation list or continuation, ids that are not ints, negative or outside the
            model's vocabulary, another bad argument, or a strategy setting the model rules out.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> from contrastive_decoding import DoLa, score_token_continuations
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=16, n_head=2)).eval()
        >>> scores = score_token_continuations(model, [1, 2, 3], [[4], [5, 6]], DoLa("high"))
        >>> [len(s.token_scores) for s in scores], scores[1].premature_layers
        ([1, 2], [2, 2])
    """
    prefix, conts = _token_ids(context_ids, continuation_ids)
    options = _check_options(protocol, batch_size, floor, positions_per_chunk, share_prefix, output_greedy)
    _check_helpers(tokenizer, prompt_cache, context_text)
    _check_model(model, "score_token_continuations")
    _check_ids(prefix, conts, model_vocab_size(model), ("context_ids", "continuation_ids"), _ID_FIX)
    _check_positions(model, prefix, conts, ("context_ids", "continuation_ids"))
    with torch.no_grad():
        results = _score_ids(model, tokenizer, strategy, prefix, conts, options, prompt_cache, context_text)
    _warn_below_floor(results, strategy, floor)
    return results


_ID_FIX = "pass ids of the model's own tokenizer (token ids index the model's vocabulary)."


def _token_ids(context_ids, continuation_ids) -> tuple[list[int], list[list[int]]]:
    """The context's and each continuation's ids as lists of Python ints, each non-empty."""
    prefix = _id_list(context_ids, "context_ids")
    if not prefix:
        raise ValueError(
            "`context_ids` is empty; the first continuation token needs a context: give the context's "
            "token ids (at least the BOS token id, e.g. [tokenizer.bos_token_id])."
        )
    if isinstance(continuation_ids, (str, torch.Tensor)) or not _is_sequence(continuation_ids):
        raise ValueError(
            "`continuation_ids` must be a list of token-id lists, one per continuation, got "
            f"{type(continuation_ids).__name__}; e.g. [[318], [257, 1310]] (for text: score_continuations)."
        )
    if len(continuation_ids) == 0:
        raise ValueError("`continuation_ids` is empty; give at least one continuation (a list of ids).")
    if isinstance(continuation_ids[0], numbers.Integral):
        raise ValueError(
            "`continuation_ids` must be a list of token-id lists, one per continuation, got a flat list "
            "of ints; to score one continuation, wrap it in a list: [ids]."
        )
    conts = [_id_list(ids, f"continuation_ids[{i}]") for i, ids in enumerate(continuation_ids)]
    empty = next((i for i, ids in enumerate(conts) if not ids), None)
    if empty is not None:
        raise ValueError(
            f"`continuation_ids[{empty}]` is empty; every continuation needs at least one token id "
            "(drop it, or give its tokens)."
        )
    return prefix, conts


def _id_list(ids, argument: str) -> list[int]:
    """``ids`` (a sequence of ints or a 1-D integer tensor) as a list of Python ints."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(
                f"`{argument}` must be a 1-D tensor of integer token ids, got shape {tuple(ids.shape)} "
                f"and dtype {ids.dtype}; pass a row of input_ids (e.g. input_ids[0])."
            )
        return ids.tolist()
    if isinstance(ids, str) or not _is_sequence(ids):
        raise ValueError(
            f"`{argument}` must be a list of token ids (ints) or a 1-D tensor, got {type(ids).__name__}; "
            "tokenize text first (tokenizer(text)['input_ids']) or use score_continuations."
        )
    for k, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, numbers.Integral):
            raise ValueError(
                f"`{argument}[{k}]` must be an int token id, got {token!r} ({type(token).__name__}); "
                "pass the ids a tokenizer gives (ints), not text, floats or nested lists."
            )
    return [int(token) for token in ids]


def _is_sequence(value) -> bool:
    # A generator has no length and a dict or set would be read by its keys in arbitrary order.
    return not isinstance(value, (bytes, Mapping, AbstractSet)) and (
        hasattr(value, "__len__") and hasattr(value, "__getitem__")
    )


@dataclass(frozen=True)
class _Options:
    """The validated scoring options."""

    protocol: ScoringProtocol
    batch_size: int | None
    floor: Floor
    positions_per_chunk: int
    share_prefix: bool
    output_greedy: bool


def _check_options(
    protocol: str,
    batch_size: int | None,
    floor: Floor,
    positions_per_chunk: int,
    share_prefix: bool,
    output_greedy: bool,
) -> _Options:
    """Refuse a bad option; return the options."""
    if protocol not in SCORING_PROTOCOLS:
        raise ValueError(f"`protocol` must be one of {SCORING_PROTOCOLS}, got {protocol!r}.")
    check_int("batch_size", batch_size, 1, allow_none=True, hint="continuations per forward pass")
    if not isinstance(floor, RelativeFloor):
        hint = "the score of implausible tokens under 'normalized'; -1000 or RelativeFloor()"
        check_number("floor", floor, hint=hint)
    check_int("positions_per_chunk", positions_per_chunk, 1, hint="scored positions per head product")
    check_flag("share_prefix", share_prefix)
    check_flag("output_greedy", output_greedy)
    return _Options(protocol, batch_size, floor, positions_per_chunk, share_prefix, output_greedy)


def _check_helpers(tokenizer, prompt_cache: PromptCache | None, context_text: str | None) -> None:
    if tokenizer is not None and not callable(tokenizer):
        raise ValueError(
            f"`tokenizer` must be the model's own tokenizer (callable on text) or None, got {tokenizer!r}."
        )
    if prompt_cache is not None and not isinstance(prompt_cache, PromptCache):
        raise ValueError(
            f"`prompt_cache` must be a PromptCache (of a primer the context starts with) or None, got "
            f"{type(prompt_cache).__name__}."
        )
    if prompt_cache is not None and tokenizer is None:
        raise ValueError(
            "`prompt_cache` needs `tokenizer` (the model's own) to tokenize its primer; pass "
            "tokenizer=..., or leave prompt_cache out."
        )
    if context_text is not None and not isinstance(context_text, str):
        raise ValueError(
            "`context_text` must be the text that `context_ids` encode, or None, got "
            f"{type(context_text).__name__}."
        )


def _check_model(model: nn.Module, entry: str) -> None:
    """What every call needs of ``model``, with or without a strategy (a strategy's
    :class:`~contrastive_decoding.LayerReadout` checks more)."""
    check_usable_model(model)
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"`model` ({type(model).__name__}) is an encoder-decoder model; {entry} scores "
            "with decoder-only causal LMs (e.g. Llama, Qwen2, Mistral, Gemma, Phi, GPT-2, OPT), "
            "loaded with AutoModelForCausalLM."
        )


def _check_ids(
    prefix: list[int], conts: list[list[int]], vocab_size: int | None, names: tuple[str, str], fix: str
) -> None:
    """Refuse token ids the model cannot read (an IndexError in its embedding otherwise)."""
    check_token_ids(prefix, vocab_size, names[0], fix)
    for i, cont in enumerate(conts):
        check_token_ids(cont, vocab_size, f"{names[1]}[{i}]", fix)


def _check_positions(
    model: nn.Module, prefix: list[int], conts: list[list[int]], names: tuple[str, str]
) -> None:
    """Refuse a sequence longer than a table of learned positions (GPT-2's ``wpe``, OPT's
    ``embed_positions``), which fails in the embedding with a bare IndexError otherwise."""
    limit = _learned_positions(model)
    longest = len(prefix) + max(len(c) for c in conts)
    if limit is not None and longest > limit:
        raise ValueError(
            f"`{names[0]}` and the longest of `{names[1]}` make {longest} tokens, but "
            f"{type(model).__name__} reads at most {limit} positions; shorten the context (e.g. fewer "
            "few-shot examples) or the continuations."
        )


def _learned_positions(model: nn.Module) -> int | None:
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("wpe", "embed_positions") and isinstance(module, nn.Embedding):
            return module.num_embeddings - int(getattr(module, "offset", 0))  # OPT offsets by 2
    return None


# ------------------------------------------------------------------------------------------------
# The scoring


@dataclass
class _Call:
    """One scoring call: the model, what is attached to it, the context and the options."""

    model: nn.Module
    tokenizer: object
    sources: ContrastSources | None
    prefix: list[int]
    device: torch.device
    pad_id: int
    options: _Options
    prompt_cache: PromptCache | None
    context_text: str | None


def _score_ids(
    model: nn.Module,
    tokenizer,
    strategy: ContrastStrategy | None,
    prefix: list[int],
    conts: list[list[int]],
    options: _Options,
    prompt_cache: PromptCache | None,
    context_text: str | None,
) -> list[ContinuationScore]:
    """Score validated ids; the strategy's sources are attached for the duration only."""
    # Resolve and validate the strategy's needs before anything is attached.
    sources = ContrastSources(model, strategy, tokenizer, positions="all") if strategy is not None else None
    vocab_size = model_vocab_size(model)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None or (vocab_size is not None and not 0 <= pad_id < vocab_size):
        # Pads fill masked positions only, so any id the model can read gives the same scores; a pad
        # token added to the tokenizer without resizing the model's embeddings would not be one.
        pad_id = 0
    device = next(model.parameters()).device
    call = _Call(model, tokenizer, sources, prefix, device, pad_id, options, prompt_cache, context_text)
    if sources is not None and sources.streams is not None:
        sources.streams.suppression.suppress_from = len(prefix) - 1
    with sources if sources is not None else nullcontext():
        return _score_batches(call, conts)


def _score_batches(call: _Call, conts: list[list[int]]) -> list[ContinuationScore]:
    """Every continuation, ``batch_size`` rows per pass, on the prompt's KV cache or in full rows."""
    model, sources, prefix, opts = call.model, call.sources, call.prefix, call.options
    step = opts.batch_size or len(conts)
    results: list[ContinuationScore] = []
    prefix_pass, primer = None, None
    for lo in range(0, len(conts), step):
        chunk = conts[lo : lo + step]
        if not opts.share_prefix:
            logits, probe = _forward_full(model, sources, prefix, chunk, call.pad_id, call.device)
        else:
            if prefix_pass is None:
                primer = _primer_start(call)
                prefix_pass = _forward_prefix(model, sources, prefix, call.device, primer)
            reuse = lo + step < len(conts)
            logits, probe = _forward_on_prefix(
                model, sources, prefix_pass, chunk, call.pad_id, call.device, reuse
            )
        if sources is not None and sources.amateur is not None:
            amateur_primer = None if primer is None else (primer[0], call.prompt_cache)
            probe["amateur"] = sources.amateur.score_rows(prefix, chunk, amateur_primer)
        results += _score_chunk(call, logits, probe, chunk)
    return results


def _primer_start(call: _Call) -> tuple[int, object] | None:
    """``(primer tokens, a copy of their KV cache)`` when the prompt cache serves this context."""
    cache = call.prompt_cache
    if cache is None or _reads_whole_prompt(call.sources):
        return None
    # Without the context's text the ids alone decide (the cache checks them in any case).
    text = call.context_text if call.context_text is not None else cache.primer
    return cache.start(call.model, call.tokenizer, text, call.prefix)


def _score_chunk(
    call: _Call, logits: torch.Tensor, probe: dict, chunk: list[list[int]]
) -> list[ContinuationScore]:
    """The scores of one batch of continuations from the logits and probe of its passes."""
    # Flatten the (row, position) pairs that score a real continuation token.
    row_idx, pos_idx, targets = [], [], []
    for i, cont in enumerate(chunk):
        row_idx += [i] * len(cont)
        pos_idx += list(range(len(cont)))
        targets += cont
    row_t = torch.tensor(row_idx, device=call.device)
    pos_t = torch.tensor(pos_idx, device=call.device)
    target_t = torch.tensor(targets, device=call.device)
    final = logits[row_t, pos_t].float()
    if call.sources is None:
        log_probs = F.log_softmax(final, dim=-1)
        token_scores = log_probs.gather(-1, target_t[:, None]).squeeze(-1)
        chosen = None
        greedy = (log_probs.argmax(dim=-1) == target_t).cpu() if call.options.output_greedy else None
    else:
        token_scores, chosen, greedy = _contrast_scores(call, probe, final, row_t, pos_t, target_t)
    return _split(call, chunk, token_scores, chosen, greedy)


def _split(
    call: _Call,
    chunk: list[list[int]],
    token_scores: torch.Tensor,
    chosen: torch.Tensor | None,
    greedy: torch.Tensor | None,
) -> list[ContinuationScore]:
    """One :class:`ContinuationScore` per continuation from the flat per-token results."""
    opts, results, offset = call.options, [], 0
    strategy = None if call.sources is None else call.sources.strategy
    for cont in chunk:
        n = len(cont)
        piece = token_scores[offset : offset + n].cpu()
        used = (
            None if chosen is None else [call.sources.layers[j] for j in chosen[offset : offset + n].tolist()]
        )
        results.append(
            ContinuationScore(
                continuation=None,
                total=float(piece.sum()),
                token_scores=piece,
                token_ids=cont,
                premature_layers=used,
                below_floor=_below_floor(piece, strategy, opts.protocol, opts.floor),
                is_greedy=None if greedy is None else bool(greedy[offset : offset + n].all()),
            )
        )
        offset += n
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
            stacklevel=_caller_level(),
        )


def _caller_level() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside this module (the text
    API calls the token-id API, so the depth varies)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1
    return level


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
    call: _Call,
    probe: dict,
    final: torch.Tensor,
    row_t: torch.Tensor,
    pos_t: torch.Tensor,
    target_t: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The strategy's scores of the targets ``(P,)``, the layer chosen for each (or ``None``) and,
    with ``output_greedy``, whether each target is the argmax of the strategy's decoding scores."""
    sources, opts = call.sources, call.options
    scores, chosen, greedy = [], [], []
    for lo in range(0, final.shape[0], opts.positions_per_chunk):
        sl = slice(lo, lo + opts.positions_per_chunk)
        inputs = sources.scored_inputs(final[sl], probe, row_t[sl], pos_t[sl])
        targets = target_t[sl]
        out = sources.strategy.score(inputs, targets, opts.protocol, opts.floor)
        scores.append(out.scores)
        chosen.append(out.chosen)
        if opts.output_greedy:
            # The same inputs: the early exits the score computed are reused.
            best = sources.strategy.step(inputs).scores.argmax(dim=-1)
            greedy.append((best.to(targets.device) == targets).cpu())
    chosen_t = None if chosen[0] is None else torch.cat(chosen)
    return torch.cat(scores), chosen_t, (torch.cat(greedy) if greedy else None)
