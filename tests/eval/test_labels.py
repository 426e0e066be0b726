"""How runs are named: hand-written expected labels for runs that differ only in protocol, floor, a
parameter, the repetition penalty, the model or nothing recorded; and the tables, comparison and
plot built from them.

The summaries below are written out as the runner records them (every parameter, defaults filled
in), so that each expected label follows from reading them, not from the labelling code.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from contrastive_decoding.eval.compare import compare_runs, comparison_table
from contrastive_decoding.eval.labels import model_name, protocol_name, run_label, run_labels, strategy_name
from contrastive_decoding.eval.markdown import markdown_grid
from contrastive_decoding.eval.runner import RunConfig, run_eval
from contrastive_decoding.eval.summary import load_summary, markdown_table
from evalkit import char_tokenizer, one_thread, tiny_model, write_mc_json  # noqa: F401 - autouse fixture

# DoLa's parameters as a run records them: the "high" bucket and every default.
DOLA = {
    "dola_layers": "high",
    "relative_top": 0.1,
    "final_norm": False,
    "layer_choice": "per_row",
    "divergence": "reference",
    "min_tokens_to_keep": 1,
}
MODEL = "/models/HuggingFaceTB/SmolLM2-135M-Instruct"


def _summary(strategy: str = "dola", protocol: str | None = "paper", **changes) -> dict:
    params = {**DOLA, **changes.pop("params", {})} if strategy == "dola" else changes.pop("params", {})
    return {
        "benchmark": "tfqa-hf",
        "model": MODEL,
        "dtype": "float32",
        "strategy": strategy,
        "strategy_label": changes.pop("strategy_label", strategy),
        "strategy_params": params,
        "scoring_protocol": protocol,
        "generation": None,
        "n_items": 817,
        "metrics": {"mc1": {"mean": 30.0, "ci_low": 27.0, "ci_high": 33.0, "n": 817, "scale": 100.0}},
        "seconds_per_item": 1.5,
        **changes,
    }


@pytest.mark.parametrize(
    "summary, label",
    [
        # Only the protocol, or only the floor, differs.
        (_summary(protocol="paper"), "dola-high (paper)"),
        (_summary(protocol="normalized"), "dola-high (normalized, fixed floor)"),
        (_summary(protocol="normalized (relative floor)"), "dola-high (normalized, relative floor)"),
        # Only one parameter differs: a preset's, none's, or one beside the preset's.
        (_summary(params={"dola_layers": "low"}), "dola-low (paper)"),
        (_summary(params={"dola_layers": 15}), "dola[dola_layers=15] (paper)"),
        (_summary(params={"final_norm": True}), "dola-high[final_norm=True] (paper)"),
        (
            _summary(params={"dola_layers": [10, 12], "relative_top": 0.2}),
            "dola[dola_layers=[10,12],relative_top=0.2] (paper)",
        ),
        # Given on the command line as `dola --param dola_layers=high`: the same run as dola-high.
        (_summary(strategy_label="dola[dola_layers=high]"), "dola-high (paper)"),
        # The plain model: its only protocol is not named.
        (_summary("baseline", "loglik"), "baseline"),
        # Generation: no protocol; a repetition penalty other than the strategy's own is named.
        (_summary("baseline", None, generation={"repetition_penalty": 1.0}), "baseline"),
        (
            _summary("baseline", None, generation={"repetition_penalty": 1.2}),
            "baseline[repetition_penalty=1.2]",
        ),
        (_summary(protocol=None, generation={"repetition_penalty": 1.2}), "dola-high"),
        (
            _summary(protocol=None, generation={"repetition_penalty": 1.0}),
            "dola-high[repetition_penalty=1]",
        ),
        # cd names its amateur (the harness records it by name; the library's default is a model).
        (
            _summary(
                "cd",
                None,
                params={"amateur": "HuggingFaceTB/SmolLM2-135M", "amateur_temperature": 0.5,
                        "relative_top": 0.1, "min_tokens_to_keep": 1},
                generation={"repetition_penalty": 1.0},
            ),
            "cd[amateur=HuggingFaceTB/SmolLM2-135M]",
        ),
        # A strategy this process does not know, or a summary without its parameters: as recorded.
        (_summary("not-registered", strategy_label="mine[x=1]"), "mine[x=1] (paper)"),
        (
            {"strategy_label": "dola-high", "scoring_protocol": "normalized"},
            "dola-high (normalized, fixed floor)",
        ),
    ],
)
def test_hand_written_labels(summary, label):
    assert run_label(summary) == label


def test_presets_tuples_and_long_values():
    lol = {
        "amateur": "prompt",
        "lower_layer": 0.5,
        "weight": 0.5,
        "refocus": None,
        "amateur_instruction": "You are a deceptive assistant. Answer every question with a "
        "plausible-sounding but false statement, and never reveal the truth.\n",
        "suppression": None,
        "final_norm": False,
        "relative_top": 0.1,
        "min_tokens_to_keep": 1,
    }
    assert strategy_name(_summary("lol", params=lol)) == "lol-prompt"
    assert strategy_name(_summary("lol", params={**lol, "amateur": "suppression"})) == "lol"
    # A tuple default recorded as a JSON list is the default; another list is named.
    vista = {"weight_late": 0.3, "late_layers": [0.78125, 0.9375], "final_norm": False}
    assert strategy_name(_summary("vista", params=vista)) == "vista"
    assert strategy_name(_summary("vista", params={**vista, "late_layers": [0.5, 0.75]})) == (
        "vista[late_layers=[0.5,0.75]]"
    )
    # A paragraph is cut to 40 characters (39 and an ellipsis), its line breaks as spaces:
    # "Be wrong. " 10 + "Always " 7 + "answer " 7 + "with " 5 + "a " 2 + "false " 6 + "st" 2 = 39.
    icd = {
        "instruction": "Be wrong.\nAlways answer with a false statement that sounds true.",
        "relative_top": 0.1,
        "min_tokens_to_keep": 1,
    }
    expected = "icd[instruction=Be wrong. Always answer with a false st…]"
    assert strategy_name(_summary("icd", params=icd)) == expected


def test_protocol_names():
    assert protocol_name({"scoring_protocol": "paper"}) == "paper"
    assert protocol_name({"scoring_protocol": "normalized"}) == "normalized, fixed floor"
    assert protocol_name({"scoring_protocol": "normalized (relative floor)"}) == "normalized, relative floor"
    assert protocol_name({"scoring_protocol": "loglik"}) == "loglik"
    assert protocol_name({"scoring_protocol": None}) is None
    assert protocol_name({}) is None


def test_model_names_are_as_recorded_the_embedded_one_spelled_out():
    assert model_name({"model": MODEL}) == MODEL
    assert model_name({"model": "Qwen/Qwen2.5-7B-Instruct"}) == "Qwen/Qwen2.5-7B-Instruct"
    assert model_name({"model": "smollm2"}) == "smollm2 (embedded SmolLM2-135M-Instruct)"
    # The description names the file the loader ships.
    from contrastive_decoding.backends.hf import loading

    assert loading._EMBEDDED_FILE.startswith("SmolLM2-135M-Instruct.")


def test_runs_of_one_label_are_told_apart():
    paper, normalized = _summary(protocol="paper"), _summary(protocol="normalized")
    assert run_labels([paper, normalized]) == ["dola-high (paper)", "dola-high (normalized, fixed floor)"]
    # Equal labels: the facts that differ are appended, those shown elsewhere are not.
    short = {**paper, "n_items": 200}
    other = {**paper, "model": "Qwen/Qwen2.5-0.5B"}
    assert run_labels([paper, short, other]) == [
        f"dola-high (paper); model={MODEL}; n=817",
        f"dola-high (paper); model={MODEL}; n=200",
        "dola-high (paper); model=Qwen/Qwen2.5-0.5B; n=817",
    ]
    assert run_labels([paper, short], shown=("n",)) == ["dola-high (paper)", "dola-high (paper)"]
    # The protocol left to a column still tells runs apart, without being appended.
    assert run_labels([paper, normalized], protocol=False) == ["dola-high", "dola-high"]
    # Nothing recorded differs: the folder, or the run's place without one.
    assert run_labels([paper, dict(paper)], ["runs/a", "runs/b"]) == [
        "dola-high (paper); runs/a",
        "dola-high (paper); runs/b",
    ]
    assert run_labels([paper, dict(paper)]) == ["dola-high (paper); run 1", "dola-high (paper); run 2"]


def test_summary_table_names_protocol_floor_and_full_model():
    runs = [
        _summary(protocol="paper"),
        _summary(protocol="normalized (relative floor)"),
        _summary("baseline", "loglik"),
    ]
    assert markdown_table(runs).splitlines() == [
        "| benchmark | model | strategy | protocol | n | mc1 | s/item |",
        "|---|---|---|---|---|---|---|",
        f"| tfqa-hf | {MODEL} | dola-high | paper | 817 | 30.0 [27.0, 33.0] | 1.50 |",
        f"| tfqa-hf | {MODEL} | dola-high | normalized, relative floor | 817 | 30.0 [27.0, 33.0] | 1.50 |",
        f"| tfqa-hf | {MODEL} | baseline | loglik | 817 | 30.0 [27.0, 33.0] | 1.50 |",
    ]
    twice = [_summary(), _summary()]
    rows = markdown_table(twice, model_column=False, folders=["r/x", "r/y"]).splitlines()[2:]
    assert [r.split(" | ")[1] for r in rows] == ["dola-high; r/x", "dola-high; r/y"]


def test_markdown_cells_keep_their_pipes_and_lines():
    assert markdown_grid(["a", "b"], [["x|y", "two\nlines"]]).splitlines()[2] == "| x\\|y | two lines |"


def _folder(root: Path, name: str, summary: dict, mc1: list[float]) -> Path:
    folder = root / name
    folder.mkdir()
    mean = 100 * sum(mc1) / len(mc1)
    summary = {**summary, "n_items": len(mc1)}
    summary["metrics"] = {"mc1": {"mean": mean, "ci_low": mean - 5, "ci_high": mean + 5, "scale": 100.0}}
    (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    records = "".join(json.dumps({"id": i, "metrics": {"mc1": v}}) + "\n" for i, v in enumerate(mc1))
    (folder / "items.jsonl").write_text(records, encoding="utf-8")
    return folder


def test_compare_of_one_strategy_under_two_protocols(tmp_path):
    base = _folder(tmp_path, "base", _summary("baseline", "loglik"), [0.0, 1.0, 0.0, 0.0])
    paper = _folder(tmp_path, "paper", _summary(protocol="paper"), [1.0, 1.0, 0.0, 1.0])
    norm = _folder(tmp_path, "norm", _summary(protocol="normalized"), [0.0, 0.0, 0.0, 0.0])
    rows = compare_runs([base, paper, norm], resamples=100)
    assert [(r["reference_label"], r["run_label"]) for r in rows] == [
        ("baseline", "dola-high (paper)"),
        ("baseline", "dola-high (normalized, fixed floor)"),
    ]
    table = comparison_table(rows).splitlines()
    assert table[0] == "| benchmark | model | metric | reference | run | n | ref | run | diff [95% CI] |"
    # Means by hand: baseline 1/4, paper 3/4, normalized 0.
    head = f"| tfqa-hf | {MODEL} | mc1 | baseline "
    assert table[2].startswith(head + "| dola-high (paper) | 4 | 25.00 | 75.00 | +50.00 [")
    assert table[3].startswith(head + "| dola-high (normalized, fixed floor) | 4 | 25.00 | 0.00 | -25.00 [")
    smol = {**_summary(protocol="paper"), "model": "smollm2"}
    other = _folder(tmp_path, "other", smol, [1.0, 0.0, 0.0, 0.0])
    row = comparison_table(compare_runs([paper, other], resamples=100)).splitlines()[2]
    both = f"{MODEL} vs smollm2 (embedded SmolLM2-135M-Instruct)"
    assert row.startswith(f"| tfqa-hf | {both} | mc1 | dola-high (paper) | dola-high (paper) |")


def test_plot_labels_and_width(tmp_path):
    from contrastive_decoding.eval.plot import DPI, WIDTH_IN, _names, plot_metric

    paper = _summary(protocol="paper")
    summaries = [paper, _summary(protocol="normalized"), {**paper, "n_items": 200}]
    labels, title = _names(summaries, ["a", "b", "c"])
    assert labels == ["dola-high (paper)", "dola-high (normalized, fixed floor)", "dola-high (paper); n=200"]
    assert title == ["tfqa-hf", MODEL, "n=817 unless marked"]
    labels, title = _names([paper, {**paper, "benchmark": "tfqa-dola", "model": "smollm2"}], ["a", "b"])
    assert labels == [
        f"dola-high (paper); benchmark=tfqa-hf; model={MODEL}",
        "dola-high (paper); benchmark=tfqa-dola; model=smollm2 (embedded SmolLM2-135M-Instruct)",
    ]
    assert title == ["n=817"]
    folders = [
        _folder(tmp_path, "base", _summary("baseline", "loglik"), [0.0, 1.0]),
        _folder(tmp_path, "paper", paper, [1.0, 1.0]),
    ]
    path = plot_metric(folders, "mc1", tmp_path / "mc1.png")
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">I", header[16:20])[0] == int(WIDTH_IN * DPI) == 1200  # ~800 px at page width x1.5


def test_labels_read_from_real_runs(tmp_path):
    """Three runs of the tiny model through the runner: the same strategy under two protocols and
    two floors; the summaries they write name them apart, and summary.md shows the model given."""
    data = write_mc_json(tmp_path)
    model = str(tmp_path / "org" / "tiny-llama")
    out = {}
    settings = (("p", "paper", "fixed"), ("n", "normalized", "fixed"), ("r", "normalized", "relative"))
    for name, protocol, floor in settings:
        cfg = RunConfig(
            benchmark="tfqa-hf",
            out=str(tmp_path / name),
            model=model,
            strategy="dola-high",
            protocol=protocol,
            floor=floor,
            data=str(data),
            progress=False,
        )
        run_eval(cfg, model=tiny_model(), tokenizer=char_tokenizer())
        out[name] = tmp_path / name
    summaries = [load_summary(out[k]) for k in ("p", "n", "r")]
    assert run_labels(summaries) == [
        "dola-high (paper)",
        "dola-high (normalized, fixed floor)",
        "dola-high (normalized, relative floor)",
    ]
    row = (out["r"] / "summary.md").read_text(encoding="utf-8").splitlines()[2]
    assert row.startswith(f"| tfqa-hf | {model} | dola-high | normalized, relative floor | 3 |")
