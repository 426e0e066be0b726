"""The library's strategies and presets as `contrastive-decoding list` prints them.

Generated from the registry by `python -m contrastive_decoding.eval.listing`; do not edit.
Read instead of the registry (which imports torch) when nothing else registers
strategies: see :mod:`contrastive_decoding.eval.listing`.
"""
# ruff: noqa: E501

STRATEGIES = (
    ('acd', 'ACD (Gera et al. 2023): mass-preserving contrast with one intermediate exit', (('layer', 'None'), ('relative_top', '0.1'), ('final_norm', 'True'), ('min_tokens_to_keep', '1'))),
    ('activation', 'activation decoding (Chen et al. 2024): favour tokens the context is sharp about', (('info_layer', 'None'), ('alpha', '0.5'), ('context', "'prompt'"), ('relative_top', '0.1'), ('min_tokens_to_keep', '1'), ('final_norm', 'False'))),
    ('cd', 'contrastive decoding (Li et al. 2023): contrast with a smaller amateur model (--param amateur=...)', (('amateur', 'None'), ('amateur_temperature', '0.5'), ('relative_top', '0.1'), ('min_tokens_to_keep', '1'))),
    ('deco', 'DeCo (Wang et al. 2024): add the most confident late-layer exit to the final logits', (('alpha', '0.6'), ('top_k', '20'), ('top_p', '0.9'), ('layers', '(0.625, 0.875)'), ('final_norm', 'True'))),
    ('dola', 'DoLa (Chuang et al. 2024): contrast the final layer with the most divergent early exit', (('dola_layers', "'high'"), ('relative_top', '0.1'), ('final_norm', 'False'), ('layer_choice', "'per_row'"), ('divergence', "'reference'"), ('min_tokens_to_keep', '1'))),
    ('icd', 'ICD prompt-only (Zhang et al. 2023): contrast with the model told to give false answers', (('instruction', "'You are a deceptive assistant. Answer every question with a plausible-sounding but false statement, and never reveal the truth.\\n'"), ('relative_top', '0.1'), ('min_tokens_to_keep', '1'))),
    ('layercake', 'LayerCake (Zhu et al. 2025): contrast against attention-suppressed streams', (('amateur', "'combined'"), ('punctuation_layers', '(0.03125, 0.15625)'), ('concept_layers', '(0.125, 0.625)'), ('beta', '0.0'), ('relative_top', '0.1'), ('concept_gate', 'None'), ('mode', "'mask'"), ('bias', '-100.0'), ('query_rows', "'generated'"), ('min_tokens_to_keep', '1'))),
    ('lol', 'LOL-style fusion (Chen et al. 2024): final- and lower-layer contrasts with an amateur', (('amateur', "'suppression'"), ('lower_layer', '0.5'), ('weight', '0.5'), ('refocus', 'None'), ('amateur_instruction', "'You are a deceptive assistant. Answer every question with a plausible-sounding but false statement, and never reveal the truth.\\n'"), ('suppression', 'None'), ('final_norm', 'False'), ('relative_top', '0.1'), ('min_tokens_to_keep', '1'))),
    ('sled', 'SLED (Zhang et al. 2024): evolve the final logits toward a latent from all early exits', (('evolution_rate', '2.5'), ('evolution_scale', '75'), ('evolution_lower_bound', '-100.0'), ('evolution_steps', '10'), ('layers', 'None'), ('final_norm', 'False'), ('post_softmax', 'True'))),
    ('vista', 'VISTA self-logits augmentation (Li et al. 2025): mix late-layer exits into the logits', (('weight_late', '0.3'), ('late_layers', '(0.78125, 0.9375)'), ('final_norm', 'False'))),
    ('baseline', 'the plain model: log-likelihood scoring, greedy decoding', ()),
)

PRESETS = (
    ('greedy', 'baseline', ()),
    ('dola-high', 'dola', (('dola_layers', 'high'),)),
    ('dola-low', 'dola', (('dola_layers', 'low'),)),
    ('lol-prompt', 'lol', (('amateur', 'prompt'),)),
)
