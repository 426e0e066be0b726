"""A griffe extension for the API reference: the docstrings write Sphinx roles
(:class:`~contrastive_decoding.DoLa`, :meth:`detach`, ...), which Markdown would show verbatim;
they are rewritten as inline code (``~`` keeps only the last component, as Sphinx does). A
Google-style ``Example:`` heading (which griffe reads as an admonition of Markdown text) becomes
``Examples:``, so its doctests render as code."""

from __future__ import annotations

import re

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.M)
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj|const|term|ref):`(~?)([^`]+)`")


def _code(match: re.Match) -> str:
    tilde, target = match.groups()
    target = target.strip()
    if tilde:
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles as inline code and ``Example:`` as ``Examples:`` in every docstring."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            text = _ROLE.sub(_code, obj.docstring.value)
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", text)
