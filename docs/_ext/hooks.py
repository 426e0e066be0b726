"""MkDocs hooks: the API reference's sources, formulas as MathML, figures that open at full size.

The harness's sources live in the top-level folder ``eval/`` but install as
``contrastive_decoding.eval`` (a ``package-dir`` mapping in pyproject.toml), which griffe's static
analysis cannot see from the source tree. Before the build, a temporary folder is made whose
``contrastive_decoding`` links to every entry of the real package, and whose
``contrastive_decoding/eval`` links to every entry of ``eval/``; mkdocstrings reads the sources
from there: nothing is imported, so the build takes seconds.

Both ``__init__`` files are lazy (PEP 562: a ``_EXPORTS`` table, name -> defining module, read by
``__getattr__``), which static analysis cannot follow either; the temporary folder gets, instead
of a link to each, an ``__init__.py`` written from that table with one ``from MODULE import NAME``
per public name, so that ``::: contrastive_decoding.DoLa`` resolves to
``contrastive_decoding.strategies.dola.DoLa``. The table is read by running the real ``__init__``
(it imports nothing but ``importlib``), so the two cannot drift.

Formulas are turned into MathML at build time. ``pymdownx.arithmatex`` (generic mode) leaves each
``$...$`` / ``$$...$$`` as ``<span|div class="arithmatex">\\(TeX\\)</...>``; :func:`on_page_content`
replaces the TeX with the MathML that ``latex2mathml`` (pure Python, the ``docs`` extra) writes,
the TeX kept as its annotation. Browsers draw MathML natively (Chromium since 109, Firefox,
Safari), so the pages show formulas with no script and no network, where a MathJax or KaTeX
bundle would add hundreds of kilobytes of JavaScript and fonts to draw the same dozen formulas. A TeX command
that the converter does not know is a warning, so ``mkdocs build --strict`` fails on it rather
than shipping a raw backslash.

A paragraph that holds only an image (a figure) becomes a link to the image file, so a reader
opens it at full size with one click: the results charts are wider than the text column.
"""

from __future__ import annotations

import ast
import html
import logging
import re
import runpy
import shutil
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority

log = logging.getLogger("mkdocs.plugins.hooks")
_MADE: list[Path] = []

# What arithmatex (generic mode) writes: \(...\) in a span, \[...\] in a div. The TeX is HTML-escaped.
_ARITHMATEX = re.compile(r'<(?P<tag>span|div) class="arithmatex">\\[(\[](?P<tex>.*?)\\[)\]]</(?P=tag)>', re.S)
# latex2mathml 3.81 writes \arg as an identifier named "\arg"; \operatorname{arg} gives an upright
# operator name, as TeX draws it.
_TEX_REWRITES = ((re.compile(r"\\arg(?![A-Za-z])"), r"\\operatorname{arg}"),)
_MATHML = "http://www.w3.org/1998/Math/MathML"
ET.register_namespace("", _MATHML)  # serialize as <math xmlns=...>, not <ns0:math>
_SCRIPTED = {"msub", "msup", "msubsup", "munder", "mover", "munderover"}
_OPEN = {"(", "[", "{", "|", "\u2016", "\u27e8"}
_THIN = "0.1667em"  # TeX's \, (3mu)
# Formulas arithmatex did not see: $$x$$ inside a paragraph (a list item, say) is read as
# $ + $x$ + $; a $$ block right under a line of text (no blank line) stays as text.
_STRAY_DOLLAR = re.compile(r'\$<span class="arithmatex">|\\\)</span>\$|\$\$')
_CODE = re.compile(r"<(pre|code)\b.*?</\1>", re.S)  # where a $ is shell, not TeX
# A paragraph with nothing but one image in it: a figure.
_FIGURE = re.compile(r'<p>\s*(?P<img><img\b[^>]*\bsrc="(?P<src>[^"]+)"[^>]*>)\s*</p>')


def static_init(init: Path) -> str:
    """The source of an eager ``__init__`` equivalent to the lazy one at ``init``."""
    lazy = runpy.run_path(str(init))
    exports: dict[str, str] = lazy["_EXPORTS"]
    docstring = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
    lines = [repr(docstring), ""]
    if "__version__" in lazy:
        lines += [f"__version__ = {lazy['__version__']!r}", ""]
    lines += [f"from {module} import {name}" for name, module in sorted(exports.items())]
    lines += ["", f"__all__ = {sorted(lazy['__all__'])!r}", ""]
    return "\n".join(lines)


def _local(tag: str) -> str:
    return tag.rpartition("}")[2]


def _space_operator_names(math: ET.Element) -> None:
    """Give function names (``\\log``, ``\\max``, ``\\operatorname{softmax}``) TeX's spacing.

    latex2mathml writes them as ``<mi>log</mi>`` (no space: "logq") or ``<mo>max</mo>`` (the
    browser's default operator space on both sides: "max (0"). TeX puts a thin space around an
    operator name but none between it and an opening parenthesis, nor after another operator or
    a relation (which bring their own). Each becomes an ``<mo>`` with that spacing; a name under a
    sub/superscript is the core of the scripted element, whose neighbours decide (MathML's
    "embellished operator").
    """
    for parent in math.iter():
        kids = list(parent)
        for i, kid in enumerate(kids):
            if i == 0 and _local(parent.tag) in _SCRIPTED:
                continue  # a scripted element's base: spaced from the element's own neighbours
            core = kid
            while _local(core.tag) in _SCRIPTED and len(core):
                core = core[0]
            if _local(core.tag) not in ("mi", "mo") or core.get("mathvariant"):
                continue
            text = (core.text or "").strip()
            if len(text) < 2 or not text.isalpha():
                continue
            before = kids[i - 1] if i else None
            after = kids[i + 1] if i + 1 < len(kids) else None
            core.tag = f"{{{_MATHML}}}mo"
            core.set("lspace", "0" if before is None or _local(before.tag) == "mo" else _THIN)
            opens = after is not None and _local(after.tag) == "mo" and (after.text or "").strip() in _OPEN
            core.set("rspace", "0" if after is None or opens else _THIN)


def tex_to_mathml(tex: str, display: bool) -> str:
    """``tex`` (plain TeX, not HTML-escaped) as a MathML ``<math>`` element whose
    ``<annotation encoding="application/x-tex">`` keeps the source (screen readers, copy)."""
    from latex2mathml.converter import convert

    source = tex.strip()
    for pattern, replacement in _TEX_REWRITES:
        tex = pattern.sub(replacement, tex)
    math = ET.fromstring(convert(tex.strip(), display="block" if display else "inline"))
    for element in math.iter():
        if _local(element.tag) == "mi" and element.text == ":":
            # set-builder ":" is a relation in TeX: a thick space (5mu) on each side
            element.tag = f"{{{_MATHML}}}mo"
            element.attrib.update(lspace="0.2778em", rspace="0.2778em")
    _space_operator_names(math)
    # <semantics> draws its first child only: the formula, then its TeX.
    semantics = ET.Element(f"{{{_MATHML}}}semantics")
    row = ET.SubElement(semantics, f"{{{_MATHML}}}mrow")
    row.extend(list(math))
    for child in list(math):
        math.remove(child)
    annotation = ET.SubElement(semantics, f"{{{_MATHML}}}annotation", encoding="application/x-tex")
    annotation.text = source
    math.append(semantics)
    return ET.tostring(math, encoding="unicode")


def render_math(content: str, where: str = "") -> str:
    """Every arithmatex formula of a page's HTML turned into MathML (see the module docstring)."""

    def one(match: re.Match) -> str:
        tex = html.unescape(match["tex"])
        try:
            mathml = tex_to_mathml(tex, display=match["tag"] == "div")
        except Exception as error:  # noqa: BLE001 - any converter failure is reported with its formula
            log.warning(f"{where}: the formula {tex.strip()!r} could not be converted to MathML: {error}")
            return match[0]
        # A command the converter does not know comes out as text with its backslash.
        semantics = mathml.partition("<annotation")[0]
        unknown = sorted(set(re.findall(r"\\[A-Za-z]+", html.unescape(semantics))))
        if unknown:
            log.warning(
                f"{where}: latex2mathml does not know {', '.join(unknown)} in the formula "
                f"{tex.strip()!r}; add a rewrite to _TEX_REWRITES in docs/_ext/hooks.py"
            )
        return f'<{match["tag"]} class="arithmatex">{mathml}</{match["tag"]}>'

    stray = _STRAY_DOLLAR.search(_CODE.sub("", content))
    if stray:
        log.warning(
            f"{where}: a formula was not recognised ({stray[0]!r} left in the text): a $$ block needs a "
            "blank line before it and each $$ on a line of its own; inside a sentence write $...$"
        )
    return _ARITHMATEX.sub(one, content)


def link_figures(content: str) -> str:
    """Each figure (a paragraph holding only an image) wrapped in a link to the image itself."""
    return _FIGURE.sub(
        lambda m: (
            f'<p><a class="cd-figure" href="{m["src"]}" title="Open the image at full size">'
            f"{m['img']}</a></p>"
        ),
        content,
    )


def _mirror(source: Path, target: Path) -> None:
    """``target``: a folder of links to ``source``'s entries, with a static ``__init__`` when
    ``source``'s is lazy (it has an ``_EXPORTS`` table)."""
    target.mkdir()
    init = source / "__init__.py"
    lazy = "_EXPORTS" in runpy.run_path(str(init))
    for entry in source.iterdir():
        if entry.name == "__pycache__" or (entry == init and lazy):
            continue
        (target / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    if lazy:
        (target / "__init__.py").write_text(static_init(init))


@event_priority(100)  # before mkdocstrings, which builds its handlers in its own on_config
def on_config(config, **kwargs):
    try:
        import latex2mathml.converter  # noqa: F401 - checked here to fail early with the fix
    except ImportError as error:
        raise PluginError(
            "the docs' formulas are rendered by latex2mathml, which is not installed: "
            "`pip install -e '.[docs]'` (scripts/setup_env.sh does)"
        ) from error
    if not config.repo_url:
        # edit_uri is a path under repo_url; without one each page's edit link would be a bare
        # relative path (and a warning, so --strict fails).
        config.edit_uri = None
    root = Path(config.config_file_path).resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix="cd-docs-src-"))
    _MADE.append(tmp)
    package = tmp / "contrastive_decoding"
    _mirror(root / "contrastive_decoding", package)
    _mirror(root / "eval", package / "eval")  # lazy too: the CLI's --help must not import torch
    python = config.plugins["mkdocstrings"].config["handlers"].setdefault("python", {})
    python["paths"] = [str(tmp)]
    return config


def on_page_content(html_text: str, page, **kwargs) -> str:
    return link_figures(render_math(html_text, where=page.file.src_uri))


def on_shutdown(**kwargs):
    while _MADE:
        shutil.rmtree(_MADE.pop(), ignore_errors=True)
