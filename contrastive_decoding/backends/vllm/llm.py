"""``LLM``: vLLM's offline engine with this library's strategies, engine-wide or per request.

Example (needs the ``[vllm]`` extra; any Llama/Mistral/Qwen2/Qwen3 checkpoint)::

    from vllm import SamplingParams
    from contrastive_decoding.vllm import LLM, request_args

    llm = LLM("HuggingFaceTB/SmolLM2-135M-Instruct", strategy="dola-high", dtype="float32")
    greedy = SamplingParams(temperature=0, max_tokens=32)
    out = llm.generate(["The capital of France is"], greedy)          # DoLa high, penalty 1.2
    plain = SamplingParams(temperature=0, max_tokens=32, extra_args=request_args("none"))
    sled = llm.generate(["..."], greedy, strategy="sled")              # this call only
    out[0].outputs[0].contrast_layers                                  # DoLa's layer per token
"""

from __future__ import annotations

import copy
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import vllm

from contrastive_decoding.backends.vllm.engine import engine_arguments
from contrastive_decoding.backends.vllm.selection import CONTRAST_KEY, FRONTEND_ENV, RECORD_KEY

__all__ = ["LLM"]


class LLM(vllm.LLM):
    """``vllm.LLM`` whose requests run a strategy of this library: ``strategy`` for every request
    (``None``: plain vLLM unless a request asks), or per request with ``extra_args``
    (:func:`~contrastive_decoding.backends.vllm.selection.request_args`) or ``generate(strategy=)``.

    Args:
        model: a Hub id or a local folder (Llama, Mistral, Qwen2/3, Phi-3, Granite, Gemma, Gemma-2,
            GPT-2 or OPT).
        strategy: the default strategy or preset (``"dola-high"``, ``"sled"``, ...).
        strategy_params: its parameters (e.g. ``{"relative_top": 0.2}``).
        repetition_penalty: applied after the contrast (default: the strategy's registered one,
            1.2 for DoLa; a request's own ``repetition_penalty`` replaces it).
        layers: ``"all"`` or the layer indices to capture (fewer is faster; a request that needs
            others is refused).
        **kwargs: vLLM's engine arguments (``dtype``, ``max_model_len``, ``tensor_parallel_size``...).

    Raises:
        ValueError: as :func:`engine_arguments`, or engine arguments this backend sets itself.
    """

    def __init__(
        self,
        model: str,
        strategy: str | None = None,
        strategy_params: Mapping[str, Any] | None = None,
        repetition_penalty: float | None = None,
        layers: str | list[int] = "all",
        **kwargs: Any,
    ) -> None:
        for taken in ("logits_processors", "worker_extension_cls", "speculative_config"):
            if kwargs.get(taken):
                raise ValueError(
                    f"`{taken}` is set by contrastive_decoding's LLM (layer contrast needs its own logits "
                    "processor and worker extension, and no speculative decoding); use vllm.LLM with "
                    "engine_arguments() to combine them by hand."
                )
        arguments, frontend = engine_arguments(
            model,
            strategy,
            strategy_params,
            repetition_penalty,
            layers,
            kwargs.pop("hf_overrides", None),
            kwargs.get("trust_remote_code", False),
        )
        if arguments.pop("enforce_eager", False):
            if kwargs.get("enforce_eager") is False:
                raise ValueError(
                    "This architecture is read with forward hooks, which need enforce_eager=True; "
                    "drop enforce_eager=False."
                )
            kwargs["enforce_eager"] = True
        os.environ[FRONTEND_ENV] = frontend
        super().__init__(model, **arguments, **kwargs)

    def generate(
        self,
        prompts: Any,
        sampling_params: vllm.SamplingParams | Sequence[vllm.SamplingParams] | None = None,
        *,
        strategy: str | None = None,
        **kwargs: Any,
    ) -> list[vllm.RequestOutput]:
        """``vllm.LLM.generate``, plus ``strategy=`` for this call's requests (a name, or ``"none"``)
        and, on each single-sample output, ``contrast_layers``: the layer a choosing strategy
        (DoLa) contrasted for each generated token (``None`` where none was recorded)."""
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        many = isinstance(sampling_params, Sequence)
        count = len(prompts) if isinstance(prompts, Sequence) and not isinstance(prompts, str) else 1
        params_list = list(sampling_params) if many else [sampling_params] * count
        keys, prepared = [], []
        for params in params_list:
            params = copy.copy(params)
            extra = dict(params.extra_args or {})
            if strategy is not None:
                extra[CONTRAST_KEY] = strategy
            key = None
            if params.n == 1:
                key = extra[RECORD_KEY] = uuid.uuid4().hex
            params.extra_args = extra
            keys.append(key)
            prepared.append(params)
        outputs = super().generate(prompts, prepared if (many or count > 1) else prepared[0], **kwargs)
        wanted = [k for k in keys if k is not None]
        records = self.collective_rpc("contrast_take_records", args=(wanted,))[0] if wanted else {}
        for output, key in zip(outputs, keys, strict=False):
            for completion in output.outputs:
                layers = records.get(key) if key is not None else None
                completion.contrast_layers = layers or None
        return outputs
