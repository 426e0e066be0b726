"""Integrations with other evaluation tools.

:mod:`contrastive_decoding.integrations.lm_eval_model` holds the lm-evaluation-harness model
``contrastive`` (it imports ``lm_eval``, an optional extra: ``pip install
"contrastive-decoding[lm-eval]"``); :mod:`contrastive_decoding.lm_eval` is its command-line launcher.
"""
