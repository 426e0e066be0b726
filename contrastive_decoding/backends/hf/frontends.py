"""The transformers front-ends of a strategy class, derived from its one declaration.

A strategy's ``__init__`` declares its parameters once; :func:`logits_processor_class` and
:func:`generate_function` build, from that signature alone, the ``*LogitsProcessor`` for stock
``generate`` and the ``custom_generate`` loop, each taking the same parameters with the same
defaults. The library's named front-ends (``DoLaLogitsProcessor``, ``dola_generate``, ...) are built
here; a user strategy gets its own the same way (or by name: ``ContrastLogitsProcessor(model,
"my-strategy")``, ``generate(custom_generate=strategy_generate, strategy="my-strategy")``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from contrastive_decoding.backends.hf.generation import strategy_generate
from contrastive_decoding.backends.hf.processor import ContrastLogitsProcessor
from contrastive_decoding.core.contract import ContrastStrategy, declared_parameters

__all__ = ["generate_function", "logits_processor_class"]

# What `generate` hands every custom loop, before the strategy's own parameters.
_LOOP_PARAMETERS = [
    inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
    for name, default in [
        ("model", inspect.Parameter.empty),
        ("input_ids", inspect.Parameter.empty),
        ("logits_processor", inspect.Parameter.empty),
        ("stopping_criteria", inspect.Parameter.empty),
        ("generation_config", inspect.Parameter.empty),
        ("synced_gpus", False),
        ("streamer", None),
    ]
]


def _strategy_parameters(strategy_class: type[ContrastStrategy], kind) -> list[inspect.Parameter]:
    return [p.replace(kind=kind) for p in declared_parameters(strategy_class).values()]


def _args_section(strategy_class: type[ContrastStrategy]) -> str:
    """The ``Args:`` entries of the strategy's docstring (the parameters' one description)."""
    doc = inspect.getdoc(strategy_class) or ""
    if "Args:" not in doc:
        return ""
    section = doc.split("Args:", 1)[1]
    lines = []
    for line in section.splitlines()[1:]:
        if line and not line.startswith(" "):
            break
        lines.append(line)
    return "\n".join(lines).rstrip()


def logits_processor_class(
    strategy_class: type[ContrastStrategy],
    name: str | None = None,
    classifier_first: bool = False,
    module: str | None = None,
) -> type[ContrastLogitsProcessor]:
    """A :class:`ContrastLogitsProcessor` subclass taking ``strategy_class``'s own parameters.

    ``Processor(model, *args, tokenizer=None, classifier=None, **params)`` builds
    ``strategy_class(*args, **params)`` (validated before anything attaches) and attaches it.

    Args:
        strategy_class: a :class:`~contrastive_decoding.ContrastStrategy` subclass.
        name: the class name (default ``<Strategy>LogitsProcessor``).
        classifier_first: take the token classifier as the second positional argument
            (``LayerCakeLogitsProcessor(model, tokenizer, ...)``, its historical signature).
        module: the module the class is found in (default: the strategy's).
    """
    name = name or f"{strategy_class.__name__}LogitsProcessor"

    def __init__(self, model: nn.Module, *args: Any, tokenizer=None, classifier=None, **params: Any) -> None:
        if classifier_first and args:
            if classifier is not None:
                raise TypeError(f"{name} got `classifier` twice (positionally and by keyword).")
            classifier, args = args[0], args[1:]
        ContrastLogitsProcessor.__init__(
            self, model, strategy_class(*args, **params), tokenizer=tokenizer, classifier=classifier
        )

    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    keyword = inspect.Parameter.KEYWORD_ONLY
    head = [
        inspect.Parameter("self", positional),
        inspect.Parameter("model", positional, annotation="nn.Module"),
    ]
    if classifier_first:
        head.append(inspect.Parameter("classifier", positional, default=None))
    tail = [inspect.Parameter("tokenizer", keyword, default=None)]
    if not classifier_first:
        tail.append(inspect.Parameter("classifier", keyword, default=None))
    own = _strategy_parameters(strategy_class, keyword if classifier_first else positional)
    __init__.__signature__ = inspect.Signature(head + own + tail)
    __init__.__doc__ = f"Build a {strategy_class.__name__} from these arguments and attach it to ``model``."
    doc = (
        f"{strategy_class.__name__} as a ``LogitsProcessor`` for stock ``model.generate``; see\n"
        f":class:`~contrastive_decoding.ContrastLogitsProcessor` for the lifecycle (``with``, inline,\n"
        f":meth:`detach`) and :class:`~contrastive_decoding.{strategy_class.__name__}` for the method.\n\n"
        "Args:\n"
        "    model: the causal LM that ``generate`` runs.\n"
        f"{_args_section(strategy_class)}\n"
        "    tokenizer: the model's tokenizer (token classes of degraded streams, amateur prompts).\n"
        "    classifier: token classes of degraded streams, if not the tokenizer's.\n"
    )
    namespace = {
        "__init__": __init__,
        "__doc__": doc,
        "__module__": module or strategy_class.__module__,
        "strategy_class": strategy_class,
    }
    return type(name, (ContrastLogitsProcessor,), namespace)


def generate_function(
    strategy_class: type[ContrastStrategy], name: str | None = None, module: str | None = None
) -> Callable[..., Any]:
    """A ``custom_generate`` callable running ``strategy_class`` with parameters ``generate`` forwards.

    ``model.generate(ids, custom_generate=loop, <strategy parameters>, classifier=..., ...)``:
    ``generate`` routes the keywords the loop's signature names to it (the strategy's parameters,
    ``classifier`` and ``strategy_tokenizer`` for degraded streams and amateur prompts) and runs
    :func:`~contrastive_decoding.contrast_generate`; the configured logits processors (e.g.
    ``repetition_penalty=1.2``) act on the contrasted scores.
    """
    own = declared_parameters(strategy_class)
    name = name or f"{strategy_class.__name__.lower()}_generate"

    def loop(
        model,
        input_ids,
        logits_processor,
        stopping_criteria,
        generation_config,
        synced_gpus=False,
        streamer=None,
        **kwargs: Any,
    ):
        params = {k: kwargs.pop(k) for k in list(kwargs) if k in own}
        return strategy_generate(
            model,
            input_ids,
            logits_processor,
            stopping_criteria,
            generation_config,
            synced_gpus,
            streamer,
            strategy=strategy_class(**params),
            **kwargs,
        )

    keyword = inspect.Parameter.KEYWORD_ONLY
    extra = [
        inspect.Parameter("classifier", keyword, default=None),
        inspect.Parameter("strategy_tokenizer", keyword, default=None),
        inspect.Parameter("model_kwargs", inspect.Parameter.VAR_KEYWORD),
    ]
    own_parameters = _strategy_parameters(strategy_class, keyword)
    loop.__signature__ = inspect.Signature(_LOOP_PARAMETERS + own_parameters + extra)
    loop.__name__ = loop.__qualname__ = name
    loop.__module__ = module or strategy_class.__module__
    loop.__doc__ = (
        f"{strategy_class.__name__} decoding as a ``custom_generate`` callable (greedy search and "
        "sampling).\n\n"
        f"``model.generate(ids, custom_generate={name}, ...)`` takes "
        f":class:`~contrastive_decoding.{strategy_class.__name__}`'s parameters as keywords, plus "
        "``classifier=`` (token classes of degraded streams) and ``strategy_tokenizer=`` (amateur "
        "prompts). With ``return_dict_in_generate=True`` the output carries ``premature_layers`` for "
        "strategies that choose a layer.\n\n"
        "Args:\n"
        f"{_args_section(strategy_class)}\n"
    )
    loop.strategy_class = strategy_class
    return loop
