"""Integrations with other evaluation tools.

:mod:`contrastive_decoding.integrations.lm_eval_model` holds the lm-evaluation-harness model
``contrastive`` (it imports ``lm_eval``, an optional extra: ``pip install
"contrastive-decoding[lm-eval]"``); :mod:`contrastive_decoding.lm_eval` is its command-line launcher.
"""

import importlib.util

__all__ = ["INSTALL_HINT", "lm_eval_available"]

INSTALL_HINT = (
    'lm-evaluation-harness is not installed: run `pip install "contrastive-decoding[lm-eval]"` '
    '(or `pip install "lm-eval>=0.4.13,<0.5"`).'
)


def lm_eval_available() -> bool:
    """Whether the ``lm_eval`` package (the ``[lm-eval]`` extra) is importable."""
    return importlib.util.find_spec("lm_eval") is not None
