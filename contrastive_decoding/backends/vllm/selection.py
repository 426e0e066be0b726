"""Which strategy a vLLM request runs: the engine's default and the request's own ``extra_args``.

This module imports no vLLM: the frontend (request admission, HTTP 400s) and the worker (the logits
processor) both resolve a request here, with the same names, presets, defaults and repetition
penalty as the harness and the lm-eval model.

A request chooses with flat keys in ``SamplingParams.extra_args`` (the OpenAI server's
``vllm_xargs`` takes only flat string/number/list values):

* ``"contrast"``: a registered strategy or preset name (``"dola-high"``), or ``"none"`` to turn the
  engine's default off for this request;
* ``"contrast_<parameter>"``: a parameter of that strategy (``"contrast_relative_top": 0.2``);
* ``"contrast_repetition_penalty"``: the repetition penalty applied after the contrast (default: the
  strategy's registered one, 1.2 for DoLa).

A request without ``"contrast"`` runs the engine's default strategy (if any), its ``contrast_*``
parameters overriding the engine's.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from contrastive_decoding.core.contract import ContrastStrategy
from contrastive_decoding.core.specs import check_layer_indices
from contrastive_decoding.strategies import get_strategy, resolve_strategy

__all__ = [
    "CONTRAST_KEY",
    "ENGINE_KEY",
    "FRONTEND_ENV",
    "Layout",
    "Selection",
    "captured_layers",
    "engine_settings",
    "frontend_context",
    "request_args",
    "select",
]

CONTRAST_KEY = "contrast"
PREFIX = "contrast_"
PENALTY_KEY = "contrast_repetition_penalty"
# Set by this package's `LLM` on each request so that its worker can record DoLa's chosen layers.
RECORD_KEY = "contrast_record"
OFF = "none"
# The attribute of the model's HF config (set through `hf_overrides`) holding the engine settings.
ENGINE_KEY = "contrastive_decoding"
# The engine settings and model layout, as JSON, for request validation in the frontend process
# (vLLM's `validate_params` hook sees only the request); set by `LLM` and `contrastive-decoding serve`.
FRONTEND_ENV = "CONTRASTIVE_DECODING_VLLM_ENGINE"
LAYER_EXIT_STRATEGIES = ("dola", "sled", "deco", "vista", "acd")


@dataclass(frozen=True)
class Layout:
    """What a strategy may know of the served model (a :class:`~contrastive_decoding.core.contract.
    ModelLayout`), and which layers' states the engine captures."""

    num_layers: int
    tied_embeddings: bool
    vocab_size: int
    captured: tuple[int, ...] = ()

    def layout_of(self, model: Any) -> Layout:
        if model is None:
            return self
        raise ValueError(
            "The vLLM backend runs one model: strategies with a second (amateur) model are not "
            "supported there; run them with the transformers backend."
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "tied_embeddings": self.tied_embeddings,
            "vocab_size": self.vocab_size,
            "captured": list(self.captured),
        }


@dataclass(frozen=True)
class Selection:
    """A request's resolved strategy.

    Attributes:
        name: the name it was chosen by (a strategy or preset).
        strategy: the built strategy.
        layers: its premature layers on this model (what ``ContrastOutput.chosen`` indexes).
        repetition_penalty: applied after the contrast (1.0: none).
        key: identifies equal settings, so rows that share them are contrasted in one batch.
    """

    name: str
    strategy: ContrastStrategy = field(compare=False)
    layers: tuple[int, ...]
    repetition_penalty: float
    key: str


def engine_settings(
    strategy: str | None = None,
    params: Mapping[str, Any] | None = None,
    repetition_penalty: float | None = None,
    layers: str | list[int] = "all",
) -> dict[str, Any]:
    """The engine-wide settings, checked, as the JSON-able dict stored in the model's config.

    Args:
        strategy: the default strategy or preset for requests that name none (``None``: plain vLLM
            unless a request asks).
        params: parameters of the default strategy.
        repetition_penalty: overrides the default strategy's registered penalty.
        layers: ``"all"`` (any request may pick any layer-exit strategy) or the layer indices whose
            states the engine captures (fewer is faster; requests needing others are refused).

    Raises:
        ValueError: an unknown strategy, a bad parameter, or a strategy the vLLM backend cannot run.
    """
    settings: dict[str, Any] = {"strategy": strategy, "params": dict(params or {})}
    if repetition_penalty is not None:
        settings["repetition_penalty"] = _check_penalty(repetition_penalty, "repetition_penalty")
    if layers != "all":
        if isinstance(layers, (str, bytes)) or not all(
            isinstance(x, numbers.Integral) and not isinstance(x, bool) for x in layers
        ):
            raise ValueError(f"`layers` must be 'all' or a list of layer indices, got {layers!r}.")
        layers = sorted({int(x) for x in layers})
    settings["layers"] = layers
    if strategy is not None:
        _build(strategy, settings["params"], argument="strategy")
    elif settings["params"]:
        raise ValueError("Strategy parameters were given without a `strategy`; name one (e.g. 'dola').")
    json.dumps(settings)  # it travels in the model config and an environment variable
    return settings


def captured_layers(layers: str | list[int], num_layers: int) -> tuple[int, ...]:
    """The layers an engine captures on an ``num_layers``-layer model: all, or those given.

    Raises:
        ValueError: a layer outside ``0..num_layers-1`` (naming ``layers``).
    """
    if layers == "all":
        return tuple(range(num_layers))
    if not layers:  # an engine that serves plain requests only
        return ()
    return tuple(sorted(set(check_layer_indices(list(layers), num_layers, argument="layers"))))


def request_args(strategy: str | None = None, **params: Any) -> dict[str, Any]:
    """``extra_args`` that make a request run ``strategy`` with ``params``.

    Example:
        >>> request_args("dola", dola_layers=[4, 8], repetition_penalty=1.0)
        {'contrast': 'dola', 'contrast_dola_layers': [4, 8], 'contrast_repetition_penalty': 1.0}
    """
    args: dict[str, Any] = {} if strategy is None else {CONTRAST_KEY: strategy}
    args.update({PREFIX + k: v for k, v in params.items()})
    return args


def select(
    extra_args: Mapping[str, Any] | None,
    engine: Mapping[str, Any] | None,
    layout: Layout | None,
    cache: dict[str, Selection] | None = None,
) -> Selection | None:
    """The strategy a request runs, or ``None`` for plain decoding.

    Args:
        extra_args: the request's ``SamplingParams.extra_args``.
        engine: the engine settings (:func:`engine_settings`), or ``None``.
        layout: the served model's layout (a :class:`Layout`, or anything with its attributes,
            such as the worker's ``VllmLayerExits``); ``None`` checks everything but layer ranges.
        cache: selections already built, by key (rows with equal settings share one strategy).

    Raises:
        ValueError: naming the key and the fix (unknown name, bad parameter, a layer the model or
            engine does not have, a strategy that needs more than the model's own layers).
    """
    extra = dict(extra_args or {})
    ours = {k: v for k, v in extra.items() if k == CONTRAST_KEY or k.startswith(PREFIX)}
    ours.pop(RECORD_KEY, None)
    engine = engine or {}
    name = ours.pop(CONTRAST_KEY, None)
    penalty = ours.pop(PENALTY_KEY, None)
    params = {k[len(PREFIX) :]: v for k, v in ours.items()}
    if name is not None and not isinstance(name, str):
        raise ValueError(f"`{CONTRAST_KEY}` must be a strategy name such as 'dola-high', got {name!r}.")
    if name == OFF:
        if params or penalty is not None:
            raise ValueError(f"`{CONTRAST_KEY}='none'` turns the contrast off; drop the contrast_* keys.")
        return None
    base_params: dict[str, Any] = {}
    if name is None:
        name = engine.get("strategy")
        base_params = dict(engine.get("params") or {})
        if penalty is None:
            penalty = engine.get("repetition_penalty")
    if name is None:
        if params or penalty is not None:
            keys = ", ".join(
                sorted(PREFIX + k for k in params) + ([PENALTY_KEY] if penalty is not None else [])
            )
            raise ValueError(
                f"{keys} given without a strategy: add `{CONTRAST_KEY}` (e.g. 'dola-high') to the request."
            )
        return None
    params = {**base_params, **params}
    key = json.dumps([name, params, penalty], sort_keys=True, default=repr)
    if cache is not None and key in cache:
        return cache[key]
    strategy, base = _build(name, params, argument=CONTRAST_KEY)
    if penalty is None:
        penalty = get_strategy(base).repetition_penalty
    penalty = _check_penalty(penalty, PENALTY_KEY)
    _check_kind(strategy, name, layout or _NOMINAL)
    layers = () if layout is None else tuple(_check_layers(strategy, name, layout))
    selection = Selection(name, strategy, layers, penalty, key)
    if cache is not None:
        cache[key] = selection
    return selection


def frontend_context() -> tuple[dict[str, Any] | None, Layout | None]:
    """The engine settings and layout published for this process's requests (see ``FRONTEND_ENV``)."""
    text = os.environ.get(FRONTEND_ENV)
    if not text:
        return None, None
    data = json.loads(text)
    layout = data.get("layout")
    return data.get("engine"), None if layout is None else Layout(
        **{**layout, "captured": tuple(layout["captured"])}
    )


def _build(name: str, params: Mapping[str, Any], argument: str) -> tuple[ContrastStrategy, str]:
    try:
        base, full = resolve_strategy(name, params)
    except KeyError as exc:
        raise ValueError(f"`{argument}`: {exc.args[0]}") from None
    info = get_strategy(base)
    kinds = info.kinds
    full = {k: _coerce(v, kinds.get(k)) for k, v in full.items()}
    try:
        return info.build(**full), base
    except (TypeError, ValueError) as exc:
        if info.strategy_class.amateur_stream is not ContrastStrategy.amateur_stream:
            # e.g. classic CD, whose amateur model cannot be given here: that is the reason to say
            raise ValueError(
                f"Strategy {name!r} needs an amateur (a second model or stream); the vLLM backend runs "
                f"strategies that read only the model's own layer exits ({', '.join(LAYER_EXIT_STRATEGIES)} "
                "and user strategies of that kind). Run it with the transformers backend."
            ) from None
        if isinstance(exc, ValueError):
            raise
        valid = ", ".join(PREFIX + p for p in info.parameters)  # an unknown parameter: name the keys
        raise ValueError(f"{exc.args[0].split(';')[0]} (request keys: {valid}).") from None


def _coerce(value: Any, kind: str | None) -> Any:
    """The OpenAI server's ``vllm_xargs`` carry strings and numbers only: read ``"true"``/``"false"``
    as booleans for boolean parameters."""
    if kind is not None and kind.startswith("bool") and isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "false"):
            return lowered == "true"
    return value


def _check_penalty(value: Any, argument: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"`{argument}` must be a finite number > 0 (1.0: none), got {value!r}.")
    return float(value)


# Where the frontend does not know the served model, strategies are checked for what they need on a
# nominal one (layer ranges are checked by the worker, which refuses the request).
_NOMINAL = Layout(num_layers=32, tied_embeddings=False, vocab_size=1 << 20, captured=tuple(range(32)))


def _check_kind(strategy: ContrastStrategy, name: str, layout: Layout) -> None:
    """Refuse strategies that need more than the model's own layer exits."""
    needs = []
    if strategy.degraded_streams(layout):
        needs.append("degraded attention streams (a second forward of the model)")
    if strategy.amateur_stream() is not None:
        needs.append("an amateur stream (a second model or prompt)")
    if strategy.entropy_source(layout) is not None:
        needs.append("a context entropy over every prompt position")
    if needs:
        raise ValueError(
            f"Strategy {name!r} needs {' and '.join(needs)}; the vLLM backend runs strategies that read "
            f"only the model's own layer exits ({', '.join(LAYER_EXIT_STRATEGIES)} and user strategies "
            "of that kind). Run it with the transformers backend."
        )


def _check_layers(strategy: ContrastStrategy, name: str, layout: Layout) -> list[int]:
    """The strategy's premature layers on the served model, all of them captured by the engine."""
    layers = strategy.premature_layers(layout)
    missing = sorted(set(layers) - set(layout.captured))
    if missing:
        raise ValueError(
            f"Strategy {name!r} reads layers {missing}, which this engine does not capture "
            f"(captured: {list(layout.captured)}); start the engine with layers='all' or include them."
        )
    return list(layers)
