"""The backend-free core: the strategy contract, its declared inputs, the math every strategy shares
and the strategy registry. It imports torch only, never transformers or vLLM (a test checks it), so
that any backend can run the same strategies.
"""

from contrastive_decoding.core.compat import LayerContrastStrategy, StreamContrastStrategy
from contrastive_decoding.core.contract import (
    ContrastInputs,
    ContrastOutput,
    ContrastStrategy,
    LayerExits,
    ModelLayout,
    check_vocabulary,
    declared_parameters,
)
from contrastive_decoding.core.protocols import (
    SCORING_PROTOCOLS,
    Floor,
    RelativeFloor,
    ScoringProtocol,
    floored,
    protocol_token_scores,
)
from contrastive_decoding.core.registry import (
    Parameter,
    StrategyInfo,
    get_strategy,
    make_strategy,
    presets,
    register_strategy,
    registered_strategies,
    resolve_strategy,
    unregister_strategy,
)
from contrastive_decoding.core.specs import (
    Amateur,
    EntropySource,
    SuppressionRule,
    check_layer_indices,
    resolve_layers,
)

__all__ = [
    "Amateur",
    "ContrastInputs",
    "ContrastOutput",
    "ContrastStrategy",
    "EntropySource",
    "Floor",
    "LayerContrastStrategy",
    "LayerExits",
    "ModelLayout",
    "Parameter",
    "RelativeFloor",
    "SCORING_PROTOCOLS",
    "ScoringProtocol",
    "StrategyInfo",
    "StreamContrastStrategy",
    "SuppressionRule",
    "check_layer_indices",
    "check_vocabulary",
    "declared_parameters",
    "floored",
    "get_strategy",
    "make_strategy",
    "presets",
    "protocol_token_scores",
    "register_strategy",
    "registered_strategies",
    "resolve_layers",
    "resolve_strategy",
    "unregister_strategy",
]
