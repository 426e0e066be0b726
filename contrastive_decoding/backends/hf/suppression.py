"""Suppress attention to chosen classes of tokens in chosen layers, without patching model code.

:class:`AttentionSuppression` registers an attention function and its mask builder with
transformers' ``AttentionInterface`` / ``AttentionMaskInterface``, switches the model to it for the
duration of a ``with`` block and switches it back on exit (also after an exception). In a layer
with a suppression rule, the attention of each suppressed query row to the keys of the rule's token
classes is removed (hard mask) or lowered by an additive bias before the softmax; every other layer
runs the model's own sdpa/eager attention untouched.

Token classes are tracked by a forward pre-hook on the decoder that sees each call's new
``input_ids`` (the cache grows by exactly those tokens), so the keys to suppress are known during
cached generation, with left padding (padding is never classified) and with sliding-window layers
(the keys a layer sees are always the suffix of the sequence).

The batch may hold several *streams*, equal groups of rows with the same tokens and their own rules
(stream 0 is often left intact): this is how a degraded stream runs beside the normal one in one
forward pass, each row with its own KV cache.
"""

from __future__ import annotations

import copy
import sys
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from contrastive_decoding.backends.hf.cache_names import cache_from
from contrastive_decoding.backends.hf.readout import LayerReadout
from contrastive_decoding.core.specs import (
    QUERY_ROWS,
    SUPPRESSION_MODES,
    SuppressionRule,
    check_layer_indices,
)
from contrastive_decoding.core.token_classes import NO_CLASS, TOKEN_CLASSES, make_classifier

__all__ = ["AttentionSuppression"]

_BASES = ("sdpa", "eager")
_NAME = "contrastive_decoding_{}"

# Each attention module of an active suppression -> (suppression, layer index). Weak keys so a
# model that is garbage-collected inside a block leaves nothing behind.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, tuple[AttentionSuppression, int]] = weakref.WeakKeyDictionary()


def _base_attention(base: str, module: nn.Module):
    if base == "sdpa":
        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    return sys.modules[type(module).__module__].eager_attention_forward


def _make_attention(base: str):
    def attention(module, query, key, value, attention_mask, **kwargs):
        entry = _ACTIVE.get(module)
        fn = _base_attention(base, module)
        if entry is None:
            return fn(module, query, key, value, attention_mask, **kwargs)
        suppression, layer = entry
        return suppression._attend(fn, layer, module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"suppressed_{base}_attention"
    return attention


def _register() -> None:
    for base, mask_fn in (("sdpa", sdpa_mask), ("eager", eager_mask)):
        name = _NAME.format(base)
        if name not in AttentionInterface._global_mapping:
            AttentionInterface.register(name, _make_attention(base))
            AttentionMaskInterface.register(name, mask_fn)


@dataclass
class _Plan:
    """The suppressed classes per stream in one layer: always, and gated by attention mass."""

    always: torch.Tensor  # (streams, classes) bool
    gated: tuple[tuple[torch.Tensor, float], ...]
    key: tuple[bool, ...] = ()  # layers with the same table share one mask per forward

    def __post_init__(self) -> None:
        self.key = tuple(self.always.flatten().tolist())


class _RowTokens:
    """One row's token history and its incremental classifier state."""

    def __init__(self, classifier) -> None:
        self.classifier = classifier
        self.ids: list[int] = []
        self.real: list[bool] = []
        self.positions: list[int] = []  # positions of real tokens
        self.state = classifier.start()

    def push(self, token_id: int, real: bool) -> None:
        self.ids.append(token_id)
        self.real.append(real)
        if real:
            self.positions.append(len(self.ids) - 1)
            self.classifier.push(self.state, token_id)

    def copy(self) -> _RowTokens:
        """An independent copy of this row that shares its classifier (never modified; deep-copying
        it would copy the tokenizer too, once per continuation row of every scored item)."""
        row = _RowTokens.__new__(_RowTokens)
        row.classifier = self.classifier
        row.ids, row.real, row.positions = list(self.ids), list(self.real), list(self.positions)
        row.state = copy.deepcopy(self.state)
        return row

    def truncated(self, length: int) -> _RowTokens:
        row = _RowTokens(self.classifier)
        for token_id, real in zip(self.ids[:length], self.real[:length], strict=True):
            row.push(token_id, real)
        return row

    def labels(self, width: int) -> torch.Tensor:
        """Classes of keys ``0..width-1`` seen from the last token (padding: ``NO_CLASS``)."""
        out = torch.full((width,), NO_CLASS, dtype=torch.int8)
        if self.positions:
            labels = self.classifier.snapshot(self.state)
            out[torch.tensor(self.positions)] = torch.tensor(labels, dtype=torch.int8)
        return out


class AttentionSuppression:
    """Context manager: suppress attention to token classes in chosen layers, per stream of rows.

    On entry the model's attention implementation (sdpa or eager) is swapped for a registered
    wrapper and a pre-hook on the decoder tracks token classes; on exit both are undone, leaving the
    model exactly as it was (also after an exception). Every argument is checked before anything is
    attached.

    Args:
        model: a causal LM using ``attn_implementation="sdpa"`` or ``"eager"``.
        classifier: the model's tokenizer (built-in word-aware heuristic), a
            :class:`~contrastive_decoding.TokenClassifier`, or a callable mapping a list of token ids
            to one class per id.
        streams: per stream, its list of :class:`SuppressionRule`; the batch's rows are split into
            ``len(streams)`` equal groups, group ``s`` following ``streams[s]``. A flat list of rules
            means one stream (every row suppressed alike).
        mode: ``"mask"`` removes suppressed keys (a query row whose visible keys would all be
            suppressed is left intact); ``"bias"`` adds ``bias`` to their pre-softmax scores.
        bias: the additive bias for ``mode="bias"`` (negative).
        query_rows: ``"generated"`` suppresses only query rows that predict new tokens (the last
            prompt token onwards), as LayerCake does; ``"all"`` suppresses every query row.

    Attributes:
        suppress_from: for ``"generated"``, the absolute position of the first suppressed query row;
            ``None`` (default) means the last token of each sequence's first forward (the prompt).
            Teacher-forced scoring sets it to the position that predicts the first answer token.

    Example:
        >>> from contrastive_decoding import AttentionSuppression, SuppressionRule  # doctest: +SKIP
        >>> rules = [SuppressionRule("punctuation", layers=range(1, 6))]  # doctest: +SKIP
        >>> with AttentionSuppression(model, tokenizer, rules):  # doctest: +SKIP
        ...     degraded = model.generate(**inputs, max_new_tokens=20)
    """

    def __init__(
        self,
        model: nn.Module,
        classifier,
        streams: Sequence[SuppressionRule] | Sequence[Sequence[SuppressionRule]],
        mode: Literal["mask", "bias"] = "mask",
        bias: float = -100.0,
        query_rows: Literal["generated", "all"] = "generated",
    ) -> None:
        self.readout = LayerReadout.from_model(model)
        self.model = model
        streams = list(streams)
        if streams and all(isinstance(r, SuppressionRule) for r in streams):
            streams = [streams]
        if not streams or not all(
            isinstance(rules, (list, tuple)) and all(isinstance(r, SuppressionRule) for r in rules)
            for rules in streams
        ):
            raise ValueError(
                "`streams` must be a list of SuppressionRule (one stream) or a list of such lists "
                "(one per stream of rows)."
            )
        if mode not in SUPPRESSION_MODES:
            raise ValueError(f"`mode` must be one of {SUPPRESSION_MODES}, got {mode!r}.")
        if not (isinstance(bias, (int, float)) and bias < 0 and bias != float("-inf")):
            raise ValueError(
                f"`bias` must be a finite negative number, got {bias!r}; use mode='mask' to remove keys."
            )
        if query_rows not in QUERY_ROWS:
            raise ValueError(f"`query_rows` must be one of {QUERY_ROWS}, got {query_rows!r}.")
        n = self.readout.num_layers
        for rules in streams:
            for rule in rules:
                if rule.layers:  # a rule on no layer is allowed: it suppresses nothing
                    check_layer_indices(list(rule.layers), n, argument="SuppressionRule.layers")
        self.base = self._check_backend(any(rule.gate is not None for rules in streams for rule in rules))
        self.classifier = make_classifier(classifier)
        self.streams = [list(rules) for rules in streams]
        self.mode = mode
        self.bias = float(bias)
        self.query_rows = query_rows
        self.suppress_from: int | None = None
        self._query_start = 0
        self._plans = self._build_plans(n)
        self._handles: list[RemovableHandle] = []
        self._saved_impl: str | None = None
        self._rows: list[_RowTokens] = []
        self._length = 0
        self._labels: torch.Tensor | None = None  # (rows, queries, keys) of the current forward
        self._masks: dict[tuple[bool, ...], torch.Tensor | None] = {}
        self._merged: dict[tuple, tuple] = {}

    def _check_backend(self, gated: bool) -> str:
        impl = getattr(self.model.config, "_attn_implementation", None) or "eager"
        name = type(self.model).__name__
        if impl.startswith(_NAME.format("")):
            raise ValueError(
                f"{name} is already inside an AttentionSuppression; give all streams to one instead."
            )
        if "flash" in impl:
            raise ValueError(
                f"{name} uses attn_implementation={impl!r}, which cannot take a per-key bias; load it with "
                "attn_implementation='sdpa' or 'eager' (or call model.set_attn_implementation('sdpa'))."
            )
        if impl not in _BASES:
            raise ValueError(
                f"{name} uses attn_implementation={impl!r}; attention suppression supports 'sdpa' and "
                "'eager' (call model.set_attn_implementation('sdpa') first)."
            )
        if gated and impl != "eager":
            raise ValueError(
                "A SuppressionRule with `gate` needs the attention weights, i.e. "
                f"attn_implementation='eager' ({name} uses {impl!r}); call "
                "model.set_attn_implementation('eager') or drop the gate."
            )
        modeling = sys.modules[type(self.readout.layers[0]).__module__]
        if impl == "eager" and not hasattr(modeling, "eager_attention_forward"):
            raise ValueError(
                f"{name}'s modeling code has no eager_attention_forward; use attn_implementation='sdpa'."
            )
        return impl

    def _build_plans(self, num_layers: int) -> dict[int, _Plan]:
        plans = {}
        n_classes = len(TOKEN_CLASSES)
        for layer in range(num_layers):
            always = torch.zeros(len(self.streams), n_classes, dtype=torch.bool)
            gated = []
            for s, rules in enumerate(self.streams):
                for rule in rules:
                    if layer not in rule.layers:
                        continue
                    if rule.gate is None:
                        always[s, list(rule.classes)] = True
                    else:
                        table = torch.zeros(len(self.streams), n_classes, dtype=torch.bool)
                        table[s, list(rule.classes)] = True
                        gated.append((table, rule.gate))
            if always.any() or gated:
                plans[layer] = _Plan(always, tuple(gated))
        return plans

    # -- attach / detach ------------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        return self._saved_impl is not None

    def __enter__(self) -> AttentionSuppression:
        if self.attached:
            raise RuntimeError("This AttentionSuppression is already active; use one `with` block at a time.")
        _register()
        model = self.model
        self._saved_impl = model.config._attn_implementation
        try:
            target = _NAME.format(self.base)
            model.set_attn_implementation(target)
            if model.config._attn_implementation != target:
                raise ValueError(
                    f"{type(model).__name__} does not dispatch attention through transformers' "
                    "AttentionInterface, so its attention cannot be suppressed."
                )
            decoder = self.readout.decoder or model
            self._handles.append(decoder.register_forward_pre_hook(self._on_forward, with_kwargs=True))
            for layer, block in enumerate(self.readout.layers):
                for module in block.modules():
                    _ACTIVE[module] = (self, layer)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for block in self.readout.layers:
            for module in block.modules():
                if _ACTIVE.get(module, (None,))[0] is self:
                    del _ACTIVE[module]
        if self._saved_impl is not None:
            if self.model.config._attn_implementation != self._saved_impl:
                self.model.set_attn_implementation(self._saved_impl)
            self._saved_impl = None
        self._rows, self._length, self._labels = [], 0, None
        self._masks.clear()
        self._merged.clear()

    # -- token tracking -------------------------------------------------------------------------

    def _on_forward(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError(
                "AttentionSuppression needs `input_ids` to classify tokens; a forward with only "
                "`inputs_embeds` cannot be suppressed by token class."
            )
        rows, width = input_ids.shape
        cache = cache_from(kwargs)
        past = cache.get_seq_length() if cache is not None else 0
        mask = kwargs.get("attention_mask")
        real = mask[:, -width:].bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._masks.clear()
        self._merged.clear()
        self._labels = self._track(input_ids, real, past)

    def _track(self, input_ids: torch.Tensor, real: torch.Tensor | None, past: int) -> torch.Tensor | None:
        """Append this call's tokens; the classes seen by each suppressed query, ``(R, Q, K)``."""
        n_streams = len(self.streams)
        rows, width = input_ids.shape
        if rows % n_streams:
            raise RuntimeError(
                f"The batch has {rows} rows, not a multiple of the {n_streams} streams of this "
                "AttentionSuppression."
            )
        distinct = rows // n_streams  # streams repeat the same tokens: classify one group only
        ids = input_ids[:distinct].tolist()
        if past == 0:
            # Without a cache, generate re-feeds the whole sequence each step: rows generated so far
            # stay "generated" rows, so uncached decoding suppresses what cached decoding did.
            extends = (
                self._length > 0
                and len(self._rows) == distinct
                and width > self._length
                and all(row.ids == ids[r][: self._length] for r, row in enumerate(self._rows))
            )
            self._rows = [_RowTokens(self.classifier) for _ in range(distinct)]
            self._length = 0
            if self.query_rows == "all":
                self._query_start = 0
            elif not extends:
                self._query_start = width - 1 if self.suppress_from is None else self.suppress_from
        elif past < self._length:
            self._rows = [row.truncated(past) for row in self._rows]  # a rolled-back or copied cache
            self._length = past
        elif past > self._length:
            raise RuntimeError(
                f"The KV cache holds {past} tokens but AttentionSuppression saw {self._length}; enter it "
                "before the first forward pass of the sequence."
            )
        if distinct != len(self._rows) and self._rows and len(self._rows) % distinct == 0:
            # Fewer rows on a rolled-back cache: fine if the dropped rows were copies (scoring chunks).
            group = len(self._rows) // distinct
            heads = self._rows[::group]
            if all(row.ids == heads[i // group].ids for i, row in enumerate(self._rows)):
                self._rows = heads
        if distinct != len(self._rows):
            if not self._rows or distinct % len(self._rows):
                raise RuntimeError(
                    f"The batch changed from {len(self._rows)} to {distinct} rows per stream mid-sequence; "
                    "beam search and other row reorderings are not supported with attention suppression."
                )
            factor = distinct // len(self._rows)
            self._rows = [row.copy() for row in self._rows for _ in range(factor)]
        flags = real[:distinct].tolist() if real is not None else [[True] * width] * distinct
        total = past + width
        first = max(self._query_start - past, 0)
        labels = None
        if first < width:
            labels = torch.full((distinct, width, total), NO_CLASS, dtype=torch.int8)
        for r, row in enumerate(self._rows):
            for q in range(width):
                row.push(ids[r][q], flags[r][q])
                if labels is not None and q >= first and flags[r][q]:
                    labels[r, q, : past + q + 1] = row.labels(past + q + 1)
        self._length = total
        if labels is None:
            return None
        labels = labels.to(input_ids.device)
        return labels.repeat(n_streams, 1, 1) if n_streams > 1 else labels

    # -- attention ------------------------------------------------------------------------------

    def _suppressed(self, plan_table: torch.Tensor) -> torch.Tensor:
        """``(R, Q, K)`` bool: keys of the classes in ``plan_table`` (streams x classes), per row."""
        labels = self._labels
        rows = labels.shape[0]
        per_row = plan_table.to(labels.device).repeat_interleave(rows // plan_table.shape[0], dim=0)
        table = torch.cat([torch.zeros(rows, 1, dtype=torch.bool, device=labels.device), per_row], dim=1)
        index = (labels.long() + 1).view(rows, -1)  # NO_CLASS (-1) -> column 0, never suppressed
        return table.gather(1, index).view_as(labels)

    def _attend(self, fn, layer, module, query, key, value, attention_mask, **kwargs):
        plan = self._plans.get(layer)
        if plan is None or self._labels is None:
            return fn(module, query, key, value, attention_mask, **kwargs)
        rows, q_len, k_len = query.shape[0], query.shape[-2], key.shape[-2]
        labels = self._labels
        if labels.shape[0] != rows or labels.shape[1] != q_len or labels.shape[2] < k_len:
            raise RuntimeError(
                f"Layer {layer} attends with {rows} rows, {q_len} queries and {k_len} keys, but the "
                f"suppression tracked {tuple(labels.shape)}; was the forward run outside its decoder?"
            )
        if not plan.gated:
            # Layers with the same plan and the same mask object (all full-attention layers, all
            # sliding ones) get the same merged mask: build it once per forward.
            merge_key = (plan.key, id(attention_mask), k_len)
            if merge_key not in self._merged:
                # The mask is kept with the result so its id cannot be reused within the forward.
                merged = self._merge(self._class_keys(plan), attention_mask, rows, q_len, k_len, query.dtype)
                self._merged[merge_key] = (attention_mask, merged)
            merged = self._merged[merge_key][1]
            return fn(module, query, key, value, attention_mask if merged is None else merged, **kwargs)
        sup = self._class_keys(plan)
        sup = None if sup is None else sup[:, :, -k_len:]
        _, weights = fn(module, query, key, value, attention_mask, **kwargs)
        mass = weights.float().mean(dim=1)  # (R, Q, K) head-averaged
        for table, threshold in plan.gated:
            keys = self._suppressed(table)[:, :, -k_len:]
            keep = (mass * keys).sum(-1) > threshold
            gated = keys & keep[..., None]
            sup = gated if sup is None else sup | gated
        merged = self._merge(sup, attention_mask, rows, q_len, k_len, query.dtype)
        return fn(module, query, key, value, attention_mask if merged is None else merged, **kwargs)

    def _class_keys(self, plan: _Plan) -> torch.Tensor | None:
        """``(R, Q, K)`` keys suppressed by the plan's ungated rules (``None``: none), once per forward."""
        if plan.key not in self._masks:
            self._masks[plan.key] = self._suppressed(plan.always) if plan.always.any() else None
        return self._masks[plan.key]

    def _merge(self, sup, attention_mask, rows: int, q_len: int, k_len: int, dtype) -> torch.Tensor | None:
        """The model's mask with the suppressed keys removed or biased; ``None`` if none is."""
        if sup is None:
            return None
        allowed = _allowed(attention_mask, rows, q_len, k_len, sup.device)
        sup = sup[:, None, :, -k_len:] & allowed
        if self.mode == "bias":
            return _as_float(allowed, dtype) + sup.to(dtype) * self.bias
        # Never leave a query row with nothing to attend to.
        emptied = ~(allowed & ~sup).any(-1, keepdim=True)
        new_mask = allowed & ~(sup & ~emptied)
        float_mask = isinstance(attention_mask, torch.Tensor) and attention_mask.is_floating_point()
        return _as_float(new_mask, dtype) if self.base == "eager" or float_mask else new_mask


def _allowed(attention_mask, rows: int, q_len: int, k_len: int, device) -> torch.Tensor:
    """Which keys each query may see, ``(R, 1, Q, K)`` bool, from any mask form the model passes."""
    if attention_mask is None:
        # Pure causal (sdpa skipped the mask): the queries are the last q_len of the k_len keys.
        q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
        allowed = torch.arange(k_len, device=device)[None, :] <= q_pos
        return allowed[None, None].expand(rows, 1, q_len, k_len)
    mask = attention_mask[..., :k_len]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask.expand(rows, 1, q_len, k_len)


def _as_float(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An additive mask: ``0`` where allowed, the dtype's minimum elsewhere."""
    floor = torch.finfo(dtype).min
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, floor)
