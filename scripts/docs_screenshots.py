"""Screenshots of the built documentation site as a reader's browser shows it, with no network, and
the layout checks a screenshot stands for.

    mkdocs build --strict -d /tmp/site
    python scripts/docs_screenshots.py /tmp/site /tmp/shots [--width 1280] [--height 1000]

Needs Debian's Chromium (``apt-get install chromium``) and the ``playwright`` package from PyPI
(``pip install playwright``; its own browser download, ``playwright install``, is not used). The
site is served from a local ``http.server`` on 127.0.0.1 and every request to any other host is
refused, so a page that still needed a CDN would show here what it shows offline.

One PNG per view lands in the output folder. On every page taken it also checks, and lists:
a request to another host; a formula left as TeX or drawn with no size; a table or code block
wider than its box that cannot scroll, or a table whose sideways scrollbar is out of sight (below
the window); an image shrunk to the column with no link to its full size. Exit status 1 if any.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import shutil
import sys
import threading
from pathlib import Path

# (file name, page, id of the heading to scroll to, scroll the first table under it to its end)
VIEWS = (
    ("dola-formula", "strategies/dola/", "what-it-computes", False),
    ("sled-formulas", "strategies/sled/", "what-it-computes", False),
    ("deco-inline-formula", "strategies/deco/", "what-it-computes", False),
    ("results-top", "results/", None, False),
    ("results-paired", "results/", "paired-differences-against-the-baseline", False),
    ("results-paired-scrolled", "results/", "paired-differences-against-the-baseline", True),
    ("results-figures", "results/", "figures", False),
    ("dola-code", "strategies/dola/", "1-as-a-logits-processor-in-stock-generate", False),
)
BROWSERS = ("chromium", "chromium-browser", "google-chrome")

# Runs in the page; returns one line per problem (see the module docstring).
CHECKS = """() => {
  const out = [];
  const box = (e) => e.getBoundingClientRect();
  document.querySelectorAll('.arithmatex').forEach((e) => {
    const m = e.querySelector('math');
    if (!m) out.push('formula left as TeX: ' + e.textContent.slice(0, 60));
    else if (box(m).width < 5 || box(m).height < 5) out.push('formula drawn with no size');
  });
  const scrolls = (e) => ['auto', 'scroll'].includes(getComputedStyle(e).overflowX);
  document.querySelectorAll('.md-typeset__scrollwrap').forEach((w) => {
    if (w.scrollWidth <= w.clientWidth + 1) return;
    if (!scrolls(w)) out.push('wide table cut off: its wrapper does not scroll');
    else if (w.getBoundingClientRect().height > window.innerHeight - 60)  // 60: the header bar
      out.push('wide table whose sideways scrollbar is a screen below its top');
  });
  document.querySelectorAll('.md-typeset pre > code').forEach((c) => {
    if (c.scrollWidth > c.clientWidth + 1 && !scrolls(c)) out.push('long code line cut off');
  });
  document.querySelectorAll('.md-typeset img').forEach((i) => {
    if (box(i).right > box(i.closest('.md-content')).right + 1) out.push('image wider than the page');
    if (i.naturalWidth > box(i).width * 1.2 && !i.closest('a'))
      out.push('image shrunk with no link to full size: ' + i.getAttribute('src'));
  });
  return out;
}"""


def _serve(site: Path) -> http.server.ThreadingHTTPServer:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # one line per request would bury the report
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=site))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("site", type=Path, help="a built site (mkdocs build -d SITE)")
    parser.add_argument("out", type=Path, help="folder for the PNGs")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1000)
    args = parser.parse_args(argv)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sys.exit("needs the playwright package: `pip install playwright` (Debian's chromium is used)")
    browser_path = next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)
    if browser_path is None:
        sys.exit("no Chromium found: `apt-get install chromium` (Debian) provides /usr/bin/chromium")
    if not (args.site / "index.html").is_file():
        sys.exit(f"{args.site} holds no built site (run `mkdocs build --strict -d {args.site}`)")
    args.out.mkdir(parents=True, exist_ok=True)
    server = _serve(args.site.resolve())
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    problems: list[str] = []
    try:
        with sync_playwright() as playwright:
            # --no-sandbox: the project's machines run as root, where Chromium's sandbox refuses.
            # Scrollbars are drawn (Playwright hides them by default): whether a wide table's
            # scrollbar is in sight is part of what the pictures show.
            browser = playwright.chromium.launch(
                executable_path=browser_path,
                args=["--no-sandbox"],
                ignore_default_args=["--hide-scrollbars"],
            )
            page = browser.new_page(viewport={"width": args.width, "height": args.height})

            def offline(route):
                if route.request.url.startswith(base):
                    route.continue_()
                else:
                    problems.append(f"{page.url}: asked the network for {route.request.url}")
                    route.abort()

            page.route("**/*", offline)
            checked: set[str] = set()
            for name, path, anchor, scroll_right in VIEWS:
                page.goto(base + path, wait_until="networkidle")
                if path not in checked:
                    checked.add(path)
                    problems += [f"{path}: {problem}" for problem in page.evaluate(CHECKS)]
                heading = page.locator(f'[id="{anchor}"]')  # ids may start with a digit: no "#id"
                if anchor:
                    # the heading just below Material's sticky header bar, not under it
                    heading.evaluate("(e) => scrollTo(0, e.getBoundingClientRect().top + scrollY - 72)")
                if scroll_right:
                    heading.evaluate(
                        """(h) => { let e = h.nextElementSibling;
                           while (e && !e.querySelector('.md-typeset__scrollwrap')) e = e.nextElementSibling;
                           const w = e.querySelector('.md-typeset__scrollwrap');
                           w.scrollLeft = w.scrollWidth; w.scrollTop = w.scrollHeight;
                           w.scrollIntoView({block: 'end'}); }"""
                    )
                out = args.out / f"{name}-{args.width}.png"
                page.screenshot(path=str(out))
                print(out)
            browser.close()
    finally:
        server.shutdown()
    for problem in problems:
        print("PROBLEM", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
