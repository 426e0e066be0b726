"""contrastive-decoding: layer-contrastive decoding for Hugging Face transformers models.

Strategies contrast what a model predicts at different depths of its own layer stack, at
generation time and with no training. See the README for the API and examples.

The package layers are: :mod:`~contrastive_decoding.core` (the strategy contract and registry,
torch only) <- :mod:`~contrastive_decoding.strategies` (one file each) <-
:mod:`~contrastive_decoding.backends` (transformers) <- the harness and integrations. Names are
imported on first use, so ``import contrastive_decoding`` (and the CLI's ``--help``) stays fast.
"""

from __future__ import annotations

from contrastive_decoding._lazy import lazy_exports

__version__ = "0.1.0"

_CORE = "contrastive_decoding.core"
_HF = "contrastive_decoding.backends.hf"
_S = "contrastive_decoding.strategies"

# Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(
        [
            "ContrastInputs",
            "ContrastOutput",
            "ContrastStrategy",
            "LayerContrastStrategy",
            "ModelLayout",
            "RelativeFloor",
            "StreamContrastStrategy",
        ],
        _CORE,
    ),
    # Through the strategies package, which registers the library's own first.
    **dict.fromkeys(
        [
            "get_strategy",
            "make_strategy",
            "register_strategy",
            "registered_strategies",
            "unregister_strategy",
        ],
        _S,
    ),
    "Amateur": f"{_CORE}.specs",
    "EntropySource": f"{_CORE}.specs",
    "SuppressionRule": f"{_CORE}.specs",
    "resolve_layers": f"{_CORE}.specs",
    "plausible_mask": f"{_CORE}.plausibility",
    "layer_divergence": f"{_CORE}.divergence",
    "TOKEN_CLASSES": f"{_CORE}.token_classes",
    "TokenClassifier": f"{_CORE}.token_classes",
    "AutoContrastive": f"{_S}.acd",
    "ActivationDecoding": f"{_S}.activation",
    "ContrastiveDecoding": f"{_S}.amateur_cd",
    "WeightedContrast": f"{_S}.compose",
    "DeCo": f"{_S}.deco",
    "DoLa": f"{_S}.dola",
    "dola_candidate_layers": f"{_S}.dola",
    "InducedContrast": f"{_S}.icd",
    "LayerCake": f"{_S}.layercake",
    "LowerLayerFusion": f"{_S}.lol",
    "SLED": f"{_S}.sled",
    "VistaLogits": f"{_S}.vista",
    "ContextEntropy": f"{_HF}.context_entropy",
    "LayerCapture": f"{_HF}.capture",
    "contrast_generate": f"{_HF}.generation",
    "strategy_generate": f"{_HF}.generation",
    "DEFAULT_MODEL": f"{_HF}.loading",
    "embedded_model_file": f"{_HF}.loading",
    "load_model": f"{_HF}.loading",
    "ContrastLogitsProcessor": f"{_HF}.processor",
    "LayerContrastLogitsProcessor": f"{_HF}.processor",
    "StreamContrastLogitsProcessor": f"{_HF}.processor",
    "PromptCache": f"{_HF}.prompt_cache",
    "TESTED_MODEL_TYPES": f"{_HF}.readout",
    "LayerReadout": f"{_HF}.readout",
    "UnsupportedModelError": f"{_HF}.readout",
    "ContinuationScore": f"{_HF}.scoring",
    "score_continuations": f"{_HF}.scoring",
    "score_token_continuations": f"{_HF}.scoring",
    "ContrastSources": f"{_HF}.sources",
    "StreamBatch": f"{_HF}.streams",
    "StreamRunner": f"{_HF}.streams",
    "AttentionSuppression": f"{_HF}.suppression",
    "generate_function": f"{_HF}.frontends",
    "logits_processor_class": f"{_HF}.frontends",
    "AutoContrastiveLogitsProcessor": f"{_HF}.named",
    "DeCoLogitsProcessor": f"{_HF}.named",
    "DoLaLogitsProcessor": f"{_HF}.named",
    "LayerCakeLogitsProcessor": f"{_HF}.named",
    "SLEDLogitsProcessor": f"{_HF}.named",
    "VistaLogitsProcessor": f"{_HF}.named",
    "dola_generate": f"{_HF}.named",
    "layercake_generate": f"{_HF}.named",
    "LayerMap": "contrastive_decoding.layer_map",
    "layer_map": "contrastive_decoding.layer_map",
    "plot_layer_map": "contrastive_decoding.layer_map",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(globals(), _EXPORTS, __all__)
