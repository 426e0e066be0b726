"""The documentation: the MkDocs site builds with ``--strict`` and renders offline (nothing from a
CDN, formulas as MathML, wide tables, code and figures that fit or scroll), the API reference covers
every public name, every Python block of ``docs/`` and the README runs, and the README keeps what CI
relies on.

Python blocks run page by page, in order, in one namespace per page (a later block may use what an
earlier one defined), on a tiny random llama and a character tokenizer (``tests/conftest.py``):
``contrastive_decoding.load_model`` is replaced for the duration by a stand-in that returns them
(any name or path gives a second tiny model with the same vocabulary), so no Hub and no SmolLM2.
A block that cannot run that way is preceded by ``<!-- not-run: REASON -->``; the reason is
required, and a marker must sit right before a Python block.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PAGES = sorted(DOCS.rglob("*.md")) + [README]
DOCS_EXTRA = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python", "latex2mathml")

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,}|~{3,})[ \t]*(?P<info>[^\n`]*)$")
NOT_RUN = re.compile(r"^<!--\s*not-run:(?P<reason>.*?)-->\s*$")
PYTHON_INFOS = {"python", "py", "python3"}


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def code_blocks(path: Path) -> list[dict]:
    """Every fenced block of a Markdown file: language, source, first line, and the not-run reason
    (``None`` when the line before the fence holds no marker)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        ticks, indent = match["ticks"], match["indent"]
        info = match["info"].strip().split()
        start, body, i = i, [], i + 1
        while i < len(lines) and not (
            lines[i].strip().startswith(ticks) and lines[i].strip().strip(ticks[0]) == ""
        ):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        before = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        marker = NOT_RUN.match(before.strip())
        blocks.append(
            {
                "lang": info[0].lower() if info else "",
                "source": "\n".join(body) + "\n",
                "line": start + 1,
                "not_run": marker["reason"].strip() if marker else None,
            }
        )
    return blocks


def python_pages() -> list[Path]:
    return [p for p in PAGES if any(b["lang"] in PYTHON_INFOS for b in code_blocks(p))]


# -- the site -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built once for the tests below (``mkdocs build --strict``)."""
    missing = [name for name in DOCS_EXTRA if importlib.util.find_spec(name.split(".")[0]) is None]
    if not missing and importlib.util.find_spec("mkdocstrings_handlers") is not None:
        missing = [n for n in DOCS_EXTRA if "." in n and importlib.util.find_spec(n) is None]
    if missing:
        pytest.skip(
            f"the [docs] extra is not installed here (missing: {', '.join(missing)}), so the site "
            "cannot be built; `pip install -e '.[docs]'` (scripts/setup_env.sh does) enables this test"
        )
    site = tmp_path_factory.mktemp("docs") / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", HF_HUB_OFFLINE="1")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "-f",
            str(ROOT / "mkdocs.yml"),
            "-d",
            str(site),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, (
        f"mkdocs build --strict failed:\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    )
    return site


def test_site_builds_strict(site):
    assert (site / "index.html").is_file()
    api = (site / "reference" / "library" / "index.html").read_text(encoding="utf-8")
    for name in ("DoLaLogitsProcessor", "score_continuations", "ContrastStrategy"):
        assert name in api, f"the API page lost {name}"
    # The figures the pages show are copied into the site.
    for png in DOCS.glob("*.png"):
        assert (site / png.name).is_file(), png.name


# A tag that makes the browser fetch something (a script, a style sheet, an image, a frame) from
# another host: offline, the page would lack it.
EXTERNAL_FETCH = re.compile(
    r"<(?:script|link|img|iframe|source|embed)\b[^>]*\b(?:src|href)=[\"']?(?:https?:)?//[^\"'\s>]+", re.I
)


def test_site_needs_no_network(site):
    """Every page renders offline: nothing is loaded from a CDN (MathJax used to be)."""
    fetches, mermaid = [], []
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        fetches += [f"{page.relative_to(site)}: {m[0][:120]}" for m in EXTERNAL_FETCH.finditer(text)]
        # Material loads mermaid.js from a CDN for any diagram on the page.
        if 'class="mermaid"' in text:
            mermaid.append(str(page.relative_to(site)))
    assert not fetches, "pages that load something from another host:\n" + "\n".join(fetches)
    assert not mermaid, f"pages with a mermaid diagram (Material fetches mermaid.js from a CDN): {mermaid}"
    for css in site.rglob("*.css"):
        text = css.read_text(encoding="utf-8")
        assert not re.search(r"@import|url\(\s*[\"']?(?:https?:)?//", text), f"{css} fetches from the network"


def test_formulas_are_mathml(site):
    """Each formula of the sources is MathML in the site (drawn by the browser, no script): none
    is left as TeX, and DoLa's keeps its TeX as an annotation."""
    left, short = [], []
    for source in sorted((DOCS / "strategies").glob("*.md")):
        page = site / "strategies" / source.stem / "index.html"
        if source.stem == "index":
            page = site / "strategies" / "index.html"
        html = page.read_text(encoding="utf-8")
        left += [f"{source.name}: {m[0][:80]}" for m in re.finditer(r'class="arithmatex">\\[(\[][^<]*', html)]
        blocks = source.read_text(encoding="utf-8").count("$$") // 2
        if html.count('<math xmlns="http://www.w3.org/1998/Math/MathML" display="block">') < blocks:
            short.append(f"{source.name}: {blocks} $$ blocks in the source, fewer display formulas")
    assert not left, "formulas left as TeX:\n" + "\n".join(left)
    assert not short, "\n".join(short)
    dola = (site / "strategies" / "dola" / "index.html").read_text(encoding="utf-8")
    math = re.search(r'<div class="arithmatex"><math [^>]*display="block">.*?</math></div>', dola, re.S)
    assert math, "DoLa's formula is not a display MathML block"
    drawn, _, annotation = math[0].partition('<annotation encoding="application/x-tex">')
    assert "\\" not in drawn, "a TeX command reached the drawn MathML"
    assert "\\log q_N(v)" in annotation


def _css_rules(css: str) -> dict[str, str]:
    """selector -> declarations, for a flat style sheet (comments dropped; @media blocks skipped)."""
    css = re.sub(r"/\*.*?\*/", "", css, flags=re.S)
    css = re.sub(r"@media[^{]*\{(?:[^{}]*\{[^{}]*\})*[^{}]*\}", "", css)
    rules: dict[str, str] = {}
    for selectors, body in re.findall(r"([^{}]+)\{([^{}]*)\}", css):
        for selector in selectors.split(","):
            rules[" ".join(selector.split())] = rules.get(" ".join(selector.split()), "") + body
    return rules


def _declares(rules: dict[str, str], selector: str, prop: str, value: str) -> bool:
    body = rules.get(selector, "")
    return any(
        name.strip() == prop and " ".join(val.split()) == value
        for name, _, val in (d.partition(":") for d in body.split(";"))
    )


def test_wide_content_scrolls_and_figures_fit(site):
    """The layout rules that keep wide content readable reach the site: a wide table scrolls in a
    box whose sideways scrollbar stays on screen, long code lines and wide formulas scroll, figures
    fit the column and link to their full-size image."""
    rules = _css_rules((site / "stylesheets" / "extra.css").read_text(encoding="utf-8"))
    wrap = ".md-typeset .md-typeset__scrollwrap"
    expected = [
        (wrap, "max-height", "70vh"),
        (wrap, "overflow", "auto"),
        (f"{wrap} table:not([class])", "overflow", "visible"),
        (f"{wrap} table:not([class]) th", "position", "sticky"),
        (".md-typeset pre > code", "overflow-x", "auto"),
        (".md-typeset div.arithmatex", "overflow-x", "auto"),
        (".md-typeset img", "max-width", "100%"),
        (".md-typeset img", "height", "auto"),
    ]
    missing = [
        f"{sel} {{ {prop}: {value} }}"
        for sel, prop, value in expected
        if not _declares(rules, sel, prop, value)
    ]
    assert not missing, f"docs/stylesheets/extra.css lost: {missing}"
    results = (site / "results" / "index.html").read_text(encoding="utf-8")
    assert "stylesheets/extra.css" in results
    figures = re.findall(r'<a class="cd-figure" href="([^"]+)"[^>]*>\s*<img\b[^>]*\bsrc="([^"]+)"', results)
    assert len(figures) >= 2, "the results figures do not link to their full-size image"
    for href, src in figures:
        assert href == src and (site / "results" / href).resolve().is_file(), href


def _hooks():
    """docs/_ext/hooks.py as a module (it needs mkdocs and latex2mathml, the [docs] extra)."""
    pytest.importorskip("mkdocs", reason="the [docs] extra is not installed")
    pytest.importorskip("latex2mathml", reason="the [docs] extra is not installed")
    spec = importlib.util.spec_from_file_location("cd_docs_hooks", DOCS / "_ext" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tex_to_mathml_spacing_and_gaps():
    hooks = _hooks()
    mathml = hooks.tex_to_mathml(r"\arg\max_{j} \log q_j(c) + \operatorname{softmax}(x)", display=False)
    drawn, _, annotation = mathml.partition("<annotation")
    assert "\\" not in drawn, "latex2mathml's gap (\\arg) is not bridged"
    assert r"\arg\max_{j}" in annotation
    # TeX's spacing: a thin space after an operator name, none before "(".
    assert '<mo lspace="0" rspace="0.1667em">arg</mo>' in drawn
    assert '<mo lspace="0.1667em" rspace="0.1667em">log</mo>' in drawn
    assert '<mo lspace="0" rspace="0">softmax</mo>' in drawn


def test_unrecognised_formulas_fail_the_build(caplog):
    """A $$ block arithmatex did not see (no blank line above it, or inside a list item) is a
    warning, so ``mkdocs build --strict`` fails instead of showing TeX; a $ in code is not."""
    hooks = _hooks()
    for html in ("<p>as:\n$$\nx\n$$</p>", '<li>$<span class="arithmatex">\\(x\\)</span>$</li>'):
        caplog.clear()
        hooks.render_math(html, "page.md")
        assert "not recognised" in caplog.text, html
    caplog.clear()
    out = hooks.render_math('<pre><code>echo $$</code></pre><p><span class="arithmatex">\\(x\\)</span></p>')
    assert not caplog.text and "<math" in out


def test_link_figures_only_wraps_figures():
    hooks = _hooks()
    figure = '<p><img alt="chart" src="../chart.png" /></p>'
    assert hooks.link_figures(figure) == (
        '<p><a class="cd-figure" href="../chart.png" title="Open the image at full size">'
        '<img alt="chart" src="../chart.png" /></a></p>'
    )
    inline = '<p>see <img src="icon.png"> here</p>'
    assert hooks.link_figures(inline) == inline


def _public_names(init: Path) -> list[str]:
    """The package's ``__all__``, as Python computes it (the root package builds it from its table
    of lazy exports)."""
    root = init.parent.name == "contrastive_decoding"
    module = "contrastive_decoding" if root else "contrastive_decoding.eval"
    return list(importlib.import_module(module).__all__)


@pytest.mark.parametrize(
    ("init", "page", "prefix"),
    [
        ("contrastive_decoding/__init__.py", "reference/library.md", "contrastive_decoding"),
        ("eval/__init__.py", "reference/harness.md", "contrastive_decoding.eval"),
    ],
)
def test_api_reference_covers_public_names(init, page, prefix):
    text = (DOCS / page).read_text(encoding="utf-8")
    documented = set(re.findall(rf"^::: {re.escape(prefix)}\.(\w+)\s*$", text, re.M))
    missing = sorted(set(_public_names(ROOT / init)) - documented)
    assert not missing, f"docs/{page} lacks `::: {prefix}.NAME` for: {missing}"


# -- code blocks ----------------------------------------------------------------------------------


def test_not_run_markers_are_well_formed():
    problems = []
    for path in PAGES:
        lines = path.read_text(encoding="utf-8").splitlines()
        markers = {i + 1: NOT_RUN.match(line.strip()) for i, line in enumerate(lines)}
        markers = {n: m for n, m in markers.items() if m}
        blocks = {b["line"]: b for b in code_blocks(path)}
        for n, marker in markers.items():
            if not marker["reason"].strip():
                problems.append(f"{_rel(path)}:{n}: not-run marker without a reason")
            nxt = next((k for k in range(n + 1, len(lines) + 1) if lines[k - 1].strip()), None)
            if nxt not in blocks or blocks[nxt]["lang"] not in PYTHON_INFOS:
                problems.append(f"{_rel(path)}:{n}: not-run marker not followed by a ```python block")
    assert not problems, "\n".join(problems)


def test_python_blocks_are_found():
    """The extraction sees the blocks it must run (guards against a fence-syntax slip)."""
    counted = sum(1 for p in PAGES for b in code_blocks(p) if b["lang"] in PYTHON_INFOS)
    assert counted >= 25
    for path in PAGES:
        for block in code_blocks(path):
            if block["lang"] in PYTHON_INFOS:
                compile(block["source"], f"{_rel(path)}:{block['line']}", "exec")


@pytest.fixture
def tiny_load_model(monkeypatch):
    from conftest import build_model, char_tokenizer

    import contrastive_decoding

    built: dict[object, torch.nn.Module] = {}

    def load_model(name_or_path=None, **kwargs):
        key = name_or_path is not None
        if key not in built:
            built[key] = build_model("llama", seed=int(key))
        tokenizer = char_tokenizer()
        # Like real causal-LM tokenizers: no token_type_ids (transformers 4.57's generate rejects them).
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
        return built[key], tokenizer

    monkeypatch.setattr(contrastive_decoding, "load_model", load_model)
    monkeypatch.setattr(contrastive_decoding.backends.hf.loading, "load_model", load_model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_model
    torch.set_num_threads(threads)


@pytest.mark.parametrize("page", python_pages(), ids=_rel)
def test_python_blocks_run(page, tiny_load_model, capsys):
    namespace: dict = {"__name__": "__docs__"}
    ran = 0
    for block in code_blocks(page):
        if block["lang"] not in PYTHON_INFOS or block["not_run"] is not None:
            continue
        where = f"{_rel(page)}:{block['line']}"
        try:
            exec(compile(block["source"], where, "exec"), namespace)
        except Exception as error:  # noqa: BLE001 - report which block failed
            raise AssertionError(f"the Python block at {where} failed: {error!r}") from error
        ran += 1
    assert ran or all(b["not_run"] for b in code_blocks(page) if b["lang"] in PYTHON_INFOS)


# -- the README -----------------------------------------------------------------------------------


def _readme_command_lines() -> list[str]:
    lines = []
    for block in code_blocks(README):
        if block["lang"] in {"bash", "sh", "shell", "console"}:
            lines += [line.split("#", 1)[0].strip() for line in block["source"].splitlines()]
    return [line for line in lines if line]


def test_ci_runs_the_readme_test_command():
    commands = _readme_command_lines()
    assert "bash scripts/test.sh" in commands, "the README must give the test command `bash scripts/test.sh`"
    ci = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert "bash scripts/test.sh" in ci, ".ci/run must call exactly the README's test command"


def test_readme_is_short_and_its_links_resolve():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 260, (
        "the README is meant to be read in five minutes: move detail to docs/"
    )
    broken = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        if not (ROOT / target).exists():
            broken.append(target)
    assert not broken, f"README links to missing files: {broken}"
