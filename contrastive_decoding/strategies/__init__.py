"""The library's strategies, one file each; importing this package registers every one of them.

Each module defines one :class:`~contrastive_decoding.ContrastStrategy` subclass and registers it
with :func:`~contrastive_decoding.register_strategy`; this package imports them all (no list to
keep: a new file here is a new strategy) and re-exports the registry, so that a lookup by name
through it sees the library's strategies and any registered since.

Strategies defined elsewhere register the same way when their module is imported; so that a new
process (the CLI, lm-eval, a worker) knows them by name, it also imports the modules of installed
packages' ``contrastive_decoding.strategies`` entry points and those named in the environment
variable ``CONTRASTIVE_DECODING_STRATEGIES`` (module names or ``.py`` files, separated by commas).
"""

import importlib
import os
import pkgutil
from importlib.metadata import entry_points

from contrastive_decoding.core.registry import (
    StrategyInfo,
    as_strategy,
    get_strategy,
    load_strategy_modules,
    make_strategy,
    presets,
    register_strategy,
    registered_strategies,
    resolve_strategy,
    unregister_strategy,
)

__all__ = [  # the registry's own names
    "StrategyInfo",
    "as_strategy",
    "get_strategy",
    "load_strategy_modules",
    "make_strategy",
    "presets",
    "register_strategy",
    "registered_strategies",
    "resolve_strategy",
    "unregister_strategy",
]

ENVIRONMENT_VARIABLE = "CONTRASTIVE_DECODING_STRATEGIES"

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
for _plugin in entry_points(group="contrastive_decoding.strategies"):
    _plugin.load()
load_strategy_modules(os.environ.get(ENVIRONMENT_VARIABLE, "").split(","))
