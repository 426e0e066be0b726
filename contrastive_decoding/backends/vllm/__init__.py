"""The vLLM backend: the layer-exit strategies (DoLa, SLED, DeCo, VISTA, ACD and user strategies of
that kind) inside vLLM's engine and OpenAI-compatible server, as a plugin (no fork).

Install with ``pip install "contrastive-decoding[vllm]"``. The pieces:

* :mod:`.models`: ``Contrast<Architecture>`` model classes that publish the captured layers' states;
* :mod:`.plugin`: the ``vllm.general_plugins`` entry point registering them;
* :mod:`.processor`: the logits processor applying each request's strategy;
* :mod:`.selection`: how a request or the engine names a strategy (no vLLM import);
* :mod:`.llm`: ``LLM`` and ``engine_arguments``; :mod:`.serve`: the server command.
"""

__all__ = ["LLM", "engine_arguments", "request_args"]


def __getattr__(name: str):
    # Every name on first use: `contrastive-decoding serve --help` imports this package, not torch.
    if name == "request_args":
        from contrastive_decoding.backends.vllm.selection import request_args

        return request_args
    if name == "LLM":
        from contrastive_decoding.backends.vllm.llm import LLM

        return LLM
    if name == "engine_arguments":
        from contrastive_decoding.backends.vllm.engine import engine_arguments

        return engine_arguments
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
