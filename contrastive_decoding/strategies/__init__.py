"""Layer-contrast strategies: one file each, all subclasses of :class:`LayerContrastStrategy`."""

from .base import ContrastOutput, LayerContrastStrategy
from .dola import DoLa, DoLaLogitsProcessor

__all__ = ["ContrastOutput", "DoLa", "DoLaLogitsProcessor", "LayerContrastStrategy"]
