"""HaluEval QA (10000) as multiple choice: the right vs the hallucinated answer as continuations.

``halueval``: prompt "Knowledge: {knowledge}\\nQ: {question}\\nA:"; ``halueval-noknowledge``:
"Q: {question}\\nA:". Continuations " {answer}". Correct when the right answer scores strictly
higher (``acc``); ``acc_norm`` compares scores per byte of answer (lm-eval's normalisation), since
right answers are mostly much shorter than hallucinated ones. (HaluEval's own protocol asks a chat
model to judge; not used here.)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from contrastive_decoding.eval.benchmarks.base import Benchmark, EvalContext, Metric, layer_histogram
from contrastive_decoding.eval.data import DataSource, numbered, read_json_records, require_keys

__all__ = ["HALUEVAL", "HALUEVAL_NOKNOWLEDGE"]

_KEYS = ("knowledge", "question", "right_answer", "hallucinated_answer")
_HINT = "HaluEval qa_data.json (JSON lines with knowledge, question, right_answer, hallucinated_answer)"
SOURCE = DataSource(
    local="halueval/qa_data.json",
    hub="pminervini/HaluEval",
    hub_config="qa",
    hub_split="data",
    url="https://github.com/RUCAIBox/HaluEval (data/qa_data.json)",
)


def read_halueval(path: Path) -> list[dict[str, Any]]:
    """Items of qa_data.json."""
    return _items(read_json_records(path, _HINT), path)


def _items(records: list[Mapping[str, Any]], path: Any) -> list[dict[str, Any]]:
    for i, rec in enumerate(records):
        require_keys(rec, _KEYS, path, f"record {i + 1}", _HINT)
    return numbered({k: rec[k] for k in _KEYS} for rec in records)


def from_hub(rows: list[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return _items(rows, "Hub pminervini/HaluEval")


def _make_evaluate(with_knowledge: bool):
    def evaluate(ctx: EvalContext, items: list[dict]) -> list[dict]:
        records = []
        for item in items:
            prompt = f"Q: {item['question']}\nA:"
            if with_knowledge:
                prompt = f"Knowledge: {item['knowledge']}\n" + prompt
            answers = [" " + item["right_answer"], " " + item["hallucinated_answer"]]
            scores = ctx.score(prompt, answers)
            right, wrong = scores[0].total, scores[1].total
            # Right answers are mostly short phrases and hallucinated ones full sentences, so summed
            # scores largely compare lengths; acc_norm divides by the answer's UTF-8 length as
            # lm-eval's acc_norm does.
            per_byte = [s.total / len(a.encode("utf-8")) for s, a in zip(scores, answers, strict=True)]
            records.append(
                {
                    "id": item["id"],
                    "metrics": {"acc": float(right > wrong), "acc_norm": float(per_byte[0] > per_byte[1])},
                    "score_right": right,
                    "score_hallucinated": wrong,
                    "premature_layers": layer_histogram(scores),
                }
            )
        return records

    return evaluate


def _benchmark(name: str, with_knowledge: bool) -> Benchmark:
    prompt = ("'Knowledge: {knowledge}\\n' + " if with_knowledge else "") + "'Q: {question}\\nA:'"
    return Benchmark(
        name=name,
        description="HaluEval QA (10000): right vs hallucinated answer"
        + (", with knowledge" if with_knowledge else ", without knowledge"),
        task="score",
        source=SOURCE,
        read_file=read_halueval,
        from_hub=from_hub,
        evaluate=_make_evaluate(with_knowledge),
        metrics=(
            Metric("acc", description="the right answer scores higher than the hallucinated one"),
            Metric("acc_norm", description="the same with scores divided by the answer's length in bytes"),
        ),
        prompt=prompt + "; continuations ' {answer}'",
        default_protocol="paper",
    )


HALUEVAL = _benchmark("halueval", True)
HALUEVAL_NOKNOWLEDGE = _benchmark("halueval-noknowledge", False)
