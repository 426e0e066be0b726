"""Run lm-evaluation-harness with this library's strategies: the ``contrastive`` lm-eval model.

lm-eval 0.4.x resolves ``--model NAME`` only from its own registry (no plugin discovery), so this
launcher imports the model (which registers ``contrastive``) and then hands every argument,
unchanged, to lm-eval's own command line::

    contrastive-decoding lm-eval --model contrastive \\
        --model_args pretrained=smollm2,strategy=dola-high,dtype=float32 --tasks truthfulqa_mc2
    accelerate launch -m contrastive_decoding.lm_eval --model contrastive ...   # data parallel

``--tasks truthfulqa_mc2_stable`` is lm-eval's mc2 computed without ``exp`` overflow (contrast
scores make lm-eval's own mc2 NaN); without ``--include_path`` the launcher writes it to a temporary
folder itself (see :mod:`contrastive_decoding.integrations.lm_eval_tasks`).

In Python, import :class:`ContrastiveLM` from here (``lm_eval`` is an optional extra:
``pip install "contrastive-decoding[lm-eval]"``; this module imports without it and only the
model needs it).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contrastive_decoding.integrations import INSTALL_HINT, lm_eval_available

if TYPE_CHECKING:
    from contrastive_decoding.integrations.lm_eval_model import ContrastiveLM

__all__ = ["ContrastiveLM", "INSTALL_HINT", "main"]

def __getattr__(name: str) -> Any:
    if name == "ContrastiveLM":
        if not lm_eval_available():
            raise ImportError(INSTALL_HINT)
        from contrastive_decoding.integrations.lm_eval_model import ContrastiveLM

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

    from contrastive_decoding.integrations import lm_eval_model  # noqa: F401 - registers the `contrastive` model
    from contrastive_decoding.integrations.lm_eval_tasks import STABLE_MC2_TASK, write_stable_mc2_task

    problem = _argument_problem(args)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="contrastive-tasks-") as tasks:
        include = _option(args, "--include_path")
        if STABLE_MC2_TASK in _named_tasks(args):
            if include is None:
                write_stable_mc2_task(tasks)
                args += ["--include_path", tasks]
            elif not _defines_task(Path(include), STABLE_MC2_TASK):
                print(
                    f"error: --tasks names {STABLE_MC2_TASK} but it is not in --include_path "
                    f"{include}; write it there once with `contrastive-decoding lm-eval-tasks "
                    f"{include}` (add --data FILE for a local TruthfulQA copy).",
                    file=sys.stderr,
                )
                return 2
        saved = sys.argv
        sys.argv = ["lm-eval", *args]
        try:
            cli_evaluate()
        except SystemExit as exc:  # argparse's --help and usage errors
            code = exc.code
            return code if isinstance(code, int) else (0 if code is None else 1)
        except ValueError as exc:
            # The model's argument errors (some need the loaded model) and lm-eval's unknown tasks
            # are the user's input: one line, not a traceback. Anything else is a bug: re-raised.
            if not str(exc).startswith(_ONE_LINE_ERRORS):
                raise
            print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
        finally:
            sys.argv = saved
    return 0


_ONE_LINE_ERRORS = ("--model_args", "Tasks not found")


def _argument_problem(args: list[str]) -> str | None:
    """What is wrong with lm-eval's arguments that can be told before anything loads (``None``:
    nothing): ``--limit`` and, for ``--model contrastive``, the model arguments."""
    limit = _option(args, "--limit")
    if limit is not None:
        try:
            bad = not float(limit) > 0
        except ValueError:
            bad = True
        if bad:
            return f"--limit {limit}: give a positive number of samples per task (or a fraction in (0, 1))."
    if _option(args, "--model") != "contrastive":
        return None
    from lm_eval.utils import simple_parse_args_string

    from contrastive_decoding.integrations.lm_eval_model import check_model_args

    try:
        check_model_args(simple_parse_args_string(_option(args, "--model_args") or ""))
    except ValueError as exc:
        return " ".join(str(exc).split())
    return None


def _option(args: list[str], flag: str) -> str | None:
    """The value given to ``flag`` (``--flag V`` or ``--flag=V``), the last one if repeated."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg[len(flag) + 1 :]
    return value


def _defines_task(folder: Path, task: str) -> bool:
    """Whether a YAML file in ``folder`` or below (as lm-eval searches it) declares ``task``."""
    for yaml in folder.glob("**/*.yaml"):
        try:
            lines = yaml.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            continue
        if any(line.split("#", 1)[0].strip() == f"task: {task}" for line in lines):
            return True
    return False


def _named_tasks(args: list[str]) -> set[str]:
    """Task names after ``--tasks`` (comma- or space-separated, or ``--tasks=a,b``)."""
    names: list[str] = []
    for i, arg in enumerate(args):
        if arg.startswith("--tasks="):
            names += arg[len("--tasks=") :].split(",")
        elif arg == "--tasks":
            for value in args[i + 1 :]:
                if value.startswith("-"):
                    break
                names += value.split(",")
    return {name.strip() for name in names if name.strip()}


if __name__ == "__main__":
    sys.exit(main())
