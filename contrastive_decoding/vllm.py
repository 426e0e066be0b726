"""``from contrastive_decoding.vllm import LLM, request_args``: the vLLM backend's public names
(see :mod:`contrastive_decoding.backends.vllm`; needs the ``[vllm]`` extra)."""

from contrastive_decoding.backends.vllm import request_args
from contrastive_decoding.backends.vllm.engine import engine_arguments
from contrastive_decoding.backends.vllm.llm import LLM

__all__ = ["LLM", "engine_arguments", "request_args"]
