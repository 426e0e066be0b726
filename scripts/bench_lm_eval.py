"""Time lm-eval (``contrastive`` model) against this project's harness on the same model and items.

For each strategy, in one process and on one loaded model: this project's ``tfqa-hf`` benchmark
(``EvalContext`` + the benchmark's ``evaluate``, mc1 and mc2 choices of a question scored in one
call) and lm-eval's ``truthfulqa_mc1`` + ``truthfulqa_mc2`` tasks through :class:`ContrastiveLM`
(local task files pointing at the same JSON-lines file), on the first ``--limit`` questions.
Reports both metric pairs, both wall times and their ratio; ``--hf`` also times lm-eval's own
``hf`` model for the plain model; ``--stable-mc2`` also runs ``truthfulqa_mc2_stable`` (lm-eval's
mc2 computed without ``exp`` overflow; its requests run again, so lm-eval's time then includes it).

Example::

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python scripts/bench_lm_eval.py --limit 100 \\
        --strategies none dola-high layercake --out results/lm-eval/bench.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import lm_eval  # noqa: E402
import numpy as np  # noqa: E402
from contrastive_decoding.eval.benchmarks import BENCHMARKS  # noqa: E402
from contrastive_decoding.eval.benchmarks.base import EvalContext  # noqa: E402
from contrastive_decoding.eval.strategies import build_strategy  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from contrastive_decoding import load_model  # noqa: E402
from contrastive_decoding.integrations.lm_eval_model import resolve_strategy_args  # noqa: E402
from contrastive_decoding.integrations.lm_eval_tasks import (  # noqa: E402
    STABLE_MC2_TASK,
    write_stable_mc2_task,
)
from contrastive_decoding.lm_eval import ContrastiveLM  # noqa: E402

DEFAULT_DATA = (
    Path(__file__).resolve().parents[1]
    / ".."
    / "shared"
    / "data"
    / "truthfulqa"
    / "v0"
    / "truthful_qa_multiple_choice_validation.jsonl"
)


def write_tasks(folder: Path, data_file: Path) -> None:
    """``local_truthfulqa_mc1``/``_mc2``: lm-eval's TruthfulQA tasks reading ``data_file``."""
    tasks = Path(lm_eval.__file__).parent / "tasks" / "truthfulqa"
    for kind in ("mc1", "mc2"):
        (folder / f"local_truthfulqa_{kind}.yaml").write_text(
            f"include: {tasks / f'truthfulqa_{kind}.yaml'}\ntask: local_truthfulqa_{kind}\n"
            "dataset_path: json\ndataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    validation: {data_file}\n",
            encoding="utf-8",
        )


def run_ours(model, tokenizer, strategy: str, protocol: str, items: list[dict]) -> dict[str, Any]:
    base, params, _ = resolve_strategy_args(strategy, {})
    ctx = EvalContext(model, tokenizer, build_strategy(model, base, params, tokenizer), protocol)
    start = time.perf_counter()
    records = BENCHMARKS["tfqa-hf"].evaluate(ctx, items)
    seconds = time.perf_counter() - start
    return {
        "mc1": 100 * float(np.mean([r["metrics"]["mc1"] for r in records])),
        "mc2": 100 * float(np.mean([r["metrics"]["mc2"] for r in records])),
        "seconds": seconds,
    }


def run_lm_eval(lm, include: Path, limit: int, stable: bool = False) -> dict[str, Any]:
    tasks = ["local_truthfulqa_mc1", "local_truthfulqa_mc2"] + ([STABLE_MC2_TASK] if stable else [])
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm, tasks=tasks, task_manager=TaskManager(include_path=str(include)), limit=limit
    )
    seconds = time.perf_counter() - start
    res = out["results"]
    row = {
        "mc1": _percent(res["local_truthfulqa_mc1"]["acc,none"]),
        "mc2": _percent(res["local_truthfulqa_mc2"]["acc,none"]),  # None: lm-eval's NaN (exp overflow)
        "seconds": seconds,
    }
    if stable:
        row["mc2_stable"] = _percent(res[STABLE_MC2_TASK]["acc,none"])
    return row


def _percent(value: float) -> float | None:
    """A metric in percent; ``None`` (JSON null) for lm-eval's NaN, which is no value."""
    return 100 * value if math.isfinite(value) else None


def _cell(value: float | None) -> str:
    return "NaN (overflow)" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="TruthfulQA multiple_choice jsonl")
    parser.add_argument("--limit", type=int, default=100, help="first N questions")
    parser.add_argument("--strategies", nargs="+", default=["none", "dola-high", "layercake"])
    parser.add_argument("--protocol", default="paper")
    parser.add_argument("--hf", action="store_true", help="also time lm-eval's own hf model (plain model)")
    parser.add_argument(
        "--stable-mc2",
        action="store_true",
        help=f"also run {STABLE_MC2_TASK} (mc2 without exp overflow; its requests are run again)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()

    model, tokenizer = load_model(args.model, dtype="float32")
    items = BENCHMARKS["tfqa-hf"].read_file(args.data)[: args.limit]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        write_tasks(Path(tmp), args.data.resolve())
        write_stable_mc2_task(tmp, args.data.resolve())
        for strategy in args.strategies:
            ours = run_ours(model, tokenizer, strategy, args.protocol, items)
            lm = ContrastiveLM(
                pretrained=model, tokenizer=tokenizer, strategy=strategy, protocol=args.protocol
            )
            theirs = run_lm_eval(lm, Path(tmp), args.limit, args.stable_mc2)
            row = {
                "strategy": strategy,
                "protocol": args.protocol,
                "n": len(items),
                "ours": ours,
                "lm_eval": theirs,
            }
            row["time_ratio_lm_eval_over_ours"] = theirs["seconds"] / ours["seconds"]
            if args.hf and strategy == "none":
                hf = lm_eval.api.registry.get_model("hf")(pretrained=model, tokenizer=tokenizer, device="cpu")
                row["lm_eval_hf"] = run_lm_eval(hf, Path(tmp), args.limit)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(
        "\n| strategy | n | ours mc1 | ours mc2 | lm-eval mc1 | lm-eval mc2 | ours s | lm-eval s | ratio |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        o, t = r["ours"], r["lm_eval"]
        print(
            f"| {r['strategy']} | {r['n']} | {o['mc1']:.2f} | {o['mc2']:.2f} | {_cell(t['mc1'])} "
            f"| {_cell(t['mc2'])} | {o['seconds']:.0f} | {t['seconds']:.0f} "
            f"| {r['time_ratio_lm_eval_over_ours']:.2f} |"
            + (f" stable mc2 {_cell(t['mc2_stable'])}" if "mc2_stable" in t else "")
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=2, allow_nan=False) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
