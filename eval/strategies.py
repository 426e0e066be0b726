"""The strategies the harness runs: the library's registry, plus the plain model.

Every strategy registered with :func:`contrastive_decoding.register_strategy` (the library's and
any a user registers) is a ``--strategy`` name here, with its presets, and its ``--param`` names,
defaults and kinds read from the class's one declaration (its ``__init__``). The harness adds only
what is its own: ``baseline`` (the plain model), ``cd``'s amateur given by name and loaded here,
and :class:`StrategyRun`, a strategy bound to one loaded model. Generation runs the library's
generic loop (:func:`contrastive_decoding.contrast_generate`) on the very object used for scoring.

``register(StrategyEntry(...))`` still adds a harness-only entry (e.g. one with its own factory).
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from contrastive_decoding.eval.errors import EvalError, NonFiniteScoreError
from transformers import LogitsProcessor, LogitsProcessorList

from contrastive_decoding.backends.hf.amateur import check_same_vocabulary
from contrastive_decoding.backends.hf.generation import contrast_generate
from contrastive_decoding.backends.hf.loading import load_model
from contrastive_decoding.backends.hf.sources import ContrastSources
from contrastive_decoding.core.validation import parse_param_pairs
from contrastive_decoding.strategies import (
    StrategyInfo,
    get_strategy,
    presets,
    registered_strategies,
    resolve_strategy,
)
from contrastive_decoding.strategies.amateur_cd import ContrastiveDecoding

__all__ = [
    "PRESETS",
    "STRATEGIES",
    "StrategyEntry",
    "StrategyRun",
    "build_strategy",
    "check_on_model",
    "check_strategy",
    "check_values",
    "parse_params",
    "register",
]


@dataclass
class StrategyRun:
    """A strategy ready to run on one model.

    Attributes:
        name: the registry name.
        params: every parameter, defaults filled in (JSON-serialisable; recorded in summaries).
        scoring: passed as ``strategy=`` to ``score_continuations`` (``None``: plain model).
        generate_kwargs: extra keyword arguments for ``model.generate`` (e.g. ``custom_generate``).
        repetition_penalty: the default generation repetition penalty for this strategy.
    """

    name: str
    params: dict[str, Any]
    scoring: Any | None
    generate_kwargs: dict[str, Any] = field(default_factory=dict)
    repetition_penalty: float = 1.0


@dataclass(frozen=True)
class StrategyEntry:
    """One registered strategy.

    Attributes:
        name: what ``--strategy`` takes.
        factory: ``factory(model, tokenizer=..., **params) -> StrategyRun``.
        defaults: the accepted parameters and their defaults (``--param`` names outside it are
            rejected).
        description: one line for ``contrastive-decoding list``.
        kinds: the parameters whose values must be of one kind: ``"number"`` (int or float),
            ``"int"``, ``"bool"``, with ``"?"`` appended where ``None`` is accepted too; the others
            are only checked to hold finite numbers.
        check: ``check(params)`` validates the values without a model (e.g. by building the
            strategy object), raising ``ValueError``/``TypeError``; ``None``: no such check.
    """

    name: str
    factory: Callable[..., StrategyRun]
    defaults: Mapping[str, Any]
    description: str = ""
    kinds: Mapping[str, str] = field(default_factory=dict)
    check: Callable[[Mapping[str, Any]], None] | None = None

    @classmethod
    def for_class(
        cls,
        name: str,
        strategy_class: type,
        generate: Callable[..., Any] | None = None,
        repetition_penalty: float = 1.2,
        description: str = "",
    ) -> StrategyEntry:
        """An entry for a strategy class such as :class:`~contrastive_decoding.DoLa`.

        Args:
            name: the registry name.
            strategy_class: built as ``strategy_class(**params)``; used for scoring and, without
                ``generate``, for generation through ``contrast_generate``.
            generate: optional ``custom_generate`` callable taking the class's parameters as
                keywords (e.g. ``dola_generate``).
            repetition_penalty: default generation repetition penalty (DoLa's authors: 1.2).
            description: one line for listings.
        """
        declared = StrategyInfo(name, strategy_class)
        defaults = declared.defaults

        def factory(model, tokenizer=None, **params: Any) -> StrategyRun:
            try:
                strategy = strategy_class(**params)
            except (TypeError, ValueError) as exc:
                raise EvalError(_strategy_message(name, params, exc)) from None
            full = {**defaults, **params}
            if generate is not None:
                # Only the parameters given go through; the callable's own defaults do the rest.
                accepted = inspect.signature(generate).parameters
                unsupported = [k for k in params if k not in accepted]
                if unsupported:
                    raise EvalError(
                        f"--strategy {name}: {generate.__name__} takes no {', '.join(unsupported)}; "
                        "drop the parameter or register the strategy without `generate`."
                    )
                gen_kwargs = {"custom_generate": generate, **params}
                if "classifier" in accepted and tokenizer is not None:
                    gen_kwargs["classifier"] = tokenizer
            else:
                gen_kwargs = {"custom_generate": _bound_generate(strategy, tokenizer)}
            return StrategyRun(name, _jsonable(full), strategy, gen_kwargs, repetition_penalty)

        def check(params: Mapping[str, Any]) -> None:
            # The class validates its values in __init__, which needs no model: run it before one loads.
            strategy_class(**params)

        return cls(
            name,
            factory,
            defaults,
            description or (strategy_class.__doc__ or "").strip().split("\n")[0],
            kinds=declared.kinds,
            check=check,
        )

    @classmethod
    def for_info(cls, info: StrategyInfo) -> StrategyEntry:
        """The entry of a strategy registered in the library."""
        return cls.for_class(
            info.name,
            info.strategy_class,
            repetition_penalty=info.repetition_penalty,
            description=info.description,
        )


def _bound_generate(strategy, tokenizer=None) -> Callable[..., Any]:
    """A ``custom_generate`` callable running ``contrast_generate`` with ``strategy``.

    Its signature is exactly the one ``generate`` passes to custom loops, so ``generate`` routes no
    extra keyword to it. Strategies with degraded streams (LayerCake) get the tokenizer as their
    token classifier.
    """
    extra = {}
    if tokenizer is not None:
        # The tokenizer gives degraded streams their token classes and tokenizes amateur prompts.
        extra["tokenizer"] = tokenizer

    def generate(
        model,
        input_ids,
        logits_processor,
        stopping_criteria,
        generation_config,
        synced_gpus=False,
        streamer=None,
        **model_kwargs,
    ):
        if extra:
            model_kwargs.pop("tokenizer", None)
        # Last in the list, so it sees the scores the next token is chosen from.
        checked = LogitsProcessorList([*(logits_processor or []), FiniteStepScores()])
        return contrast_generate(
            model,
            strategy,
            input_ids,
            checked,
            stopping_criteria,
            generation_config,
            synced_gpus=synced_gpus,
            streamer=streamer,
            **extra,
            **model_kwargs,
        )

    return generate


class FiniteStepScores(LogitsProcessor):
    """Stop generation when a row's step scores hold NaN or +inf, or exclude every token.

    ``-inf`` is how a strategy excludes implausible tokens while decoding, so it is allowed as
    long as one token stays finite; ``argmax`` over a NaN row would silently pick token 0.

    Raises:
        NonFiniteScoreError: naming the batch rows (the runner maps them to item ids).
    """

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        checks = {
            "NaN": torch.isnan(scores).any(-1),
            "+inf": torch.isposinf(scores).any(-1),
            "-inf for every token": torch.isneginf(scores).all(-1),
        }
        bad = checks["NaN"] | checks["+inf"] | checks["-inf for every token"]
        if bool(bad.any()):
            found = " and ".join(name for name, rows in checks.items() if bool(rows.any()))
            raise NonFiniteScoreError(
                bad.nonzero().flatten().tolist(), f"{found} in its generation step scores"
            )
        return scores


def _jsonable(params: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in params.items():
        if isinstance(value, tuple):
            value = list(value)
        try:
            json.dumps(value)
        except TypeError:
            value = repr(value)
        out[key] = value
    return out


def _baseline(model, tokenizer=None, **params: Any) -> StrategyRun:
    return StrategyRun("baseline", {}, None, {}, 1.0)


# The harness's own entries: the plain model, and any registered with `register`.
_OWN: dict[str, StrategyEntry] = {}


class _Strategies(Mapping):
    """Name -> entry: the library's registered strategies, then the harness's own (read live, so a
    strategy registered after import is a ``--strategy`` name at once)."""

    def _entries(self) -> dict[str, StrategyEntry]:
        entries = {name: StrategyEntry.for_info(info) for name, info in registered_strategies().items()}
        entries.update(_OWN)
        return entries

    def __getitem__(self, name: str) -> StrategyEntry:
        if name in _OWN:
            return _OWN[name]
        return StrategyEntry.for_info(get_strategy(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries())

    def __len__(self) -> int:
        return len(self._entries())

    def __contains__(self, name: object) -> bool:
        return name in _OWN or name in registered_strategies()


class _Presets(Mapping):
    """Preset name -> (strategy name, parameters): ``greedy`` and the library's presets."""

    def _entries(self) -> dict[str, tuple[str, dict[str, Any]]]:
        return {"greedy": ("baseline", {}), **presets()}

    def __getitem__(self, name: str) -> tuple[str, dict[str, Any]]:
        return self._entries()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries())

    def __len__(self) -> int:
        return len(self._entries())


STRATEGIES: Mapping[str, StrategyEntry] = _Strategies()

#: Named shortcuts: ``--strategy dola-high`` = ``--strategy dola --param dola_layers=high``.
PRESETS: Mapping[str, tuple[str, dict[str, Any]]] = _Presets()


def register(entry: StrategyEntry) -> None:
    """Add (or replace) a harness-only entry; library strategies register with
    :func:`contrastive_decoding.register_strategy` instead."""
    _OWN[entry.name] = entry


register(StrategyEntry("baseline", _baseline, {}, "the plain model: log-likelihood scoring, greedy decoding"))


def _amateur_cd(model, tokenizer=None, amateur: str | None = None, **params: Any) -> StrategyRun:
    if not amateur:
        raise EvalError(
            "--strategy cd needs the amateur model: --param amateur=<Hub id, local folder or .gguf> "
            "(a smaller model with the same tokenizer)."
        )
    try:
        device = next(model.parameters()).device
        amateur_model, amateur_tokenizer = load_model(amateur, dtype=model.dtype, device=device)
        strategy = ContrastiveDecoding(amateur_model, amateur_tokenizer, **params)
        if tokenizer is not None:
            check_same_vocabulary(model, amateur_model, tokenizer, amateur_tokenizer)
    except (OSError, TypeError, ValueError) as exc:
        raise EvalError(f"--strategy cd: {exc}") from None
    full = {**_cd_defaults(), **params, "amateur": amateur}
    generate = {"custom_generate": _bound_generate(strategy, tokenizer)}
    return StrategyRun("cd", _jsonable(full), strategy, generate, 1.0)


def _cd_defaults() -> dict[str, Any]:
    """cd's parameters in the harness: the amateur by name instead of a loaded model."""
    declared = get_strategy("cd").defaults
    loaded_here = ("amateur_model", "amateur_tokenizer")
    return {"amateur": None, **{k: v for k, v in declared.items() if k not in loaded_here}}


register(
    StrategyEntry(
        "cd",
        _amateur_cd,
        _cd_defaults(),
        get_strategy("cd").description,
        kinds={k: v for k, v in get_strategy("cd").kinds.items() if k in _cd_defaults()},
    )
)


def parse_params(pairs: list[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` into a dict (see :func:`~contrastive_decoding.core.validation.
    parse_param_pairs`). Values are checked against the strategy by :func:`check_strategy` (``NaN``
    parses here, as Python's JSON reads it, and is refused there with the parameter's name).

    Raises:
        EvalError: an item without ``=`` or with an empty key.
    """
    try:
        return parse_param_pairs(pairs)
    except ValueError as exc:
        raise EvalError(str(exc)) from None


def resolve_name(name: str, params: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The registry name and parameters behind a strategy or preset name.

    Raises:
        EvalError: an unknown name (the message lists the valid ones), or a parameter that
            overrides the preset's own (the run would be labelled with the preset's name).
    """
    if name in _OWN:
        return name, dict(params)
    if name == "greedy":
        return "baseline", dict(params)
    try:
        return resolve_strategy(name, params)
    except KeyError:
        valid = ", ".join(sorted(STRATEGIES) + sorted(PRESETS))
        raise EvalError(f"--strategy {name!r} is unknown; valid: {valid}.") from None
    except ValueError as exc:
        raise EvalError(f"--strategy {name!r}: {exc}") from None


def _non_finite(value: Any) -> bool:
    """Whether ``value`` is, or holds (in lists, tuples, dicts), a NaN or infinite float."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return any(_non_finite(v) for v in value)
    if isinstance(value, Mapping):
        return any(_non_finite(v) for v in value.values())
    return False


def _kind_error(value: Any, kind: str) -> str | None:
    """Why ``value`` is not of ``kind`` (see :attr:`StrategyEntry.kinds`), or ``None``."""
    if kind.endswith("?"):
        if value is None:
            return None
        kind = kind[:-1]
    if kind == "bool":
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(value, bool) or (kind == "int" and not isinstance(value, int)):
        return "must be an integer" if kind == "int" else "must be a number"
    if isinstance(value, (int, float)):
        return None
    if isinstance(value, str):
        try:
            text_is_non_finite = not math.isfinite(float(value))
        except ValueError:
            text_is_non_finite = False
        if text_is_non_finite:
            return "must be a finite number (NaN and infinities are refused)"
    return "must be an integer" if kind == "int" else "must be a number"


def check_values(base: str, params: Mapping[str, Any]) -> None:
    """Check parameter values without a model: no NaN or infinity anywhere, numbers where the
    strategy takes numbers, then the strategy's own checks (ranges, choices).

    Raises:
        EvalError: naming the parameter and its value.
    """
    entry = STRATEGIES[base]
    for key, value in params.items():
        if _non_finite(value):
            what = "a finite number" if isinstance(value, float) else "finite numbers only"
            raise EvalError(f"--param {key}={value!r}: must be {what} (NaN and infinities are refused).")
        problem = _kind_error(value, entry.kinds[key]) if key in entry.kinds else None
        if problem:
            default = entry.defaults.get(key)
            raise EvalError(f"--param {key}={value!r}: {problem} (default: {default!r}).")
    if entry.check is not None:
        try:
            entry.check(params)
        except (TypeError, ValueError) as exc:
            raise EvalError(_strategy_message(base, params, exc)) from None


def _strategy_message(base: str, params: Mapping[str, Any], exc: Exception) -> str:
    """One line for a strategy's own error, naming the ``--param`` it is about where it says."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    named = next((k for k in params if f"`{k}`" in text), None)
    where = f" --param {named}={params[named]!r}" if named is not None else ""
    return f"--strategy {base}{where}: {text}"


def check_strategy(name: str, params: Mapping[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """Validate a strategy name, its parameter names and their values (no model needed).

    Returns:
        The registry name and the parameters (a preset's merged in).

    Raises:
        EvalError: unknown name or parameter (listing the valid ones), or a value that is not
            finite, not of the parameter's kind, or out of the strategy's range.
    """
    base, full = resolve_name(name, params or {})
    entry = STRATEGIES[base]
    unknown = [k for k in full if k not in entry.defaults]
    if unknown:
        valid = ", ".join(entry.defaults) or "none"
        raise EvalError(
            f"--param {', '.join(unknown)}: not a parameter of strategy {base!r}; valid: {valid}."
        )
    check_values(base, full)
    return base, full


def check_on_model(run: StrategyRun, model, tokenizer=None, given: Mapping[str, Any] | None = None) -> None:
    """Resolve the strategy's layers, streams and amateur against ``model`` without running it.

    Layer indices and fractions can only be checked against a model's depth (``dola_layers=[99]``
    on a 32-layer model); :class:`~contrastive_decoding.backends.hf.sources.ContrastSources` resolves and
    validates all of them before it attaches anything, so building one (and not entering it) is
    the check.

    Args:
        run: the built strategy.
        model: the loaded model.
        tokenizer: its tokenizer (token classes of degraded streams, amateur prompts).
        given: the parameters the user gave (to name the one an error is about).

    Raises:
        EvalError: naming the strategy (and the parameter, where the message says which).
    """
    if run.scoring is None:
        return
    try:
        ContrastSources(model, run.scoring, tokenizer, positions="all")
    except (TypeError, ValueError) as exc:
        raise EvalError(_strategy_message(run.name, given or run.params, exc)) from None


def build_strategy(model, name: str, params: Mapping[str, Any] | None = None, tokenizer=None) -> StrategyRun:
    """Build the named strategy for ``model``.

    Args:
        model: the loaded causal LM.
        name: a registry name or preset (``baseline``, ``dola``, ``dola-high``, ...).
        params: parameters for the strategy's factory.
        tokenizer: the model's tokenizer (token classes for strategies that need them).

    Raises:
        EvalError: unknown name or parameter (listing the valid ones), or a value the strategy
            rejects.
    """
    base, full = check_strategy(name, params)
    return STRATEGIES[base].factory(model, tokenizer=tokenizer, **full)
