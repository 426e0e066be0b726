"""TruthfulQA generation (817 questions): greedy answers scored by BLEU and ROUGE as lm-eval does.

- ``tfqa-gen`` (DoLa authors' ``tfqa_eval.py``): primer with instruction line + "Q: {question}\\nA:",
  at most 50 new tokens, stop at "Q:", answer stripped.
- ``tfqa-gen-lmeval`` (lm-eval ``truthfulqa_gen``): the six Q/A pairs without instruction line +
  "\\n\\nQ: {question}" (lm-eval's prompt ends at the question), at most 256 new tokens, stop at
  "\\n\\n", answer kept as generated.

Metrics (lm-eval ``process_results_gen``): BLEU (sacrebleu, exp smoothing) and ROUGE-1/2/L, each
``max`` over true references ("I have no comment." added), ``diff`` = max true - max false,
``acc`` = max true > max false. With a judge model: %true, %info, %true*info.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from contrastive_decoding.eval.benchmarks.base import Benchmark, EvalContext, Metric
from contrastive_decoding.eval.benchmarks.truthfulqa_mc import CSV_SOURCE, csv_from_hub, read_csv
from contrastive_decoding.eval.metrics import SIMILARITY_METRICS, similarity_metrics
from contrastive_decoding.eval.prompts import (
    TRUTHFULQA_PRIMER_SOURCE,
    TRUTHFULQA_QA_PAIRS,
    TRUTHFULQA_QA_PAIRS_SOURCE,
)

from contrastive_decoding.prompts import TRUTHFULQA_PRIMER

__all__ = ["TFQA_GEN", "TFQA_GEN_LMEVAL", "reference_answers"]

NO_COMMENT = "I have no comment."


def reference_answers(item: dict[str, Any]) -> tuple[list[str], list[str]]:
    """True references (with "I have no comment." added, as lm-eval does) and false ones."""
    true = list(item["true"])
    if NO_COMMENT not in true:
        true.append(NO_COMMENT)
    return true, list(item["false"])


def _dola_prompt(question: str) -> str:
    from contrastive_decoding.prompts import truthfulqa_prompt

    return truthfulqa_prompt(question)


def _lmeval_prompt(question: str) -> str:
    # lm-eval: prompt_qa (pairs without the final blank line) + "\n\nQ: " + question.
    return TRUTHFULQA_QA_PAIRS + "Q: " + question.strip()


def _make_evaluate(prompt_fn, primer: str, max_new_tokens: int, stop: tuple[str, ...], strip: bool):
    def evaluate(ctx: EvalContext, items: list[dict]) -> list[dict]:
        prompts = [prompt_fn(it["question"]) for it in items]
        outputs = ctx.generate(prompts, max_new_tokens, stop, primer=primer)
        records = []
        for item, gen in zip(items, outputs, strict=True):
            answer = gen.text.strip() if strip else gen.text
            true, false = reference_answers(item)
            metrics = similarity_metrics(answer, true, false)
            record = {"id": item["id"], "answer": answer, "n_tokens": gen.n_tokens}
            if ctx.judge is not None:
                rating = ctx.judge.rate(item["question"], answer)
                metrics.update({k: rating[k] for k in ("true", "info", "true_info")})
                record["judge"] = {"p_true": rating["p_true"], "p_info": rating["p_info"]}
            record["metrics"] = metrics
            record["premature_layers"] = gen.layer_counts
            records.append(record)
        return records

    return evaluate


_SIMILARITY = tuple(
    Metric(name, scale=100.0 if name.endswith("_acc") else 1.0, description=f"lm-eval truthfulqa_gen {name}")
    for name in SIMILARITY_METRICS
)
_JUDGE = (
    Metric("true", description="judge: the answer is true"),
    Metric("info", description="judge: the answer is informative"),
    Metric("true_info", description="judge: true and informative"),
)


def _read(path: Path) -> list[dict[str, Any]]:
    return read_csv(path)


TFQA_GEN = Benchmark(
    name="tfqa-gen",
    description="TruthfulQA generation, DoLa prompt (50 tokens, stop 'Q:'), BLEU/ROUGE as lm-eval",
    task="generate",
    source=CSV_SOURCE,
    read_file=_read,
    from_hub=csv_from_hub,
    evaluate=_make_evaluate(_dola_prompt, TRUTHFULQA_PRIMER, 50, ("Q:",), strip=True),
    metrics=_SIMILARITY,
    optional_metrics=_JUDGE,
    prompt=f"{TRUTHFULQA_PRIMER_SOURCE} + 'Q: {{question}}\\nA:'",
    default_protocol=None,
    batch_size=8,
    max_new_tokens=50,
    stop=("Q:",),
)

TFQA_GEN_LMEVAL = Benchmark(
    name="tfqa-gen-lmeval",
    description="TruthfulQA generation, lm-eval prompt (256 tokens, stop blank line), BLEU/ROUGE",
    task="generate",
    source=CSV_SOURCE,
    read_file=_read,
    from_hub=csv_from_hub,
    evaluate=_make_evaluate(_lmeval_prompt, TRUTHFULQA_QA_PAIRS, 256, ("\n\n",), strip=False),
    metrics=_SIMILARITY,
    optional_metrics=_JUDGE,
    prompt=f"{TRUTHFULQA_QA_PAIRS_SOURCE} + 'Q: {{question}}' (lm-eval truthfulqa_gen.yaml)",
    default_protocol=None,
    batch_size=8,
    max_new_tokens=256,
    stop=("\n\n",),
)
