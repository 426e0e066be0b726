"""``truthfulqa_mc2_stable``: lm-eval's TruthfulQA mc2 task with its metric computed without overflow.

lm-eval's ``truthfulqa_mc2`` turns each choice's log-likelihood into ``exp(ll)`` and normalises.
Contrast scores are sums of log-ratios, often hundreds of nats: ``exp`` overflows to ``inf`` and
mc2 becomes ``NaN`` (``normalized`` sums with -1000 floors underflow to ``0 / 0`` the same way).
This task is lm-eval's own (its prompt, data, choices and ``labels == 1`` rule: it includes the
installed task's YAML) with one change: each question's log-likelihoods are shifted by their maximum
before ``exp``. Where lm-eval's value is finite the two agree to rounding; where it is ``NaN`` this
one is the true probability mass of the true answers, as this project's ``tfqa-hf`` benchmark
computes it.

The task lives in a folder of two files: the YAML and a one-line module that ``!function`` loads
from beside it. ``contrastive-decoding lm-eval`` writes it to a temporary folder by itself when
``--tasks`` names the task and no ``--include_path`` is given; otherwise write it into your task
folder once with ``contrastive-decoding lm-eval-tasks DIR`` (``--data FILE`` for a local copy of
TruthfulQA's ``multiple_choice`` split, as offline runs need).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from contrastive_decoding.eval.metrics import tfqa_mc_hf

__all__ = ["STABLE_MC2_TASK", "check_mc_data", "process_results_mc2", "write_stable_mc2_task"]

STABLE_MC2_TASK = "truthfulqa_mc2_stable"
_SHIM = "contrastive_mc2"


def process_results_mc2(doc: dict[str, Any], results: Sequence[tuple[float, bool]]) -> dict[str, float]:
    """lm-eval's ``process_results_mc2`` with ``exp`` taken after subtracting the maximum.

    Args:
        doc: the TruthfulQA ``multiple_choice`` record (its ``mc2_targets.labels`` are used).
        results: one ``(log-likelihood, is_greedy)`` per mc2 choice, in the record's order.

    Returns:
        ``{"acc": mass}``: the normalised probability of the choices labelled 1.

    Raises:
        ValueError: a log-likelihood is NaN or infinite (no mass can be computed from it), naming
            the question; or the number of results differs from the number of labels.

    Example:
        >>> doc = {"question": "Q?", "mc2_targets": {"labels": [1, 0]}}
        >>> round(process_results_mc2(doc, [(800.0, True), (790.0, False)])["acc"], 6)
        0.999955
    """
    labels = list(doc["mc2_targets"]["labels"])
    lls = [float(ll) for ll, _ in results]
    if len(lls) != len(labels):
        raise ValueError(
            f"{STABLE_MC2_TASK}: {len(lls)} log-likelihoods for {len(labels)} mc2 labels "
            f"(question {doc.get('question')!r})."
        )
    if not all(math.isfinite(ll) for ll in lls):
        raise ValueError(
            f"{STABLE_MC2_TASK}: question {doc.get('question')!r} has non-finite log-likelihoods "
            f"{lls}; no probability mass can be computed from them."
        )
    return {"acc": tfqa_mc_hf(lls[:1], lls, labels)["mc2"]}


def _installed_mc2_yaml() -> Path:
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / "truthfulqa" / "truthfulqa_mc2.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"lm-eval's TruthfulQA mc2 task was not found at {path}; this lm-eval release is not "
            'supported: install `pip install "contrastive-decoding[lm-eval]"`.'
        )
    return path


_MC_LAYOUT = (
    "give TruthfulQA's multiple_choice validation split (the Hub's truthfulqa/truthful_qa, config "
    "multiple_choice) as JSON lines, one {\"question\", \"mc2_targets\": {\"choices\", \"labels\"}} per line"
)


def _mc_record_problem(record: Any) -> str | None:
    """What keeps one record from being a TruthfulQA ``multiple_choice`` row (``None``: nothing)."""
    if not isinstance(record, dict):
        return f"is a JSON {type(record).__name__}, not an object"
    if not isinstance(record.get("question"), str):
        keys = ", ".join(list(record)[:6]) or "none"
        return f"has no text field 'question' (its keys: {keys})"
    targets = record.get("mc2_targets")
    if not isinstance(targets, dict) or "choices" not in targets or "labels" not in targets:
        return "has no mc2_targets with 'choices' and 'labels' lists"
    choices, labels = targets["choices"], targets["labels"]
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices) or not choices:
        return "has mc2_targets.choices that is not a list of answer texts"
    if not isinstance(labels, list) or any(isinstance(v, bool) or v not in (0, 1) for v in labels):
        return "has mc2_targets.labels that is not a list of 0/1"
    if len(labels) != len(choices):
        return f"has {len(choices)} mc2_targets.choices but {len(labels)} labels"
    if 1 not in labels:
        return "has no mc2 choice labelled 1 (true)"
    return None


def check_mc_data(data_file: str | os.PathLike) -> int:
    """Check that ``data_file`` holds TruthfulQA ``multiple_choice`` rows as JSON lines (each with
    ``question`` and ``mc2_targets.choices``/``labels``: the fields the task's prompt and choices
    read), before a task names it; lm-eval would otherwise fail at run time inside its templates.

    Returns:
        The number of rows.

    Raises:
        FileNotFoundError: ``data_file`` is not a file.
        ValueError: an empty file, a line that is not JSON, a row without those fields, or one JSON
            array instead of JSON lines; naming the line and the layout expected.
    """
    path = Path(data_file)
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} is not a file; {_MC_LAYOUT}.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"is not UTF-8 text; {_MC_LAYOUT}.") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise ValueError(f"is empty; {_MC_LAYOUT}.")
    if lines[0][1].lstrip().startswith("["):  # one JSON array: check its first row, then the layout
        try:
            rows = json.loads(text)
        except json.JSONDecodeError:
            rows = None
        first = rows[0] if isinstance(rows, list) and rows else None
        problem = _mc_record_problem(first) if first is not None else "is not JSON"
        if problem:
            raise ValueError(f"its first record {problem}; {_MC_LAYOUT}.")
        raise ValueError(f"is one JSON array, not JSON lines; {_MC_LAYOUT}.")
    for number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"line {number} is not JSON; {_MC_LAYOUT}.") from None
        problem = _mc_record_problem(record)
        if problem:
            raise ValueError(f"line {number} {problem}; {_MC_LAYOUT}.")
    return len(lines)


def write_stable_mc2_task(folder: str | os.PathLike, data_file: str | os.PathLike | None = None) -> Path:
    """Write the ``truthfulqa_mc2_stable`` task into ``folder`` (created if needed).

    Args:
        folder: a task folder for lm-eval's ``--include_path``.
        data_file: a local JSON-lines copy of TruthfulQA's ``multiple_choice`` validation split;
            ``None`` reads lm-eval's default dataset from the Hub.

    Returns:
        The YAML file written.

    Raises:
        FileNotFoundError: ``data_file`` is not a file, or lm-eval's mc2 task is not installed.
        ValueError: ``data_file`` does not hold TruthfulQA ``multiple_choice`` rows as JSON lines
            (see :func:`check_mc_data`); nothing is written.
        NotADirectoryError: ``folder`` exists and is not a folder.
    """
    folder = Path(folder)
    lines = [
        f"include: {_installed_mc2_yaml()}",
        f"task: {STABLE_MC2_TASK}",
        "tag: []",  # not part of lm-eval's `truthfulqa` tag, which would then run it twice
        f"process_results: !function {_SHIM}.process_results_mc2",
    ]
    if data_file is not None:
        data_file = Path(data_file).resolve()
        if not data_file.is_file():
            raise FileNotFoundError(
                f"`data_file` {str(data_file)!r} is not a file; give TruthfulQA's multiple_choice "
                "validation split as JSON lines."
            )
        check_mc_data(data_file)
        lines += [
            "dataset_path: json",
            "dataset_name: null",
            "dataset_kwargs:",
            "  data_files:",
            f"    validation: {data_file}",
        ]
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"`folder` {str(folder)!r} is a file; give a folder for lm-eval's tasks.")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{_SHIM}.py").write_text(
        "from contrastive_decoding.integrations.lm_eval_tasks import process_results_mc2  # noqa: F401\n",
        encoding="utf-8",
    )
    yaml = folder / f"{STABLE_MC2_TASK}.yaml"
    yaml.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return yaml
