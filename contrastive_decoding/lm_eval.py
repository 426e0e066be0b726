"""Run lm-evaluation-harness with this library's strategies: the ``contrastive`` lm-eval model.

lm-eval 0.4.x resolves ``--model NAME`` only from its own registry (no plugin discovery), so this
launcher imports the model (which registers ``contrastive``) and then hands every argument,
unchanged, to lm-eval's own command line::

    contrastive-decoding lm-eval --model contrastive \\
        --model_args pretrained=smollm2,strategy=dola-high,dtype=float32 --tasks truthfulqa_mc2
    accelerate launch -m contrastive_decoding.lm_eval --model contrastive ...   # data parallel

In Python, import :class:`ContrastiveLM` from here (``lm_eval`` is an optional extra:
``pip install "contrastive-decoding[lm-eval]"``; this module imports without it and only the
model needs it).
"""

from __future__ import annotations

import importlib.util
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .integrations.lm_eval_model import ContrastiveLM

__all__ = ["ContrastiveLM", "INSTALL_HINT", "main"]

INSTALL_HINT = (
    'lm-evaluation-harness is not installed: run `pip install "contrastive-decoding[lm-eval]"` '
    '(or `pip install "lm-eval>=0.4.13,<0.5"`).'
)


def lm_eval_available() -> bool:
    """Whether the ``lm_eval`` package (the ``[lm-eval]`` extra) is importable."""
    return importlib.util.find_spec("lm_eval") is not None


def __getattr__(name: str) -> Any:
    if name == "ContrastiveLM":
        if not lm_eval_available():
            raise ImportError(INSTALL_HINT)
        from .integrations.lm_eval_model import ContrastiveLM

        return ContrastiveLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main(argv: list[str] | None = None) -> int:
    """Register the ``contrastive`` model, then run lm-eval's own CLI with ``argv`` unchanged.

    Args:
        argv: lm-eval's arguments (default: ``sys.argv[1:]``), e.g. ``["--model", "contrastive",
            "--model_args", "pretrained=smollm2,strategy=dola-high", "--tasks", "truthfulqa_mc2"]``.

    Returns:
        The exit status: 0, 2 when lm-eval is not installed, or lm-eval's own exit status.

    Example:
        >>> from contrastive_decoding.lm_eval import main
        >>> main(["--help"])  # doctest: +SKIP
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not lm_eval_available():
        print(f"error: {INSTALL_HINT}", file=sys.stderr)
        return 2
    from lm_eval.__main__ import cli_evaluate

    from .integrations import lm_eval_model  # noqa: F401 - registers the `contrastive` model

    saved = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    except SystemExit as exc:  # argparse's --help and usage errors
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
