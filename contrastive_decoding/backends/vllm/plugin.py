"""vLLM's ``general_plugins`` entry point: register the ``Contrast<Architecture>`` model classes.

vLLM calls :func:`register` in every process it starts (the frontend, the engine core, each worker),
so the classes resolve wherever the model is built; registering only in the user's process is not
enough once vLLM spawns its workers. The classes are registered by name and imported lazily.
"""

from __future__ import annotations

__all__ = ["register"]


def register() -> None:
    from vllm import ModelRegistry

    from contrastive_decoding.backends.vllm.models import PREFIX, SUPPORTED_ARCHITECTURES

    known = ModelRegistry.get_supported_archs()
    for architecture in SUPPORTED_ARCHITECTURES:
        name = PREFIX + architecture
        if architecture in known and name not in known:
            ModelRegistry.register_model(name, f"contrastive_decoding.backends.vllm.models:{name}")
