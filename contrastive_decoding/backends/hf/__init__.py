"""The transformers backend: runs any strategy inside a ``transformers`` causal LM.

Readout (early exits), capture hooks, degraded streams with attention suppression, the amateur
stream, the context entropy, :class:`~.sources.ContrastSources` (the one place that turns a
strategy's declarations into hooks and :class:`~contrastive_decoding.ContrastInputs`), the logits
processor and generate loops, and scoring.
"""
