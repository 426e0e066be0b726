"""A griffe extension for the API reference: the front-ends derived from a strategy's declaration.

``DoLaLogitsProcessor = logits_processor_class(DoLa, ...)`` and ``dola_generate =
generate_function(DoLa, ...)`` (``contrastive_decoding.backends.hf.named``) are a class and a
function built at import time, whose signature and docstring come from the strategy's ``__init__``
and its ``Args:``; static analysis sees only an assignment. For each module-level assignment of
such a call, this extension imports the module (the installed package) and puts a griffe object
made from the built one in the assignment's place, so the reference shows the signature and the
arguments the user actually gets.
"""

from __future__ import annotations

import ast
import importlib
import inspect

import griffe

DERIVING = {"logits_processor_class", "generate_function"}


def _derived(member: griffe.Object | griffe.Alias) -> bool:
    if member.is_alias or not member.is_attribute:
        return False
    try:
        node = ast.parse(str(member.value), mode="eval").body
    except SyntaxError:
        return False
    return isinstance(node, ast.Call) and getattr(node.func, "id", None) in DERIVING


def _parameters(function) -> griffe.Parameters:
    params = []
    for p in inspect.signature(function).parameters.values():
        annotation = p.annotation
        if annotation is not p.empty and not isinstance(annotation, str):
            annotation = getattr(annotation, "__name__", str(annotation))
        params.append(
            griffe.Parameter(
                p.name,
                annotation=None if annotation is p.empty else annotation,
                kind=griffe.ParameterKind(p.kind.description),
                default=None if p.default is p.empty else repr(p.default),
            )
        )
    return griffe.Parameters(*params)


class DerivedFrontends(griffe.Extension):
    """Replace ``X = logits_processor_class(...)`` / ``generate_function(...)`` by what it builds."""

    def on_module_members(self, *, mod: griffe.Module, agent, **kwargs) -> None:
        names = [name for name, member in mod.members.items() if _derived(member)]
        if not names:
            return
        module = importlib.import_module(mod.path)

        def docstring(text: str | None, lineno: int | None) -> griffe.Docstring | None:
            if not text:
                return None
            return griffe.Docstring(
                inspect.cleandoc(text),
                lineno=lineno,
                parser=agent.docstring_parser,
                parser_options=agent.docstring_options,
            )

        for name in names:
            built, lineno = getattr(module, name), mod.members[name].lineno
            if inspect.isclass(built):
                obj = griffe.Class(
                    name,
                    lineno=lineno,
                    endlineno=lineno,
                    bases=[base.__name__ for base in built.__bases__],
                    docstring=docstring(built.__doc__, lineno),
                )
                init = griffe.Function(
                    "__init__",
                    lineno=lineno,
                    endlineno=lineno,
                    parameters=_parameters(built.__init__),
                    docstring=docstring(built.__init__.__doc__, lineno),
                )
                obj.set_member("__init__", init)
                made = [obj, init]
            else:
                obj = griffe.Function(
                    name,
                    lineno=lineno,
                    endlineno=lineno,
                    parameters=_parameters(built),
                    docstring=docstring(built.__doc__, lineno),
                )
                made = [obj]
            mod.set_member(name, obj)
            for each in made:  # the other extensions (Sphinx roles) see the new objects too
                if each.docstring is not None:
                    each.docstring.parent = each
                agent.extensions.call("on_instance", node=ast.Pass(), obj=each, agent=agent)
