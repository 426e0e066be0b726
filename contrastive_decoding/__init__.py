"""contrastive-decoding: layer-contrastive decoding for Hugging Face transformers models.

Strategies contrast what a model predicts at different depths of its own layer stack, at
generation time and with no training. See the README for the API and examples.
"""

from .amateur import Amateur
from .capture import LayerCapture
from .context_entropy import ContextEntropy, EntropySource
from .divergence import layer_divergence
from .generation import contrast_generate, dola_generate, strategy_generate
from .layer_map import LayerMap, layer_map, plot_layer_map
from .loading import DEFAULT_MODEL, embedded_model_file, load_model
from .plausibility import plausible_mask
from .processor import ContrastLogitsProcessor, LayerContrastLogitsProcessor, StreamContrastLogitsProcessor
from .prompt_cache import PromptCache
from .readout import TESTED_MODEL_TYPES, LayerReadout, UnsupportedModelError
from .scoring import ContinuationScore, score_continuations
from .sources import ContrastSources
from .strategies.acd import AutoContrastive, AutoContrastiveLogitsProcessor
from .strategies.activation import ActivationDecoding
from .strategies.amateur_cd import ContrastiveDecoding
from .strategies.base import (
    ContrastInputs,
    ContrastOutput,
    ContrastStrategy,
    LayerContrastStrategy,
    RelativeFloor,
    StreamContrastStrategy,
)
from .strategies.compose import WeightedContrast
from .strategies.deco import DeCo, DeCoLogitsProcessor
from .strategies.dola import DoLa, DoLaLogitsProcessor, dola_candidate_layers
from .strategies.icd import InducedContrast
from .strategies.layercake import LayerCake, LayerCakeLogitsProcessor, layercake_generate
from .strategies.lol import LowerLayerFusion
from .strategies.sled import SLED, SLEDLogitsProcessor
from .strategies.vista import VistaLogits, VistaLogitsProcessor
from .streams import StreamBatch, StreamRunner
from .suppression import AttentionSuppression, SuppressionRule, resolve_layers
from .token_classes import TOKEN_CLASSES, TokenClassifier

__version__ = "0.1.0"

__all__ = [
    "ActivationDecoding",
    "ContextEntropy",
    "PromptCache",
    "EntropySource",
    "ContrastiveDecoding",
    "InducedContrast",
    "LowerLayerFusion",
    "WeightedContrast",
    "Amateur",
    "ContrastInputs",
    "ContrastLogitsProcessor",
    "ContrastSources",
    "ContrastStrategy",
    "RelativeFloor",
    "AttentionSuppression",
    "AutoContrastive",
    "AutoContrastiveLogitsProcessor",
    "DeCo",
    "DeCoLogitsProcessor",
    "SLED",
    "SLEDLogitsProcessor",
    "VistaLogits",
    "VistaLogitsProcessor",
    "DEFAULT_MODEL",
    "LayerCake",
    "LayerCakeLogitsProcessor",
    "StreamBatch",
    "StreamContrastLogitsProcessor",
    "StreamContrastStrategy",
    "StreamRunner",
    "SuppressionRule",
    "TOKEN_CLASSES",
    "TokenClassifier",
    "layercake_generate",
    "resolve_layers",
    "TESTED_MODEL_TYPES",
    "ContinuationScore",
    "ContrastOutput",
    "DoLa",
    "DoLaLogitsProcessor",
    "LayerCapture",
    "LayerContrastLogitsProcessor",
    "LayerContrastStrategy",
    "LayerReadout",
    "UnsupportedModelError",
    "contrast_generate",
    "dola_candidate_layers",
    "dola_generate",
    "embedded_model_file",
    "layer_divergence",
    "LayerMap",
    "layer_map",
    "plot_layer_map",
    "load_model",
    "plausible_mask",
    "score_continuations",
    "strategy_generate",
]
