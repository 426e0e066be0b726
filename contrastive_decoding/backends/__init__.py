"""Backends: where strategies run. ``hf`` runs them inside transformers models."""
