"""layer_map: every number against an independent computation from ``output_hidden_states``.

The reference here applies the output head by hand (``h @ W.T + b``, OPT's ``project_out``, the
final norm and Gemma's soft-capping where asked), and writes both divergences in float64 from
their textbook formulas; DoLa's layer choice is the argmax of those over the "high" bucket,
written out for these 6-layer models ([3, 5]), and is also checked against the layers
``score_continuations`` with ``DoLa("high")`` actually used.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from conftest import FAMILIES, cached_model, char_tokenizer

from contrastive_decoding import DoLa, layer_map, score_continuations
from contrastive_decoding.layer_map import LayerMap, _wrapped, font_plan, plot_layer_map, visible_token

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "Paris is the capital of France."


def _final_norm_module(model):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    for owner in (
        decoder,
        getattr(model, "model", None),
        getattr(model, "transformer", None),
        getattr(model, "gpt_neox", None),
        getattr(getattr(model, "model", None), "decoder", None),
    ):
        for name in ("norm", "final_layernorm", "final_layer_norm", "ln_f"):
            if owner is not None and isinstance(getattr(owner, name, None), torch.nn.Module):
                return getattr(owner, name)
    raise AssertionError("no final norm found")


def _project_out(model):
    decoder = getattr(getattr(model, "model", None), "decoder", None)
    return getattr(decoder, "project_out", None)


@torch.no_grad()
def reference(model, ids: list[int], final_norm: bool):
    """Per layer j < N: early-exit log-probs (float64) from hidden_states[j]; plus the final."""
    out = model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False)
    head = model.get_output_embeddings()
    n = model.config.get_text_config().num_hidden_layers
    exits = []
    for j in range(n):
        h = out.hidden_states[j][0]
        if final_norm:
            h = _final_norm_module(model)(h)
        proj = _project_out(model)
        if proj is not None:
            h = proj(h)
        logits = h.double() @ head.weight.double().T
        if head.bias is not None:
            logits = logits + head.bias.double()
        cap = getattr(model.config, "final_logit_softcapping", None)
        if final_norm and cap:
            logits = torch.tanh(logits / cap) * cap
        exits.append(torch.log_softmax(logits, dim=-1))
    final = torch.log_softmax(out.logits[0].double(), dim=-1)
    return exits, final


def divergence64(log_p: torch.Tensor, log_q: torch.Tensor, kind: str) -> torch.Tensor:
    """Summed over the vocabulary. reference: 0.5(KL(m||p)+KL(m||q)); jsd: 0.5(KL(p||m)+KL(q||m))."""
    p, q = log_p.exp(), log_q.exp()
    m = 0.5 * (p + q)
    log_m = m.log()
    if kind == "reference":
        return 0.5 * ((m * (log_m - log_p)).sum(-1) + (m * (log_m - log_q)).sum(-1))
    return 0.5 * ((p * (log_p - log_m)).sum(-1) + (q * (log_q - log_m)).sum(-1))


def check_against_reference(result, model, tok, text, kind, final_norm):
    ids = tok(text)["input_ids"]
    assert result.token_ids == ids
    exits, final = reference(model, ids, final_norm)
    for c, t in enumerate(result.positions):
        assert result.final_top_ids[c] == int(final[t].argmax())
        assert result.final_top_probs[c] == pytest.approx(float(final[t].max().exp()), rel=1e-5, abs=1e-7)
        if t + 1 < len(ids):
            assert result.final_next_probs[c] == pytest.approx(float(final[t, ids[t + 1]].exp()), rel=1e-4)
        else:
            assert result.final_next_probs[c] is None
        for r, j in enumerate(result.layers):
            lq = exits[j][t]
            assert result.top_ids[r][c] == int(lq.argmax()), (j, t)
            assert result.top_probs[r][c] == pytest.approx(float(lq.max().exp()), rel=1e-4, abs=1e-7)
            expected = float(divergence64(final[t], lq, kind))
            assert result.divergence[r][c] == pytest.approx(expected, rel=2e-3, abs=2e-5), (j, t)
            if t + 1 < len(ids):
                assert result.next_probs[r][c] == pytest.approx(
                    float(lq[ids[t + 1]].exp()), rel=1e-4, abs=1e-7
                )
            else:
                assert result.next_probs[r][c] is None
        # DoLa "high" on 6 layers: range(6 // 2, 6, 2) = [3, 5], tied embeddings or not.
        div = {j: float(divergence64(final[t], exits[j][t], kind)) for j in (3, 5)}
        if abs(div[3] - div[5]) > 1e-4 * max(div.values()):  # a near-tie may go either way in float32
            assert result.dola_choice[c] == max(div, key=div.get), t


@pytest.mark.parametrize("family", FAMILIES)
def test_every_number_matches_hidden_states(family):
    model, tok = cached_model(family), char_tokenizer()
    result = layer_map(model, tok, TEXT)
    assert result.layers == list(range(6))
    assert result.positions == list(range(len(tok(TEXT)["input_ids"])))
    assert result.candidates == [3, 5]
    check_against_reference(result, model, tok, TEXT, "reference", final_norm=False)
    assert result.top_tokens[0][0] == tok.decode([result.top_ids[0][0]])


@pytest.mark.parametrize("family", ["llama", "gemma2", "opt", "gpt2"])
@pytest.mark.parametrize("kind", ["reference", "jsd"])
def test_final_norm_and_jsd(family, kind):
    model, tok = cached_model(family), char_tokenizer()
    result = layer_map(model, tok, TEXT, divergence=kind, final_norm=True, layers=[0, 2, 5], prompt_len=10)
    assert result.layers == [0, 2, 5]
    assert result.positions == list(range(9, len(tok(TEXT)["input_ids"])))
    check_against_reference(result, model, tok, TEXT, kind, final_norm=True)
    if kind == "jsd":  # summed over the vocabulary, the textbook JSD is bounded by ln 2
        assert all(0.0 <= v <= math.log(2) + 1e-6 for row in result.divergence for v in row)


@pytest.mark.parametrize("family", FAMILIES)
def test_dola_choice_is_the_layer_dola_scores_with(family):
    """At the positions that predict a continuation's tokens, the map's choice equals the premature
    layer DoLa's own scoring used for each token."""
    model, tok = cached_model(family), char_tokenizer()
    prompt, answer = "Q: capital of France?\nA:", " Paris."
    scored = score_continuations(model, tok, prompt, [answer], strategy=DoLa("high"), share_prefix=False)[0]
    result = layer_map(model, tok, prompt + answer)
    k = len(tok(prompt)["input_ids"])
    column = {t: c for c, t in enumerate(result.positions)}
    assert [
        result.dola_choice[column[t]] for t in range(k - 1, k - 1 + len(answer))
    ] == scored.premature_layers


def test_static_bucket_and_single_layer_choice():
    model, tok = cached_model("llama"), char_tokenizer()
    result = layer_map(model, tok, TEXT, dola_layers=2)
    assert result.candidates == [2] and set(result.dola_choice) == {2}
    low = layer_map(model, tok, TEXT, dola_layers="low")
    assert low.candidates == [0, 2]  # range(0, 3, 2), untied embeddings


def test_write_json_csv_png(tmp_path):
    model, tok = cached_model("qwen2"), char_tokenizer()
    result = layer_map(model, tok, TEXT, prompt_len=3)
    paths = result.write(tmp_path / "map")
    data = json.loads(paths["json"].read_text(encoding="utf-8"))
    assert data["divergence"] == result.divergence and data["dola_choice"] == result.dola_choice
    assert data["next_tokens"][-1] is None and data["next_tokens"][0] == tok.decode([result.token_ids[3]])
    with open(paths["csv"], encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(result.positions) * (len(result.layers) + 1)
    first = rows[0]
    assert int(first["position"]) == 2 and int(first["layer"]) == 0
    assert float(first["divergence"]) == pytest.approx(result.divergence[0][0], rel=1e-9)
    assert rows[len(result.layers)]["layer"] == "6" and rows[len(result.layers)]["divergence"] == ""
    for key in ("divergence_png", "top_tokens_png"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The Markdown: a header, a rule, then one row per predicted token; spaces written as ␣.
    markdown = paths["markdown"].read_text(encoding="utf-8").splitlines()
    table = [line for line in markdown if line.startswith("|")]
    assert len(table) == 2 + len(result.positions)
    assert table[0] == "| position | predicted token | DoLa layer | 6 (final) | 5 | 4 | 3 | 2 | 1 | 0 |"
    assert table[2].startswith(f"| 2 | `{tok.decode([result.token_ids[3]]).replace(' ', '␣')}` |")


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(layers=[0, 6]), "`layers` has layer 6, outside 0..5"),
        (dict(prompt_len=99), "`prompt_len` must be an integer in 0..31"),
        (dict(prompt_len=-1), "`prompt_len`"),
        (dict(dola_layers="middle"), "`dola_layers` must be 'low', 'high'"),
        (dict(divergence="kl"), "`divergence` must be one of"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        layer_map(cached_model("llama"), char_tokenizer(), TEXT, **kwargs)


def test_empty_text_refused():
    with pytest.raises(ValueError, match="`text` is empty"):
        layer_map(cached_model("llama"), char_tokenizer(), "")


def test_cli_inspect(tmp_path, capsys):
    from contrastive_decoding.eval.cli import main

    folder = tmp_path / "tiny"
    cached_model("llama").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    out = tmp_path / "map"
    args = ["inspect", "--model", str(folder), "--text", "Q: sky?\nA: blue.", "--out", str(out)]
    assert main(args + ["--layers", "1-3,5", "--prompt-len", "4", "--dola-layers", "2"]) == 0
    data = json.loads((out / "layer_map.json").read_text(encoding="utf-8"))
    assert data["layers"] == [1, 2, 3, 5] and data["positions"][0] == 3 and set(data["dola_choice"]) == {2}
    assert (out / "divergence.png").is_file() and (out / "top_tokens.png").is_file()
    capsys.readouterr()
    assert main(args + ["--layers", "9"]) == 2
    assert "--layers has layer 9, outside 0..5" in capsys.readouterr().err
    assert main(args + ["--layers", "a-b"]) == 2
    assert "--layers 'a-b': write layer indices as 0,2,4 or a range 10-29" in capsys.readouterr().err
    assert main(args + ["--prompt-len", "50"]) == 2
    assert "--prompt-len must be an integer in 0.." in capsys.readouterr().err


# ---------------------------------------------------------------- tokens written visibly


@pytest.mark.parametrize(
    "token, shown",
    [
        ("\u200c", "⟨U+200C⟩"),  # zero-width non-joiner: prints as nothing
        ("\n", "↵"),
        ("\t", "⇥"),
        ("?", "?"),  # the real question mark stays itself: no escape looks like it
        (" ?", "␣?"),
        (" the", "␣the"),
        ("a  b", "a␣␣b"),
        ("", "⟨empty⟩"),
        ("\x07", "⟨U+0007⟩"),  # a control character
        ("\u00a0", "⟨U+00A0⟩"),  # a no-break space is not a space
        ("\U000f0000", "⟨U+F0000⟩"),  # private use
        ("␣", "⟨U+2423⟩"),  # the escapes' own characters, escaped: a token "␣" is no space
        ("↵⇥", "⟨U+21B5⟩⟨U+21E5⟩"),
        ("⟨U+200C⟩", "⟨U+27E8⟩U+200C⟩"),  # a token spelling an escape is not that escape
        ("$x$", "$x$"),
        ("ক", "ক"),  # Bengali KA, printable: kept where no font is asked about
        ("中文", "中文"),
    ],
)
def test_visible_token_hand_cases(token, shown):
    assert visible_token(token) == shown


def test_characters_the_font_lacks_are_escaped():
    lacks_ka = lambda ch: ch != "ক"  # noqa: E731 - a font without Bengali KA (U+0995)
    assert visible_token(" কখ", has_glyph=lacks_ka) == "␣⟨U+0995⟩খ"
    # matplotlib's own font (DejaVu Sans) has no Bengali: with no other font to choose from,
    # KA is escaped; Latin and the escapes' symbols are drawn.
    default_only = font_plan({"ক", "a"}, candidates=[])
    assert default_only.families == ("DejaVu Sans",)
    assert not default_only.has_glyph("ক") and default_only.has_glyph("a")
    assert all(default_only.has_glyph(ch) for ch in "␣↵⇥⟨⟩…")
    assert visible_token("ক?", default_only.has_glyph) == "⟨U+0995⟩?"


def test_installed_noto_fonts_draw_other_scripts():
    plan = font_plan({"ক"})
    if not plan.has_glyph("ক"):
        pytest.skip("no installed font has Bengali (Debian's fonts-noto-core provides Noto Sans Bengali)")
    assert plan.families[0] == "DejaVu Sans" and "Noto Sans Bengali" in plan.families
    assert visible_token("ক", plan.has_glyph) == "ক"


def test_grid_cells_wrap_and_keep_escapes_whole():
    assert _wrapped("longtokenwithmanychars", None, 8, 2) == "longtoke\nnwithma…"
    assert _wrapped("\u200c?", None, 8, 2) == "⟨U+200C⟩\n?"  # the 8-character escape, unsplit
    assert _wrapped("日本語日本語", None, 8, 2) == "日本語日\n本語"  # wide characters count twice
    assert _wrapped(" the", None, 8, 2) == "␣the"


def _hand_map(tokens: list[str], top: list[str]) -> LayerMap:
    """A one-layer map over ``tokens`` whose layer-0 and final top tokens are ``top``."""
    cols = len(tokens) - 1
    return LayerMap(
        text="".join(tokens), token_ids=list(range(len(tokens))), tokens=tokens,
        positions=list(range(cols)), layers=[0], num_layers=1, dola_layers=0, candidates=[0],
        divergence_kind="reference", final_norm=False, top_ids=[[0] * cols], top_probs=[[0.25] * cols],
        next_probs=[[0.5] * cols], divergence=[[1.0] * cols], dola_choice=[0] * cols,
        final_top_ids=[0] * cols, final_top_probs=[0.75] * cols, final_next_probs=[0.5] * cols,
        top_tokens=[top], final_top_tokens=top,
    )


def test_markdown_writes_every_token_whole_and_visibly():
    tokens = ["Q", "\u200c", "?", " a|b", "longtokenwith_chars", "*x*"]
    lines = _hand_map(tokens, tokens[1:]).markdown().splitlines()
    assert lines[2] == "Text: `Q⟨U+200C⟩?␣a\\|blongtokenwith_chars*x*`"
    assert lines[-7:] == [
        "| position | predicted token | DoLa layer | 1 (final) | 0 |",
        "|---|---|---|---|---|",
        "| 0 | `⟨U+200C⟩` | 0 | `⟨U+200C⟩` 0.75 | `⟨U+200C⟩` 0.25 |",
        "| 1 | `?` | 0 | `?` 0.75 | `?` 0.25 |",
        "| 2 | `␣a\\|b` | 0 | `␣a\\|b` 0.75 | `␣a\\|b` 0.25 |",
        "| 3 | `longtokenwith_chars` | 0 | `longtokenwith_chars` 0.75 | `longtokenwith_chars` 0.25 |",
        "| 4 | `*x*` | 0 | `*x*` 0.75 | `*x*` 0.25 |",
    ]


def test_png_draws_no_empty_boxes(tmp_path):
    """Tokens of many scripts, invisible characters and a "$": every glyph is drawn by some font or
    escaped, so matplotlib reports no missing glyph (it warns for each one it draws as a box)."""
    import warnings

    tokens = ["Q", "\u200c", "\n", "?", " ক", "नमस्ते", "తెలుగు", "中文", "한국어", "\x07", "$x$", "ሰላም", "A"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = plot_layer_map(_hand_map(tokens, tokens[1:]), tmp_path)
    assert not [w for w in caught if "missing from" in str(w.message)], [str(w.message) for w in caught]
    assert paths["top_tokens_png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
