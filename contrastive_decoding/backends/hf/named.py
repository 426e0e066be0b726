"""The library's named transformers front-ends, each derived from its strategy's declaration.

``DoLaLogitsProcessor(model, dola_layers="high")`` is ``ContrastLogitsProcessor(model,
DoLa(dola_layers="high"))``; ``dola_generate`` is the ``custom_generate`` loop taking DoLa's
parameters. Nothing here restates an argument list.
"""

from __future__ import annotations

from contrastive_decoding.backends.hf.frontends import generate_function, logits_processor_class
from contrastive_decoding.strategies.acd import AutoContrastive
from contrastive_decoding.strategies.deco import DeCo
from contrastive_decoding.strategies.dola import DoLa
from contrastive_decoding.strategies.layercake import LayerCake
from contrastive_decoding.strategies.sled import SLED
from contrastive_decoding.strategies.vista import VistaLogits

__all__ = [
    "AutoContrastiveLogitsProcessor",
    "DeCoLogitsProcessor",
    "DoLaLogitsProcessor",
    "LayerCakeLogitsProcessor",
    "SLEDLogitsProcessor",
    "VistaLogitsProcessor",
    "dola_generate",
    "layercake_generate",
]

_HERE = __name__

DoLaLogitsProcessor = logits_processor_class(DoLa, module=_HERE)
LayerCakeLogitsProcessor = logits_processor_class(LayerCake, classifier_first=True, module=_HERE)
SLEDLogitsProcessor = logits_processor_class(SLED, module=_HERE)
VistaLogitsProcessor = logits_processor_class(VistaLogits, "VistaLogitsProcessor", module=_HERE)
DeCoLogitsProcessor = logits_processor_class(DeCo, module=_HERE)
AutoContrastiveLogitsProcessor = logits_processor_class(AutoContrastive, module=_HERE)

dola_generate = generate_function(DoLa, "dola_generate", module=_HERE)
layercake_generate = generate_function(LayerCake, "layercake_generate", module=_HERE)
