"""A vLLM worker extension: hands DoLa's chosen layers (recorded per request) back to the caller."""

from __future__ import annotations

from contrastive_decoding.backends.vllm import exits

__all__ = ["ContrastWorkerExtension"]


class ContrastWorkerExtension:
    """Mixed into vLLM's worker (``worker_extension_cls``); called with ``collective_rpc``."""

    def contrast_take_records(self, keys: list[str]) -> dict[str, list[int]]:
        """The chosen layer of each output token of the requests recorded under ``keys``."""
        return exits.take_records(keys)
