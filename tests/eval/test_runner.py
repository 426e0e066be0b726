"""The runner on a tiny random model: every benchmark end to end, records checked against an
independent log-likelihood, resume after a simulated kill, shards, and summaries only when
complete."""

from __future__ import annotations

import math
import shutil

import pytest
from contrastive_decoding.eval import BENCHMARKS, EvalError, RunConfig, run_eval
from contrastive_decoding.eval.benchmarks.truthfulqa_mc import format_best, split_multi_answer
from contrastive_decoding.eval.prompts import TRUTHFULQA_PRIMER
from evalkit import (
    MC_RECORDS,
    TFQA_ROWS,
    WRITERS,
    char_tokenizer,
    loglik,
    one_thread,  # noqa: F401 - autouse fixture
    read_jsonl,
    tiny_model,
    write_mc_json,
    write_tfqa_csv,
)

TOKENIZER = char_tokenizer()


def _run(tmp_path, benchmark, out="run", data=None, **kw):
    data = data or WRITERS[benchmark](tmp_path)
    cfg = RunConfig(benchmark=benchmark, out=str(tmp_path / out), data=str(data), progress=False, **kw)
    return run_eval(cfg, model=tiny_model(), tokenizer=TOKENIZER)


@pytest.mark.parametrize("benchmark", list(BENCHMARKS))
@pytest.mark.parametrize("strategy", ["baseline", "dola-high"])
def test_every_benchmark_runs(tmp_path, benchmark, strategy):
    gen = BENCHMARKS[benchmark].task == "generate"
    result = _run(tmp_path, benchmark, strategy=strategy, **({"max_new_tokens": 4} if gen else {}))
    summary = result.summary
    assert summary is not None and summary["complete"] and result.done == result.total
    records = read_jsonl(result.out / "items.jsonl")
    assert sorted(r["id"] for r in records) == list(range(result.total))
    for metric in BENCHMARKS[benchmark].metrics:
        values = [r["metrics"][metric.name] for r in records]
        info = summary["metrics"][metric.name]
        assert info["mean"] == pytest.approx(sum(values) / len(values) * metric.scale)
        assert info["ci_low"] <= info["mean"] + 1e-9 and info["mean"] <= info["ci_high"] + 1e-9
    assert summary["n_items"] == len(records)
    assert summary["versions"]["transformers"] and summary["versions"]["torch"]
    if strategy == "baseline":
        assert summary["premature_layers"] is None
    else:
        assert summary["premature_layers"]  # DoLa records which early exits it used
        assert set(map(int, summary["premature_layers"])) <= {3, 5}  # "high" of 6 layers
        assert summary["strategy_params"]["dola_layers"] == "high"
    md = (result.out / "summary.md").read_text()
    assert md.count("\n") == 3 and benchmark in md


def test_tfqa_hf_baseline_matches_independent_loglik(tmp_path):
    result = _run(tmp_path, "tfqa-hf", data=write_mc_json(tmp_path))
    records = {r["id"]: r for r in read_jsonl(result.out / "items.jsonl")}
    for i, rec in enumerate(MC_RECORDS):
        prompt = TRUTHFULQA_PRIMER.split("\n\n", 1)[1] + "Q: " + rec["question"] + "\nA:"
        mc1 = [loglik(tiny_model(), TOKENIZER, prompt, " " + c) for c in rec["mc1_targets"]]
        mc2 = [loglik(tiny_model(), TOKENIZER, prompt, " " + c) for c in rec["mc2_targets"]]
        assert records[i]["scores_mc1"] == pytest.approx(mc1, abs=1e-3)
        assert records[i]["scores_mc2"] == pytest.approx(mc2, abs=1e-3)
        assert records[i]["metrics"]["mc1"] == float(max(range(len(mc1)), key=lambda k: mc1[k]) == 0)
        n_true = sum(rec["mc2_targets"].values())
        expected = sum(math.exp(s) for s in mc2[:n_true]) / sum(math.exp(s) for s in mc2)
        assert records[i]["metrics"]["mc2"] == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("strategy", ["baseline", "dola-high"])
def test_tfqa_runs_the_few_shot_primer_once_per_run(tmp_path, strategy):
    # Every question's prompt starts with the primer: its KV cache is computed once (PromptCache),
    # and each question runs only its own tokens (scores checked against full passes above).
    lengths: list[int] = []

    def record(module, args, kwargs):
        lengths.append(int(kwargs["input_ids"].shape[1]))

    handle = tiny_model().register_forward_pre_hook(record, with_kwargs=True)
    try:
        result = _run(tmp_path, "tfqa-hf", data=write_mc_json(tmp_path), strategy=strategy)
    finally:
        handle.remove()
    primer = len(TOKENIZER(TRUTHFULQA_PRIMER.split("\n\n", 1)[1])["input_ids"])
    assert result.total == len(MC_RECORDS) >= 2
    assert lengths.count(primer) == 1 and max(lengths) == primer


def test_tfqa_dola_baseline_matches_independent_loglik(tmp_path):
    result = _run(tmp_path, "tfqa-dola", data=write_tfqa_csv(tmp_path))
    records = {r["id"]: r for r in read_jsonl(result.out / "items.jsonl")}
    for i, row in enumerate(TFQA_ROWS):
        prompt = TRUTHFULQA_PRIMER + "Q: " + row["Question"] + "\nA:"
        true = split_multi_answer(row["Correct Answers"])
        false = split_multi_answer(row["Incorrect Answers"])
        s_true = [loglik(tiny_model(), TOKENIZER, prompt, " " + a) for a in true]
        s_false = [loglik(tiny_model(), TOKENIZER, prompt, " " + a) for a in false]
        assert records[i]["scores_true"] == pytest.approx(s_true, abs=1e-3)
        assert records[i]["scores_false"] == pytest.approx(s_false, abs=1e-3)
        best = s_true[true.index(format_best(row["Best Answer"]))]
        assert records[i]["metrics"]["mc1"] == float(best > max(s_false))
        assert records[i]["metrics"]["mc3"] == pytest.approx(
            sum(s > max(s_false) for s in s_true) / len(s_true)
        )
    assert result.summary["scoring_protocol"] == "loglik"  # the plain model: protocol has no effect


def test_protocol_is_passed_and_recorded(tmp_path):
    paper = _run(tmp_path, "halueval", out="paper", strategy="dola-high", protocol="paper")
    norm = _run(tmp_path, "halueval", out="norm", strategy="dola-high", protocol="normalized")
    assert paper.summary["scoring_protocol"] == "paper" and norm.summary["scoring_protocol"] == "normalized"
    a = read_jsonl(paper.out / "items.jsonl")[0]["score_right"]
    b = read_jsonl(norm.out / "items.jsonl")[0]["score_right"]
    assert a != b
    assert (
        _run(tmp_path, "factor-news", out="f", strategy="dola-low").summary["scoring_protocol"]
        == "normalized"
    )


# ---------------------------------------------------------------- resume


def _strip_seconds(records):
    return sorted(({k: v for k, v in r.items() if k != "seconds"} for r in records), key=lambda r: r["id"])


@pytest.mark.parametrize(
    "benchmark, kw", [("tfqa-dola", {}), ("gsm8k", {"max_new_tokens": 6, "batch_size": 2})]
)
def test_resume_after_kill_equals_uninterrupted(tmp_path, benchmark, kw):
    full = _run(tmp_path, benchmark, out="full", strategy="dola-high", **kw)
    lines = (full.out / "items.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(lines) == 3
    # A kill -9 mid-write: the first record complete, the second cut in the middle.
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(full.out / "run.json", killed / "run.json")
    (killed / "items.jsonl").write_text(lines[0] + lines[1][: len(lines[1]) // 2], encoding="utf-8")
    resumed = _run(tmp_path, benchmark, out="killed", strategy="dola-high", **kw)
    records = read_jsonl(killed / "items.jsonl")
    assert len(records) == 3 and len({r["id"] for r in records}) == 3  # none lost, none twice
    assert _strip_seconds(records) == _strip_seconds(read_jsonl(full.out / "items.jsonl"))
    assert resumed.summary["metrics"] == full.summary["metrics"]


def test_interrupted_run_writes_no_summary_then_resumes(tmp_path):
    bench = BENCHMARKS["halueval"]
    calls = {"n": 0}
    original = bench.evaluate

    def failing(ctx, items):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the run dies after one item
        return original(ctx, items)

    object.__setattr__(bench, "evaluate", failing)  # Benchmark is frozen
    try:
        with pytest.raises(KeyboardInterrupt):
            _run(tmp_path, "halueval")
    finally:
        object.__setattr__(bench, "evaluate", original)
    out = tmp_path / "run"
    assert len(read_jsonl(out / "items.jsonl")) == 1
    assert not (out / "summary.json").exists() and not (out / "summary.md").exists()
    result = _run(tmp_path, "halueval")
    assert result.summary is not None and len(read_jsonl(out / "items.jsonl")) == 2


def test_larger_limit_removes_stale_summary_until_done(tmp_path):
    first = _run(tmp_path, "tfqa-dola", limit=1)
    assert first.summary["n_items"] == 1
    data = write_tfqa_csv(tmp_path)
    cfg = RunConfig(
        benchmark="tfqa-dola", out=str(first.out), data=str(data), limit=3, shard=(0, 2), progress=False
    )
    partial = run_eval(cfg, model=tiny_model(), tokenizer=TOKENIZER)
    assert partial.summary is None and not (first.out / "summary.json").exists()


def test_other_settings_in_the_same_folder_are_refused(tmp_path):
    _run(tmp_path, "halueval")
    with pytest.raises(EvalError, match="other settings"):
        _run(tmp_path, "halueval", strategy="dola-high")


# ---------------------------------------------------------------- shards


def test_shards_merge_into_the_unsharded_summary(tmp_path):
    whole = _run(tmp_path, "tfqa-dola", out="whole", strategy="dola-low")
    first = _run(tmp_path, "tfqa-dola", out="sharded", strategy="dola-low", shard=(1, 2))
    assert first.summary is None and first.done == 1
    assert not (tmp_path / "sharded" / "summary.json").exists()
    second = _run(tmp_path, "tfqa-dola", out="sharded", strategy="dola-low", shard=(0, 2))
    assert second.summary is not None
    assert sorted(p.name for p in (tmp_path / "sharded").glob("items*.jsonl")) == [
        "items.shard0-of-2.jsonl",
        "items.shard1-of-2.jsonl",
    ]
    assert second.summary["metrics"] == whole.summary["metrics"]
    assert second.summary["n_items"] == 3


def test_rank_and_world_from_launcher_environment(tmp_path, monkeypatch):
    """What `accelerate launch` / torchrun set: each rank runs its share into its own file, and the
    rank finishing last writes the summary, equal to a one-process run's."""
    whole = _run(tmp_path, "tfqa-dola", out="whole")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    first = _run(tmp_path, "tfqa-dola", out="ranks")
    assert first.summary is None and first.done == 1
    monkeypatch.setenv("RANK", "0")
    second = _run(tmp_path, "tfqa-dola", out="ranks")
    assert (tmp_path / "ranks" / "items.shard0-of-2.jsonl").exists()
    assert (tmp_path / "ranks" / "items.shard1-of-2.jsonl").exists()
    assert second.summary["metrics"] == whole.summary["metrics"] and second.summary["shards"] == 2


def test_judge_metrics_match_independent_yes_no(tmp_path):
    from evalkit import tiny_model_dir

    judge = tiny_model_dir(str(tmp_path))  # a model folder, loaded by the runner as the judge
    result = _run(tmp_path, "tfqa-gen", out="judged", judge=str(judge), max_new_tokens=5)
    assert {"true", "info", "true_info"} <= set(result.summary["metrics"])
    assert result.summary["judge"] == {"truth": str(judge), "info": str(judge)}
    for rec, row in zip(read_jsonl(result.out / "items.jsonl"), TFQA_ROWS, strict=True):
        base = f"Q: {row['Question']}\nA: {rec['answer']}\n"
        for key, cue in (("true", "True:"), ("info", "Helpful:")):
            yes = loglik(tiny_model(), TOKENIZER, base + cue, " yes")
            no = loglik(tiny_model(), TOKENIZER, base + cue, " no")
            assert rec["judge"][f"p_{key}"] == pytest.approx(1 / (1 + math.exp(no - yes)), rel=1e-3)
            assert rec["metrics"][key] == float(yes > no)
        assert rec["metrics"]["true_info"] == rec["metrics"]["true"] * rec["metrics"]["info"]
    plain = _run(tmp_path, "tfqa-gen", out="plain", max_new_tokens=5)
    assert "true" not in plain.summary["metrics"]  # judge metrics only when a judge was used


@pytest.mark.parametrize("benchmark", ["halueval", "halueval-noknowledge"])
def test_halueval_baseline_matches_independent_loglik(tmp_path, benchmark):
    from evalkit import HALUEVAL_RECORDS

    result = _run(tmp_path, benchmark)
    for rec, row in zip(read_jsonl(result.out / "items.jsonl"), HALUEVAL_RECORDS, strict=True):
        prompt = f"Q: {row['question']}\nA:"
        if benchmark == "halueval":
            prompt = f"Knowledge: {row['knowledge']}\n" + prompt
        right = loglik(tiny_model(), TOKENIZER, prompt, " " + row["right_answer"])
        wrong = loglik(tiny_model(), TOKENIZER, prompt, " " + row["hallucinated_answer"])
        assert rec["score_right"] == pytest.approx(right, abs=1e-3)
        assert rec["metrics"]["acc"] == float(right > wrong)
        norm = right / (len(row["right_answer"]) + 1) > wrong / (len(row["hallucinated_answer"]) + 1)
        assert rec["metrics"]["acc_norm"] == float(norm)
