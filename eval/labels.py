"""How the harness names a run: one function, used by ``table``, ``compare``, ``plot``, ``answers``,
``analyze`` and every ``summary.md``.

A run's label is read from the facts its summary records (``strategy``, ``strategy_params``,
``scoring_protocol``, ``generation``, ``model``), never from its folder's name:

``<strategy or preset>[<parameters that differ from the defaults>] (<protocol>[, <floor> floor])``

- the strategy is named by the preset whose parameters the run used (``dola-high``), else by its
  registry name (``dola``);
- the parameters are those whose recorded values differ from the strategy's (or preset's) current
  defaults, in the strategy's declared order, plus the generation repetition penalty when it is
  not the strategy's default (``baseline[repetition_penalty=1.2]``);
- the protocol is the multiple-choice scoring convention (``paper`` or ``normalized``), with the
  floor of implausible tokens under ``normalized`` (``fixed``: DoLa's -1000, the only floor before
  ``--floor relative`` existed; ``relative``). The plain model's ``loglik`` is left out (it has no
  other), and generation runs have no protocol.

Examples: ``dola-high (paper)``, ``dola-high (normalized, fixed floor)``,
``dola-high[final_norm=True] (normalized, relative floor)``, ``dola[dola_layers=15] (paper)``,
``baseline``, ``baseline[repetition_penalty=1.2]``.

Runs shown together whose labels would still be equal (:func:`run_labels`) get the facts that tell
them apart appended (``; n=200``, ``; model=...``), and, where none does, their folder.
A summary without ``strategy`` (or of a strategy this process does not know) keeps the
``strategy_label`` it recorded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

__all__ = [
    "EMBEDDED_MODELS",
    "FACTS",
    "model_name",
    "protocol_name",
    "run_label",
    "run_labels",
    "strategy_name",
]

#: Short model names the loader resolves itself, and what they are (a run records the name given).
EMBEDDED_MODELS = {"smollm2": "smollm2 (embedded SmolLM2-135M-Instruct)"}

#: Parameter values longer than this are cut (an ICD instruction is a paragraph); runs whose labels
#: then collide are told apart by :func:`run_labels`.
MAX_VALUE_CHARS = 40

#: The harness's plain model is no registered strategy; its generation has no repetition penalty.
_BASELINE = "baseline"


def _plain(value: Any) -> Any:
    """``value`` as JSON reads it back (tuples become lists), so recorded and declared values compare."""
    try:
        return json.loads(json.dumps(value))
    except (TypeError, ValueError):
        return repr(value)


def _text(value: Any) -> str:
    """A parameter value as the label writes it: ``True``, ``0.1``, ``[0.625,0.875]``, a cut string."""
    if isinstance(value, list):
        return "[" + ",".join(_text(v) for v in value) + "]"
    if isinstance(value, dict):
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    else:
        text = str(value)
    text = " ".join(text.split())  # a newline in an instruction would break a table's row
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 1] + "…"


#: strategy -> (declared defaults, default repetition penalty); preset -> (strategy, parameters).
_Registry = tuple[dict[str, tuple[dict[str, Any], float]], dict[str, tuple[str, dict[str, Any]]]]


@cache
def _registry() -> _Registry | None:
    """(strategy -> (defaults, repetition penalty), preset -> (strategy, parameters)), or ``None``
    when the library's registry cannot be imported (labels then fall back to the recorded ones)."""
    try:
        from contrastive_decoding.strategies import presets, registered_strategies
    except ImportError:
        return None
    infos = {
        name: ({k: _plain(v) for k, v in info.defaults.items()}, float(info.repetition_penalty))
        for name, info in registered_strategies().items()
    }
    infos.setdefault(_BASELINE, ({}, 1.0))
    preset_params = {
        name: (base, {k: _plain(v) for k, v in fixed.items()}) for name, (base, fixed) in presets().items()
    }
    return infos, preset_params


def _registry_now() -> _Registry | None:
    # Strategies registered since the first look (a user's, by --import) are known too.
    found = _registry()
    if found is not None:
        try:
            from contrastive_decoding.strategies import registered_strategies

            if set(registered_strategies()) - set(found[0]):
                _registry.cache_clear()
                found = _registry()
        except ImportError:
            pass
    return found


def strategy_name(summary: Mapping[str, Any]) -> str:
    """The strategy (or preset) and the parameters that distinguish the run, e.g.
    ``dola-high[final_norm=True]``.

    Args:
        summary: a run's ``summary.json`` (or ``run.json``) contents.

    Returns:
        The name; a summary without ``strategy``/``strategy_params``, or of a strategy this process
        has not registered, gives its recorded ``strategy_label``.
    """
    strategy = summary.get("strategy")
    params = summary.get("strategy_params")
    known = _registry_now() if isinstance(strategy, str) and isinstance(params, Mapping) else None
    if known is None or strategy not in known[0]:
        return str(summary.get("strategy_label") or strategy or "?")
    defaults, penalty = known[0][strategy]
    recorded = {k: _plain(v) for k, v in params.items()}
    name, expected = strategy, dict(defaults)
    # The preset the run's values match, the one fixing the most parameters first (dola-high).
    matching = [
        (len(fixed), preset, fixed)
        for preset, (base, fixed) in known[1].items()
        if base == strategy and all(k in recorded and recorded[k] == v for k, v in fixed.items())
    ]
    if matching:
        _, name, fixed = max(matching, key=lambda m: m[0])
        expected.update(fixed)
    differing = [f"{k}={_text(v)}" for k, v in recorded.items() if k not in expected or expected[k] != v]
    rp = (summary.get("generation") or {}).get("repetition_penalty")
    if isinstance(rp, (int, float)) and float(rp) != penalty:
        differing.append(f"repetition_penalty={rp:g}")
    return name + (f"[{','.join(differing)}]" if differing else "")


def protocol_name(summary: Mapping[str, Any]) -> str | None:
    """The scoring protocol with its floor where one applies: ``paper``, ``normalized, fixed floor``,
    ``normalized, relative floor``, ``loglik`` (the plain model); ``None`` for a generation run."""
    recorded = summary.get("scoring_protocol")
    if not recorded:
        return None
    protocol, _, rest = str(recorded).partition(" (")
    if protocol != "normalized":
        return str(recorded)
    # The runner names only a relative floor ("normalized (relative floor)"), so that runs made
    # before the option existed, all with DoLa's fixed -1000, kept their label.
    return "normalized, relative floor" if "relative" in rest else "normalized, fixed floor"


def run_label(summary: Mapping[str, Any], protocol: bool = True) -> str:
    """The run's label: :func:`strategy_name` and, with ``protocol``, the protocol and floor in
    parentheses (not the plain model's ``loglik``).

    Example:
        >>> run_label({"strategy_label": "dola-high", "scoring_protocol": "normalized"})
        'dola-high (normalized, fixed floor)'
    """
    name = strategy_name(summary)
    scoring = protocol_name(summary) if protocol else None
    return f"{name} ({scoring})" if scoring and scoring != "loglik" else name


def model_name(summary: Mapping[str, Any]) -> str:
    """The model as the run recorded it (a Hub id or the path given), the embedded one spelled out."""
    model = str(summary.get("model") or (summary.get("identity") or {}).get("model") or "?")
    return EMBEDDED_MODELS.get(model, model)


def _judge(summary: Mapping[str, Any]) -> str | None:
    judge = summary.get("judge")
    if not isinstance(judge, Mapping):
        return None
    truth, info = judge.get("truth"), judge.get("info")
    return str(truth) if info in (None, truth) else f"{truth}+{info}"


#: Facts that can tell runs with one label apart, in the order they are appended.
FACTS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "benchmark": lambda s: s.get("benchmark"),
    "model": model_name,
    "dtype": lambda s: s.get("dtype"),
    "protocol": protocol_name,
    "n": lambda s: s.get("n_items"),
    "max_new_tokens": lambda s: (s.get("generation") or {}).get("max_new_tokens"),
    "repetition_penalty": lambda s: (s.get("generation") or {}).get("repetition_penalty"),
    "judge": _judge,
    "data": lambda s: ((s.get("data") or {}).get("sha256") or "")[:8] or None,
}


def run_labels(
    summaries: Sequence[Mapping[str, Any]],
    folders: Sequence[str | Path | None] | None = None,
    protocol: bool = True,
    shown: Sequence[str] = (),
) -> list[str]:
    """Labels for runs shown together, each one telling its run apart from the others.

    Runs whose :func:`run_label` and ``shown`` facts are equal get appended, as ``; key=value``, each
    fact of :data:`FACTS` that differs among them; runs still equal then get their folder.

    Args:
        summaries: the runs' summaries, in display order.
        folders: their folders (same order); without one a run still equal to another is
            numbered (``; run 2``).
        protocol: put the protocol in the label (leave it out where a column shows it).
        shown: facts (keys of :data:`FACTS`) the display already shows beside the label, e.g. a
            table's ``benchmark`` and ``n`` columns: they tell rows apart without being appended.

    Returns:
        One label per summary.

    Example:
        >>> a = {"strategy_label": "dola-high", "scoring_protocol": "paper", "n_items": 817}
        >>> run_labels([a, {**a, "n_items": 200}])
        ['dola-high (paper); n=817', 'dola-high (paper); n=200']
    """
    labels = [run_label(s, protocol) for s in summaries]
    paths = list(folders) if folders is not None else [None] * len(summaries)
    if not protocol and "protocol" not in shown:
        shown = (*shown, "protocol")  # left out of the label only where a column shows it
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(summaries):
        key = (labels[i], *(json.dumps(_plain(FACTS[f](s))) for f in shown))
        groups.setdefault(key, []).append(i)
    out = list(labels)
    for members in groups.values():
        if len(members) < 2:
            continue
        extra: dict[int, list[str]] = {i: [] for i in members}
        for fact, read in FACTS.items():
            if fact in shown or (fact == "protocol" and protocol):
                continue
            values = {i: read(summaries[i]) for i in members}
            if len({json.dumps(_plain(v)) for v in values.values()}) > 1:
                for i in members:
                    value = values[i]
                    # In full: a model's path is what tells the runs apart.
                    extra[i].append(f"{fact}={'-' if value is None else value}")
        for i in members:
            out[i] = "; ".join([labels[i], *extra[i]])
        # Equal in every recorded fact (the same settings run twice, or a summary from before the
        # facts were recorded): only the folder tells them apart.
        seen: dict[str, list[int]] = {}
        for i in members:
            seen.setdefault(out[i], []).append(i)
        for same in seen.values():
            if len(same) > 1:
                for n, i in enumerate(same, 1):
                    where = str(paths[i]) if paths[i] is not None else f"run {n}"
                    out[i] = f"{out[i]}; {where}"
    return out
