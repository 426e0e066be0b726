"""The harness's ``--floor``: plausible answer tokens scored below the fixed -1000 floor are
counted per item and in the summary (with a warning), and ``--floor relative`` is labelled in the
results and leaves none below."""

from __future__ import annotations

import pytest
from contrastive_decoding.eval import EvalError, RunConfig, run_eval
from contrastive_decoding.eval.cli import main
from evalkit import (
    char_tokenizer,
    one_thread,  # noqa: F401 - autouse fixture
    read_jsonl,
    tiny_model,
    tiny_model_dir,
    write_factor_csv,
)

from contrastive_decoding import ContrastStrategy, register_strategy

TOKENIZER = char_tokenizer()


class Sharpened(ContrastStrategy):
    """The model's logits times 1e4: plausible tokens other than the top one score about -1e4
    once normalized, far below a -1000 floor."""

    def __init__(self, factor: float = 1e4) -> None:
        self.factor = factor

    def combine(self, inputs):
        return inputs.final * self.factor


@pytest.fixture(autouse=True)
def sharpened(registry):
    register_strategy("sharpened")(Sharpened)


def _run(tmp_path, out: str, **kw):
    data = write_factor_csv(tmp_path)
    settings = dict(strategy="sharpened", protocol="normalized", progress=False) | kw
    cfg = RunConfig(benchmark="factor-news", out=str(tmp_path / out), data=str(data), **settings)
    return run_eval(cfg, model=tiny_model(), tokenizer=TOKENIZER)


def test_tokens_below_the_fixed_floor_are_recorded_and_summed(tmp_path):
    with pytest.warns(UserWarning, match="below the floor"):
        result = _run(tmp_path, "fixed")
    records = read_jsonl(tmp_path / "fixed" / "items.jsonl")
    per_item = [r.get("below_floor", 0) for r in records]
    assert sum(per_item) > 0
    assert result.summary["below_floor"] == {"tokens": sum(per_item), "items": sum(1 for n in per_item if n)}
    assert result.summary["scoring_protocol"] == "normalized"


def test_relative_floor_is_labelled_and_leaves_none_below(tmp_path):
    result = _run(tmp_path, "relative", floor="relative")
    assert result.summary["scoring_protocol"] == "normalized (relative floor)"
    assert result.summary["below_floor"] is None
    assert all("below_floor" not in r for r in read_jsonl(tmp_path / "relative" / "items.jsonl"))


def test_relative_floor_outside_the_normalized_protocol_is_refused(tmp_path):
    with pytest.raises(EvalError, match="--floor relative applies to --protocol normalized"):
        _run(tmp_path, "paper", floor="relative", protocol="paper")
    assert not (tmp_path / "paper").exists()


def test_cli_refuses_an_unknown_floor(tmp_path, capsys):
    model = tiny_model_dir(str(tmp_path))
    data = write_factor_csv(tmp_path)
    args = ["eval", "--benchmark", "factor-news", "--model", str(model), "--data", str(data)]
    assert main([*args, "--strategy", "dola", "--floor", "lowest", "--out", str(tmp_path / "x")]) == 2
    assert "--floor" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
