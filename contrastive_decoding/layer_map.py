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
import json
from collections.abc import Sequence
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

__all__ = ["LayerMap", "layer_map", "plot_layer_map"]


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

    def write(self, out: str | Path, plots: bool = True) -> dict[str, Path]:
        """Write ``layer_map.json``, ``layer_map.csv`` and (``plots``) ``divergence.png`` and
        ``top_tokens.png`` into the folder ``out`` (created if absent).

        Returns:
            The written paths by kind (``json``, ``csv``, ``divergence_png``, ``top_tokens_png``).
        """
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"json": folder / "layer_map.json", "csv": folder / "layer_map.csv"}
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


def _show(token: str | None, width: int = 8) -> str:
    """A token as a short, visible label: newlines and tabs escaped, a leading space as '_'."""
    if token is None:
        return "(end)"
    label = token.replace("\n", "\\n").replace("\t", "\\t")
    if label.startswith(" "):
        label = "_" + label[1:]
    # Control characters and scripts the default font (DejaVu Sans) lacks would draw as empty boxes.
    label = "".join(ch if ch.isprintable() and ord(ch) < 0x2E80 else "?" for ch in label)
    label = label.replace("$", r"\$")  # matplotlib would read $...$ as mathtext
    return label if len(label) <= width else label[: width - 1] + "~"


def _save_heatmap(fig: Any, ax: Any, image: Any, path: Path) -> Path:
    """Add the colour bar, write the figure to ``path`` and close it."""
    import matplotlib.pyplot as plt

    fig.colorbar(image, ax=ax, fraction=0.02, pad=0.01)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_layer_map(result: LayerMap, out: str | Path) -> dict[str, Path]:
    """Two heatmaps of a :class:`LayerMap`, sized to stay readable at 60 tokens x 32 layers.

    ``divergence.png``: divergence from the final layer, layers (rows) by predicted token
    (columns), DoLa's chosen layer marked with a dot in each column. ``top_tokens.png``: each
    layer's top token written in its cell (the final layer on top), coloured by its probability.
    Column labels are the tokens being predicted (``_`` marks a leading space).

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
    xlabels = [_show(result.next_token(c)) for c in range(cols)]
    width = max(6.0, 0.42 * cols + 2.5)
    paths = {}

    rows = len(result.layers)
    fig, ax = plt.subplots(figsize=(width, max(3.5, 0.22 * rows + 2.0)))
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
    ax.set_xticks(range(cols), xlabels, rotation=90, fontsize=8)
    ax.set_yticks(range(rows), [str(j) for j in result.layers], fontsize=7)
    ax.set_xlabel("token being predicted")
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
    fig, ax = plt.subplots(figsize=(width, max(3.5, 0.26 * grid_rows + 2.0)))
    probs = np.array(result.top_probs + [result.final_top_probs], dtype=float)
    image = ax.imshow(
        probs, aspect="auto", origin="lower", cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest"
    )
    labels = result.top_tokens + [result.final_top_tokens]
    for r in range(grid_rows):
        for c in range(cols):
            colour = "white" if probs[r, c] > 0.6 else "black"
            ax.text(c, r, _show(labels[r][c], 7), ha="center", va="center", fontsize=5.5, color=colour)
    ax.set_xticks(range(cols), xlabels, rotation=90, fontsize=8)
    ax.set_yticks(
        range(grid_rows), [str(j) for j in result.layers] + [f"{result.num_layers} (final)"], fontsize=7
    )
    ax.set_xlabel("token being predicted")
    ax.set_ylabel("layer")
    ax.set_title(
        "each layer's top token (logit lens), coloured by its probability"
        + (", final norm on" if result.final_norm else ", raw head"),
        fontsize=9,
    )
    paths["top_tokens_png"] = _save_heatmap(fig, ax, image, folder / "top_tokens.png")
    return paths
