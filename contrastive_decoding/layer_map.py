"""Where in the layer stack a model's prediction forms: a logit-lens map with DoLa's view of it.

For every position of a text and every layer ``j`` (``0`` = embedding output, ``N`` = the model's
own output), :func:`layer_map` reports what the early exit ``q_j = softmax(lm_head(h_j))``
predicts (its top token and that token's probability, the probability it gives the token that
actually comes next), how far ``q_j`` is from the final distribution ``q_N`` (DoLa's divergence,
or the textbook Jensen-Shannon divergence, see :mod:`contrastive_decoding.core.divergence`), and which
premature layer DoLa would contrast with at that position for a given ``dola_layers`` bucket.
DoLa's paper motivates the method with such a map: late layers agree with the final one on easy
tokens and disagree on the tokens that carry facts.

Column ``t`` of the map is the prediction made after reading token ``t``, i.e. the prediction of
token ``t + 1``; the last column predicts what would follow the text. Divergences are reported
summed over the vocabulary (in nats; the textbook JSD lies in ``[0, ln 2]``). DoLa's code averages
over the vocabulary instead, a constant factor that leaves its choice of layer unchanged; the
chosen layer here is computed exactly as :class:`~contrastive_decoding.DoLa` chooses it.

The map is written by :meth:`LayerMap.write` as JSON, a long-format CSV and two PNG heatmaps, and
by the command ``contrastive-decoding inspect``.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from contrastive_decoding.backends.hf.readout import LayerReadout
from contrastive_decoding.core.divergence import DIVERGENCES, layer_divergence
from contrastive_decoding.core.specs import check_layer_indices
from contrastive_decoding.core.validation import check_flag
from contrastive_decoding.strategies.dola import _check_dola_layers, dola_candidate_layers

__all__ = ["FontPlan", "LayerMap", "font_plan", "layer_map", "plot_layer_map", "visible_token"]


@dataclass
class LayerMap:
    """The per-position, per-layer readout of one text (see :func:`layer_map`).

    Attributes:
        text: the text read.
        token_ids: its token ids (all positions, special tokens included).
        tokens: each token decoded on its own.
        positions: the positions shown (columns), in order.
        layers: the layers shown (rows), in order, each in ``0..N-1``.
        num_layers: ``N``.
        dola_layers: the bucket DoLa's choice was computed for.
        candidates: its candidate premature layers on this model.
        divergence_kind: ``"reference"`` (DoLa's code) or ``"jsd"`` (textbook).
        final_norm: whether early exits went through the final norm.
        top_ids: ``[layer][column]`` the early exit's most probable token.
        top_probs: ``[layer][column]`` its probability.
        next_probs: ``[layer][column]`` the probability of the token that follows (``None`` in the
            last column of the text, which has no next token).
        divergence: ``[layer][column]`` divergence of the early exit from the final distribution,
            summed over the vocabulary (nats).
        dola_choice: ``[column]`` the premature layer DoLa would use there.
        final_top_ids: ``[column]`` the final distribution's most probable token.
        final_top_probs: ``[column]`` its probability.
        final_next_probs: ``[column]`` the final probability of the next token (``None`` last).
    """

    text: str
    token_ids: list[int]
    tokens: list[str]
    positions: list[int]
    layers: list[int]
    num_layers: int
    dola_layers: Any
    candidates: list[int]
    divergence_kind: str
    final_norm: bool
    top_ids: list[list[int]]
    top_probs: list[list[float]]
    next_probs: list[list[float | None]]
    divergence: list[list[float]]
    dola_choice: list[int]
    final_top_ids: list[int]
    final_top_probs: list[float]
    final_next_probs: list[float | None]
    top_tokens: list[list[str]] = field(default_factory=list)
    final_top_tokens: list[str] = field(default_factory=list)

    def next_token(self, column: int) -> str | None:
        """The token that follows the position of ``column`` (``None`` after the text's end)."""
        t = self.positions[column] + 1
        return self.tokens[t] if t < len(self.tokens) else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (every number finite; missing next tokens are ``None``)."""
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "tokens": self.tokens,
            "positions": self.positions,
            "next_tokens": [self.next_token(c) for c in range(len(self.positions))],
            "layers": self.layers,
            "num_layers": self.num_layers,
            "dola_layers": self.dola_layers,
            "candidates": self.candidates,
            "divergence_kind": self.divergence_kind,
            "divergence_unit": "nats, summed over the vocabulary",
            "final_norm": self.final_norm,
            "top_ids": self.top_ids,
            "top_tokens": self.top_tokens,
            "top_probs": self.top_probs,
            "next_probs": self.next_probs,
            "divergence": self.divergence,
            "dola_choice": self.dola_choice,
            "final_top_ids": self.final_top_ids,
            "final_top_tokens": self.final_top_tokens,
            "final_top_probs": self.final_top_probs,
            "final_next_probs": self.final_next_probs,
        }

    def csv_rows(self) -> list[dict[str, Any]]:
        """One row per (column, layer), the final layer ``N`` included (its divergence is 0 by
        definition and left empty)."""
        rows = []
        for c, t in enumerate(self.positions):
            common = {
                "position": t,
                "token": self.tokens[t],
                "next_token": self.next_token(c),
                "dola_layer": self.dola_choice[c],
                "final_top_token": self.final_top_tokens[c],
                "final_top_prob": self.final_top_probs[c],
            }
            for i, layer in enumerate(self.layers):
                rows.append(
                    {
                        **common,
                        "layer": layer,
                        "top_token": self.top_tokens[i][c],
                        "top_prob": self.top_probs[i][c],
                        "next_token_prob": self.next_probs[i][c],
                        "divergence": self.divergence[i][c],
                    }
                )
            rows.append(
                {
                    **common,
                    "layer": self.num_layers,
                    "top_token": self.final_top_tokens[c],
                    "top_prob": self.final_top_probs[c],
                    "next_token_prob": self.final_next_probs[c],
                    "divergence": None,
                }
            )
        return rows

    def markdown(self) -> str:
        """The map as Markdown: one row per predicted token, with DoLa's layer, the final top token
        and each shown layer's top token with its probability (last layer first, as the PNG reads
        from the top), every token whole and written by :func:`visible_token`."""
        head = ["position", "predicted token", "DoLa layer", f"{self.num_layers} (final)"]
        head += [str(layer) for layer in reversed(self.layers)]
        lines = [
            "# Layer map",
            "",
            f"Text: {_md_code(self.text)}",
            "",
            f"{len(self.positions)} predicted tokens x {len(self.layers)} early-exit layers of "
            f"{self.num_layers}; divergence: {self.divergence_kind}; final norm: "
            f"{'on' if self.final_norm else 'off'}; DoLa's bucket: {self.dola_layers!r}.",
            "Cells: the layer's top token and its probability. Tokens are written visibly: "
            f"{VISIBLE[' ']} a space, {VISIBLE[chr(10)]} a newline, {VISIBLE[chr(9)]} a tab, "
            "\u27e8U+XXXX\u27e9 any other character that prints as nothing (and the characters "
            f"{VISIBLE[' ']} {VISIBLE[chr(10)]} {VISIBLE[chr(9)]} \u27e8 themselves), {EMPTY_TOKEN} an "
            "empty token; the JSON and CSV files hold the tokens as decoded.",
            "",
            "| " + " | ".join(head) + " |",
            "|" + "|".join("---" for _ in head) + "|",
        ]
        for c, t in enumerate(self.positions):
            following = self.next_token(c)
            cells = [
                str(t),
                "(end)" if following is None else _md_code(following),
                str(self.dola_choice[c]),
                f"{_md_code(self.final_top_tokens[c])} {self.final_top_probs[c]:.2f}",
            ]
            for i in reversed(range(len(self.layers))):
                cells.append(f"{_md_code(self.top_tokens[i][c])} {self.top_probs[i][c]:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def write(self, out: str | Path, plots: bool = True) -> dict[str, Path]:
        """Write ``layer_map.json``, ``layer_map.csv``, ``layer_map.md`` (:meth:`markdown`) and
        (``plots``) ``divergence.png`` and ``top_tokens.png`` into the folder ``out`` (created if
        absent).

        Returns:
            The written paths by kind (``json``, ``csv``, ``markdown``, ``divergence_png``,
            ``top_tokens_png``).
        """
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {
            "json": folder / "layer_map.json",
            "csv": folder / "layer_map.csv",
            "markdown": folder / "layer_map.md",
        }
        paths["markdown"].write_text(self.markdown(), encoding="utf-8")
        paths["json"].write_text(
            json.dumps(self.to_dict(), indent=1, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8"
        )
        rows = self.csv_rows()
        with open(paths["csv"], "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        if plots:
            paths.update(plot_layer_map(self, folder))
        return paths


def _md_code(token: str) -> str:
    """A token in a Markdown table cell: visible (:func:`visible_token`), as code (so that ``*``
    or ``_`` is not emphasis), with ``|`` escaped (it would end the cell)."""
    text = visible_token(token)
    fence = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}".replace("|", "\\|")


def _parse_layers(layers: Sequence[int] | None, n: int) -> list[int]:
    if layers is None:
        return list(range(n))
    return check_layer_indices(list(layers), n, argument="layers", model_name="model")


def _token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([int(token_id)])


@torch.no_grad()
def layer_map(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    *,
    prompt_len: int = 0,
    layers: Sequence[int] | None = None,
    dola_layers: str | int | Sequence[int] = "high",
    divergence: Literal["reference", "jsd"] = "reference",
    final_norm: bool = False,
) -> LayerMap:
    """The logit-lens map of ``text``: every layer's early exit at every position, its divergence
    from the final layer, and DoLa's choice of premature layer.

    Args:
        model: a decoder-only causal LM (any family :class:`~contrastive_decoding.LayerReadout`
            reads).
        tokenizer: its tokenizer (special tokens are added as the tokenizer adds them).
        text: the text to read, e.g. a question and an answer.
        prompt_len: the first ``prompt_len`` tokens are context whose own predictions are not shown:
            the map starts with the prediction of token ``prompt_len`` (``0``: every position).
        layers: the premature layers shown (default: all of ``0..N-1``); DoLa's choice always
            uses its bucket's candidates.
        dola_layers: DoLa's bucket (``"high"``, ``"low"``, one layer or a list), for
            ``dola_choice``.
        divergence: ``"reference"`` (DoLa's code) or ``"jsd"`` (textbook Jensen-Shannon).
        final_norm: apply the final norm (and Gemma's soft-capping) to early exits, as
            ``DoLa(final_norm=True)`` does; DoLa's code does not.

    Returns:
        A :class:`LayerMap`; ``.write(folder)`` saves JSON, CSV and PNG heatmaps.

    Raises:
        ValueError: empty text, ``prompt_len`` outside ``0..tokens-1``, a layer outside
            ``0..N-1``, an unknown bucket or divergence; each names the argument and the fix.

    Example:
        >>> import torch
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from contrastive_decoding import layer_map
        >>> class Tok:  # a stand-in tokenizer: one id per character
        ...     def __call__(self, text): return {"input_ids": [ord(c) % 64 for c in text]}
        ...     def decode(self, ids): return "".join(chr(65 + i % 26) for i in ids)
        >>> torch.manual_seed(0) and None
        >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=4, num_attention_heads=2)).eval()
        >>> m = layer_map(model, Tok(), "abcdef", dola_layers="high")
        >>> len(m.layers), len(m.positions), m.candidates
        (4, 6, [2])
    """
    final_norm, bucket = _check_map_arguments(text, divergence, final_norm, dola_layers)
    readout = LayerReadout.from_model(model)
    n = readout.num_layers
    shown = _parse_layers(layers, n)
    candidates = dola_candidate_layers(bucket, n, readout.tied_embeddings)

    ids, positions = _tokens_and_positions(tokenizer, text, prompt_len)
    device = next(model.parameters()).device
    out = model(input_ids=torch.tensor([ids], device=device), output_hidden_states=True, use_cache=False)
    lens = _Lens(readout, out.hidden_states, ids, positions, final_norm, divergence)
    final_logits = out.logits[0, lens.pos].float()  # (P, V): the model's own output, soft-capped where it is
    final_lp = torch.log_softmax(final_logits, dim=-1)
    top_ids, top_probs, nexts, divs = lens.read(shown, final_logits)
    choice = lens.dola_choice(candidates, final_logits)

    final_best = final_lp.max(dim=-1)
    result = LayerMap(
        text=text,
        token_ids=ids,
        tokens=[_token_text(tokenizer, i) for i in ids],
        positions=positions,
        layers=shown,
        num_layers=n,
        dola_layers=bucket,
        candidates=candidates,
        divergence_kind=divergence,
        final_norm=final_norm,
        top_ids=top_ids,
        top_probs=top_probs,
        next_probs=nexts,
        divergence=divs,
        dola_choice=choice,
        final_top_ids=final_best.indices.tolist(),
        final_top_probs=final_best.values.exp().tolist(),
        final_next_probs=lens.next_probs(final_lp),
    )
    result.top_tokens = [[_token_text(tokenizer, i) for i in row] for row in top_ids]
    result.final_top_tokens = [_token_text(tokenizer, i) for i in result.final_top_ids]
    return result


def _check_map_arguments(text, divergence, final_norm, dola_layers) -> tuple[bool, str | int | list[int]]:
    if not isinstance(text, str) or not text:
        raise ValueError("`text` is empty; give the text to read, e.g. a question and its answer.")
    if divergence not in DIVERGENCES:
        raise ValueError(f"`divergence` must be one of {DIVERGENCES}, got {divergence!r}.")
    return check_flag("final_norm", final_norm, allow_int=True), _check_dola_layers(dola_layers)


def _tokens_and_positions(tokenizer: Any, text: str, prompt_len: int) -> tuple[list[int], list[int]]:
    """The token ids of ``text`` and the positions whose predictions the map shows."""
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise ValueError(f"`text` ({text!r}) tokenizes to no tokens.")
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, int) or not 0 <= prompt_len < len(ids):
        raise ValueError(
            f"`prompt_len` must be an integer in 0..{len(ids) - 1} (the text has {len(ids)} tokens), "
            f"got {prompt_len!r}; it counts the context tokens whose predictions are not shown."
        )
    return ids, list(range(max(prompt_len, 1) - 1, len(ids)))


class _Lens:
    """Early exits of one forward's hidden states at the shown positions, one layer at a time."""

    def __init__(self, readout, hidden, ids: list[int], positions: list[int], final_norm: bool, divergence):
        device = hidden[0].device
        self.readout, self.hidden, self.final_norm, self.divergence = readout, hidden, final_norm, divergence
        self.pos = torch.tensor(positions, device=device)
        following = [ids[t + 1] if t + 1 < len(ids) else 0 for t in positions]
        self.next_ids = torch.tensor(following, device=device)
        self.has_next = [t + 1 < len(ids) for t in positions]

    def next_probs(self, log_probs: torch.Tensor) -> list[float | None]:
        values = log_probs.gather(-1, self.next_ids[:, None])[:, 0].exp().tolist()
        return [v if ok else None for v, ok in zip(values, self.has_next, strict=True)]

    def exit_logits(self, layer: int) -> torch.Tensor:
        states = self.hidden[layer][0, self.pos]
        return self.readout.early_exit_logits(states, final_norm=self.final_norm).float()

    def read(self, shown: list[int], final_logits: torch.Tensor) -> tuple[list, list, list, list]:
        """Per shown layer: top ids, top probabilities, next-token probabilities, divergences."""
        vocab = final_logits.shape[-1]
        top_ids, top_probs, nexts, divs = [], [], [], []
        for layer in shown:  # one layer at a time: (P, V) float32 tensors, not (L, P, V)
            logits = self.exit_logits(layer)
            log_probs = torch.log_softmax(logits, dim=-1)
            best = log_probs.max(dim=-1)
            top_ids.append(best.indices.tolist())
            top_probs.append(best.values.exp().tolist())
            nexts.append(self.next_probs(log_probs))
            # layer_divergence averages over the vocabulary as DoLa's code does; report the sum.
            divs.append((layer_divergence(final_logits, logits[None], self.divergence)[0] * vocab).tolist())
        return top_ids, top_probs, nexts, divs

    def dola_choice(self, candidates: list[int], final_logits: torch.Tensor) -> list[int]:
        if len(candidates) == 1:
            return [candidates[0]] * len(self.pos)
        # The very computation DoLa's strategy runs (all candidates stacked, argmax per row).
        stacked = torch.stack([self.exit_logits(j) for j in candidates])
        index = layer_divergence(final_logits, stacked, self.divergence).argmax(0)
        return [candidates[i] for i in index.tolist()]


#: How :func:`visible_token` writes characters that would otherwise be invisible or ambiguous.
VISIBLE = {" ": "\u2423", "\n": "\u21b5", "\t": "\u21e5"}  # ␣ space, ↵ newline, ⇥ tab
#: What an empty token is written as.
EMPTY_TOKEN = "\u27e8empty\u27e9"  # ⟨empty⟩


def _codepoint(ch: str) -> str:
    return f"\u27e8U+{ord(ch):04X}\u27e9"  # ⟨U+200C⟩


def visible_token(token: str, has_glyph: Callable[[str], bool] | None = None) -> str:
    """``token`` with every character a reader could not see or tell apart written visibly.

    The convention (the same in the PNG heatmaps and ``layer_map.md``): a space is ``␣``, a newline
    ``↵``, a tab ``⇥``; any other character that is not printable (control characters, format
    characters such as the zero-width non-joiner U+200C, other spaces such as U+00A0, unassigned
    or private-use code points) is ``⟨U+XXXX⟩``, as are the characters ``␣``, ``↵``, ``⇥`` and
    ``⟨`` themselves, so that no escape can be mistaken for a token's own text. An empty token is
    ``⟨empty⟩``. Every other character, ``?`` included, is itself.

    Args:
        token: a decoded token.
        has_glyph: whether the font that draws the text has a glyph for a character; characters
            it lacks are written ``⟨U+XXXX⟩`` instead of drawn as empty boxes (``None``: every
            printable character is kept, as text output wants).

    Returns:
        The visible form.

    Example:
        >>> visible_token(" is\\u200c?\\n")
        '␣is⟨U+200C⟩?↵'
    """
    if token == "":
        return EMPTY_TOKEN
    out = []
    for ch in token:
        if ch in VISIBLE:
            out.append(VISIBLE[ch])
        elif ch in _RESERVED or not ch.isprintable() or (has_glyph is not None and not has_glyph(ch)):
            out.append(_codepoint(ch))
        else:
            out.append(ch)
    return "".join(out)


#: Characters the escapes use, escaped themselves when a token holds them.
_RESERVED = frozenset(VISIBLE.values()) | {"\u27e8"}


def _cut(label: str, width: int) -> str:
    """``label`` cut to ``width`` characters, an ellipsis last where it was longer (an escape is
    never cut in half: it goes whole or not at all)."""
    if len(label) <= width:
        return label
    kept, size = [], 0
    for piece in re.findall(r"\u27e8[^\u27e9]*\u27e9|.", label, flags=re.S):
        if size + len(piece) > width - 1:
            break
        kept.append(piece)
        size += len(piece)
    return "".join(kept) + "\u2026"


def _show(token: str | None, width: int = 12, has_glyph: Callable[[str], bool] | None = None) -> str:
    """A token as a short, visible label (see :func:`visible_token`); ``(end)`` after the text."""
    if token is None:
        return "(end)"
    return _cut(visible_token(token, has_glyph), width)


def _width(text: str) -> int:
    """Columns ``text`` takes: two for a wide (CJK) character, one for any other."""
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _wrapped(token: str, has_glyph: Callable[[str], bool] | None, line: int, lines: int) -> str:
    """A grid cell: the visible token on up to ``lines`` lines of ``line`` columns (an escape kept
    whole), ``…`` closing the last line where the token is longer."""
    pieces = re.findall(r"\u27e8[^\u27e9]*\u27e9|.", visible_token(token, has_glyph), flags=re.S)
    rows: list[list[str]] = [[]]
    for piece in pieces:
        if rows[-1] and _width("".join(rows[-1]) + piece) > line:
            rows.append([])
        rows[-1].append(piece)
    if len(rows) > lines:
        last: list[str] = []
        for piece in rows[lines - 1]:
            if _width("".join(last) + piece) > line - 1:
                break
            last.append(piece)
        rows = rows[: lines - 1] + [last + ["\u2026"]]
    return "\n".join("".join(row) for row in rows)


#: Fonts tried, in this order, for characters the default font lacks: Noto's sans families first
#: (the plain one, then CJK), then its serif ones. Debian: fonts-noto-core, fonts-noto-cjk.
_FONT_FILE = re.compile(r"^Noto(Sans|Serif)(\w*?)(-Regular)?\.(ttf|otf|ttc)$")


def _font_rank(path: str) -> tuple:
    name = os.path.basename(path)
    match = _FONT_FILE.match(name)
    if match is None:
        return (9, name)
    kind, script = match.group(1), match.group(2)
    sans = 0 if kind == "Sans" else 1
    if script == "":
        return (sans, 0, name)
    if script.startswith("CJK"):
        return (sans, 1, name)
    if "Mono" in script or "Display" in script or "UI" in script:
        return (sans, 3, name)  # the same glyphs as another family, drawn otherwise
    return (sans, 2, name)


@functools.cache
def _charmap(path: str) -> frozenset[int]:
    from matplotlib.ft2font import FT2Font

    return frozenset(FT2Font(path).get_charmap())


@functools.cache
def _candidate_fonts() -> tuple[str, ...]:
    """Installed Noto font files (regular weight), in the order :data:`_FONT_FILE` ranks them."""
    from matplotlib import font_manager

    try:
        paths = font_manager.findSystemFonts()
    except Exception:  # a broken fontconfig must not keep a map from being drawn
        return ()
    found = [p for p in paths if _FONT_FILE.match(os.path.basename(p))]
    return tuple(sorted(set(found), key=_font_rank))


@dataclass(frozen=True)
class FontPlan:
    """The fonts that draw a set of characters, and which characters none of them has.

    Attributes:
        families: font family names for matplotlib's per-glyph fallback, the default font first.
        covered: the code points some family in ``families`` draws.
    """

    families: tuple[str, ...]
    covered: frozenset[int]

    def has_glyph(self, ch: str) -> bool:
        """Whether some family draws ``ch``."""
        return ord(ch) in self.covered


def font_plan(chars: Iterable[str], candidates: Sequence[str] | None = None) -> FontPlan:
    """Fonts for drawing ``chars``: matplotlib's default (DejaVu Sans), then, for characters it
    lacks, the first installed Noto font that has each (Noto Sans, Noto Sans CJK, then one per
    script: Bengali, Devanagari, Telugu, ...). The fonts chosen are registered with matplotlib's
    font manager (its cached list may predate them).

    Args:
        chars: the characters to draw.
        candidates: font files to choose from (default: the installed Noto fonts); none at all
            leaves the default font alone, and characters it lacks are then escaped.

    Returns:
        A :class:`FontPlan`; a failure to read fonts gives the default font alone, never an error.
    """
    from matplotlib import font_manager

    try:
        default = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"))
        covered = set(_charmap(default))
    except Exception:
        return FontPlan(("DejaVu Sans",), frozenset(range(0x2E80)))  # its coverage, roughly
    missing = {ord(c) for c in chars if c.isprintable()} - covered
    families = ["DejaVu Sans"]
    for path in candidates if candidates is not None else _candidate_fonts():
        if not missing:
            break
        try:
            found = _charmap(path)
        except Exception:
            continue
        if not missing & found:
            continue
        try:
            if not any(f.fname == path for f in font_manager.fontManager.ttflist):
                font_manager.fontManager.addfont(path)
            name = font_manager.FontProperties(fname=path).get_name()
        except Exception:
            continue
        families.append(name)
        covered |= found
        missing -= found
    return FontPlan(tuple(dict.fromkeys(families)), frozenset(covered))


def _save_heatmap(fig: Any, ax: Any, image: Any, path: Path) -> Path:
    """Add the colour bar, write the figure to ``path`` and close it."""
    import matplotlib.pyplot as plt

    fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


#: Top-token grid: inches per column, characters per line of a cell, lines per cell, font size.
GRID_CELL_IN = 0.62
GRID_LINE_CHARS = 8
GRID_LINES = 2
GRID_FONT_PT = 6.5


def plot_layer_map(result: LayerMap, out: str | Path) -> dict[str, Path]:
    """Two heatmaps of a :class:`LayerMap`, sized to stay readable at 60 tokens x 32 layers.

    ``divergence.png``: divergence from the final layer, layers (rows) by predicted token
    (columns), DoLa's chosen layer marked with a dot in each column. ``top_tokens.png``: each
    layer's top token written in its cell (the final layer on top; up to two lines of eight
    characters, ``…`` where cut: ``layer_map.md`` has every token whole), coloured by its
    probability. Tokens are written by :func:`visible_token` (``␣`` space, ``↵`` newline,
    ``⟨U+200C⟩`` an invisible character), in DejaVu Sans with per-glyph fallback to the installed
    Noto fonts (:func:`font_plan`); a character no installed font draws is written ``⟨U+XXXX⟩``.

    Returns:
        ``{"divergence_png": path, "top_tokens_png": path}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    cols = len(result.positions)
    labels = result.top_tokens + [result.final_top_tokens]
    following = [result.next_token(c) for c in range(cols)]
    chars = {ch for row in labels for token in row for ch in token}
    plan = font_plan(chars | {ch for token in following if token for ch in token})
    # Every token is drawn as text, never as mathtext ("$" is a token like any other).
    text_style = {"fontfamily": list(plan.families), "parse_math": False}
    xlabels = [_show(t, 12, plan.has_glyph) for t in following]
    paths = {}

    rows = len(result.layers)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.42 * cols + 2.5), max(3.5, 0.22 * rows + 2.0)))
    values = np.array(result.divergence, dtype=float)
    # Divergences span orders of magnitude (the first positions, where the attention sink forms,
    # diverge hundreds of times more than the rest): a log scale keeps the other columns visible.
    positive = values[values > 0]
    norm = None
    if positive.size and positive.max() > 20 * positive.min():
        norm = matplotlib.colors.LogNorm(vmin=float(positive.min()), vmax=float(positive.max()))
        values = np.clip(values, float(positive.min()), None)
    image = ax.imshow(
        values, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest", norm=norm
    )
    row_of = {layer: i for i, layer in enumerate(result.layers)}
    picks = [(c, row_of[j]) for c, j in enumerate(result.dola_choice) if j in row_of]
    if picks:
        xs, ys = zip(*picks, strict=True)
        ax.scatter(xs, ys, s=18, c="red", marker="o", label="DoLa's premature layer")
        ax.legend(loc="upper left", bbox_to_anchor=(1.06, 1.0), fontsize=8)
    ax.set_xticks(range(cols), xlabels, rotation=90, fontsize=8, **text_style)
    ax.set_yticks(range(rows), [str(j) for j in result.layers], fontsize=7)
    ax.set_xlabel("token being predicted (\u2423 space, \u21b5 newline, \u27e8U+XXXX\u27e9 invisible)")
    ax.set_ylabel("early-exit layer")
    kind = "DoLa's divergence" if result.divergence_kind == "reference" else "Jensen-Shannon divergence"
    ax.set_title(
        f"{kind} from the final layer (nats, summed over the vocabulary"
        + (", log colour scale); " if norm else "); ")
        + f"dots: DoLa's choice in dola_layers={result.dola_layers!r}"
        + (", final norm on" if result.final_norm else ""),
        fontsize=9,
    )
    paths["divergence_png"] = _save_heatmap(fig, ax, image, folder / "divergence.png")

    grid_rows = rows + 1
    height = max(3.5, 0.11 * GRID_LINES * grid_rows + 2.2)
    fig, ax = plt.subplots(figsize=(max(6.0, GRID_CELL_IN * cols + 2.5), height))
    probs = np.array(result.top_probs + [result.final_top_probs], dtype=float)
    image = ax.imshow(
        probs, aspect="auto", origin="lower", cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest"
    )
    for r in range(grid_rows):
        for c in range(cols):
            colour = "white" if probs[r, c] > 0.6 else "black"
            cell = _wrapped(labels[r][c], plan.has_glyph, GRID_LINE_CHARS, GRID_LINES)
            ax.text(
                c, r, cell, ha="center", va="center", fontsize=GRID_FONT_PT, color=colour,
                linespacing=1.0, **text_style,
            )
    ax.set_xticks(range(cols), xlabels, rotation=90, fontsize=8, **text_style)
    ax.set_yticks(
        range(grid_rows), [str(j) for j in result.layers] + [f"{result.num_layers} (final)"], fontsize=7
    )
    ax.set_xlabel("token being predicted (\u2423 space, \u21b5 newline, \u27e8U+XXXX\u27e9 invisible)")
    ax.set_ylabel("layer")
    ax.set_title(
        "each layer's top token (logit lens), coloured by its probability"
        + (", final norm on" if result.final_norm else ", raw head")
        + "; \u2026 cut (layer_map.md has every token whole)",
        fontsize=9,
    )
    paths["top_tokens_png"] = _save_heatmap(fig, ax, image, folder / "top_tokens.png")
    return paths
