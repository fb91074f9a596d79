"""Open every page of the built docs site in a real headless browser and fail on what a reader
would see broken: an HTTP error, a console error, a failed request (nothing may come from outside),
math left unrendered, a broken image, a dead link inside the site, or a chapter without outputs.

Usage: ``python scripts/check_site.py SITE_DIR [--shots DIR]`` (after ``mkdocs build``). The site
is served on 127.0.0.1 on a free port; the browser is the system Chromium (Debian's ``chromium``,
driven by Playwright's Python API; never ``playwright install``). Full-page screenshots go to
``--shots`` (default: a new temporary folder, printed at the end). Exits 1 listing every problem.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import sys
import tempfile
import threading
from pathlib import Path
from urllib.parse import unquote

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-sync",
        "--disable-component-update", "--no-first-run", "--disable-quic"]  # fmt: skip

# text a reader sees outside code and rendered math: raw TeX delimiters mean KaTeX did not run
VISIBLE_TEXT = """() => {
  const body = document.querySelector("article") || document.body;
  const copy = body.cloneNode(true);
  copy.querySelectorAll("pre, code, .katex, .highlight, script, style").forEach(e => e.remove());
  return copy.textContent;
}"""
BROKEN_IMAGES = """() => Array.from(document.images)
  .filter(img => !img.complete || img.naturalWidth === 0).map(img => img.src)"""
CHAPTER_OUTPUTS = "() => document.querySelectorAll('.jp-OutputArea-output').length"
LINKS = "() => Array.from(document.querySelectorAll('a[href]')).map(a => a.href)"
UNRENDERED = ("\\(", "\\)", "\\[", "\\]", "$$")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # one line per request would bury the verdict
        pass


def _serve(site: Path) -> http.server.ThreadingHTTPServer:
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # port 0: a free one
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _pages(site: Path) -> list[str]:
    """Every page's path below the site root, as a URL path (``chapters/x/`` for x/index.html)."""
    pages = []
    for html in sorted(site.rglob("index.html")):
        relative = html.parent.relative_to(site).as_posix()
        pages.append("" if relative == "." else relative + "/")
    return pages


def _dead_links(hrefs: list[str], base: str, site: Path) -> list[str]:
    """The links of a page into this site (resolved by the browser) whose target is missing."""
    dead = []
    for href in hrefs:
        if not href.startswith(base):
            continue  # another site (the papers on arXiv): not ours to check offline
        target = site / unquote(href[len(base) :].split("#")[0].split("?")[0])
        if not (target.is_file() or (target / "index.html").is_file()):
            dead.append(href[len(base) :])
    return sorted(set(dead))


def _rendered_text(page, patience_ms: int = 10_000) -> str:
    """The visible text once KaTeX has run (it renders after load, later on a busy machine):
    poll until no raw delimiter is left, or ``patience_ms`` has passed."""
    waited = 0
    while True:
        text = page.evaluate(VISIBLE_TEXT)
        if not any(mark in text for mark in UNRENDERED) or waited >= patience_ms:
            return text
        page.wait_for_timeout(250)
        waited += 250


def _check_page(page, url: str, path: str, site: Path) -> list[str]:
    """Load one page; return its problems as sentences."""
    problems: list[str] = []
    page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    response = page.goto(url, wait_until="networkidle")
    if response is None or response.status != 200:
        problems.append(f"HTTP {None if response is None else response.status}")
    text = _rendered_text(page)
    problems += [f"unrendered math {mark!r}" for mark in UNRENDERED if mark in text]
    problems += [f"broken image {src}" for src in page.evaluate(BROKEN_IMAGES)]
    base = url[: len(url) - len(path)]
    problems += [f"dead link {href}" for href in _dead_links(page.evaluate(LINKS), base, site)]
    if path.startswith("chapters/") and page.evaluate(CHAPTER_OUTPUTS) == 0:
        problems.append("a chapter page with no executed output")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path)
    parser.add_argument("--shots", type=Path, default=None)
    args = parser.parse_args(argv)
    shots = args.shots or Path(tempfile.mkdtemp(prefix="sptutor-site-"))
    shots.mkdir(parents=True, exist_ok=True)
    server = _serve(args.site)
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    failures: dict[str, list[str]] = {}
    pages = _pages(args.site)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        for path in pages:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            problems = _check_page(page, base + path, path, args.site)
            page.screenshot(path=str(shots / f"{path.strip('/').replace('/', '_') or 'home'}.png"),
                            full_page=True)  # fmt: skip
            page.close()
            if problems:
                failures[path or "/"] = problems
        browser.close()
    server.shutdown()
    for path, problems in failures.items():
        print(f"{path}: " + "; ".join(problems))
    print(f"{len(pages)} pages checked, {len(failures)} with problems; screenshots in {shots}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
