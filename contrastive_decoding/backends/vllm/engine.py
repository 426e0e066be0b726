"""The engine arguments that run this library's strategies in vLLM, for ``LLM`` and the server.

No vLLM import here: ``contrastive-decoding serve --print-command`` and request checks work without it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from contrastive_decoding.backends.vllm.models import (
    HOOK_ARCHITECTURES,
    PREFIX,
    SUPPORTED_ARCHITECTURES,
    UnsupportedModelError,
)
from contrastive_decoding.backends.vllm.selection import (
    CONTRAST_KEY,
    ENGINE_KEY,
    Layout,
    captured_layers,
    engine_settings,
    request_args,
    select,
)

__all__ = ["engine_arguments", "model_layout", "PROCESSOR", "WORKER_EXTENSION"]

PROCESSOR = "contrastive_decoding.backends.vllm.processor:ContrastLogitsProcessor"
WORKER_EXTENSION = "contrastive_decoding.backends.vllm.worker.ContrastWorkerExtension"


def model_layout(model: str, layers: str | list[int] = "all", trust_remote_code: bool = False):
    """``(architecture, Layout)`` of a checkpoint, from its config alone (no weights are loaded).

    Raises:
        UnsupportedModelError: an architecture the vLLM backend does not read (the message lists
            the supported ones).
        ValueError: ``layers`` outside the model.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model, trust_remote_code=trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    architecture = (getattr(config, "architectures", None) or ["?"])[0]
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{model}: architecture {architecture} is not supported by the vLLM backend (it needs the "
            f"model's layer states); supported: {', '.join(SUPPORTED_ARCHITECTURES)}. Run it with the "
            "transformers backend."
        )
    n = int(text.num_hidden_layers)
    captured = captured_layers(layers, n)
    layout = Layout(n, bool(getattr(text, "tie_word_embeddings", False)), int(text.vocab_size), captured)
    return architecture, layout


def engine_arguments(
    model: str,
    strategy: str | None = None,
    strategy_params: Mapping[str, Any] | None = None,
    repetition_penalty: float | None = None,
    layers: str | list[int] = "all",
    hf_overrides: Mapping[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> tuple[dict[str, Any], str]:
    """The vLLM engine arguments that run this library's strategies, and the frontend's settings.

    Returns:
        ``(arguments, frontend)``: ``hf_overrides`` (the ``Contrast<Architecture>`` class and the
        engine settings), ``logits_processors`` and ``worker_extension_cls`` for ``vllm.LLM`` or
        ``vllm serve``; and the JSON to put in ``CONTRASTIVE_DECODING_VLLM_ENGINE`` so that the
        frontend checks requests against the model (HTTP 400 instead of a refusal in the worker).

    Raises:
        ValueError: an unknown strategy or parameter, a strategy that needs more than layer exits,
            layers the model does not have, or an unsupported architecture.
    """
    settings = engine_settings(strategy, strategy_params, repetition_penalty, layers)
    architecture, layout = model_layout(model, settings["layers"], trust_remote_code)
    if strategy is not None:  # checked against the model now, not at the first request
        select({CONTRAST_KEY: strategy, **request_args(**dict(strategy_params or {}))}, None, layout)
    overrides = dict(hf_overrides or {})
    overrides["architectures"] = [PREFIX + architecture]
    overrides[ENGINE_KEY] = settings
    arguments = {
        "hf_overrides": overrides,
        "logits_processors": [PROCESSOR],
        "worker_extension_cls": WORKER_EXTENSION,
    }
    if architecture in HOOK_ARCHITECTURES:
        arguments["enforce_eager"] = True
    frontend = json.dumps({"engine": settings, "layout": layout.as_dict()})
    return arguments, frontend
