"""The built book as a reader meets it: every page opened in headless Chromium from disk, network off.

Per page: no console errors or failed requests, no raw TeX in the visible text and every formula
typeset by MathJax, every image decoded, every internal link (and its #anchor) resolves. Screenshots of
each page go to `_build/screenshots/` (kept by CI as artifacts).

The browser is the system's chromium (Debian's `chromium`; `.ci/run` installs it when absent), driven by
Playwright without downloading a browser. In CI a missing chromium fails the test rather than skipping it.
"""
import os
import re
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "_build" / "screenshots"
SKIPPED_FOLDERS = {"_static", "_sources", "_images", "_downloads", "results"}
RAW_TEX = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$|\\begin\{|\\frac|\\theta|\\alpha")


def chromium_path() -> str | None:
    for name in (os.environ.get("LLFC_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


REDIRECT = re.compile(r'http-equiv="refresh"\s+content="\d+;\s*url=([^"]+)"', re.IGNORECASE)


def pages(site: Path) -> list[Path]:
    return sorted(p for p in site.rglob("*.html") if not SKIPPED_FOLDERS & set(p.relative_to(site).parts))


def redirect_target(page: Path) -> str | None:
    """Where a redirect-only page (the site's index.html) sends the reader, as a file:// URL; else None."""
    found = REDIRECT.search(page.read_text(errors="replace")[:2000])
    return (page.parent / found.group(1)).resolve().as_uri() if found else None


def anchors(page: Path, cache: dict) -> set:
    if page not in cache:
        cache[page] = set(re.findall(r'\bid="([^"]+)"', page.read_text(errors="replace")))
    return cache[page]


def broken_links(site: Path, hrefs: list[str]) -> list[str]:
    """Internal links (file:// under the site) whose file, or #anchor in it, does not exist."""
    broken, ids = [], {}
    for href in hrefs:
        url = urlparse(href)
        if url.scheme != "file":
            continue
        target = Path(unquote(url.path))
        if target.is_dir():
            target = target / "index.html"
        if not target.exists() or site.resolve() not in target.resolve().parents:
            broken.append(href)
        elif url.fragment and target.suffix == ".html" and unquote(url.fragment) not in anchors(target, ids):
            broken.append(href)
    return broken


@pytest.fixture(scope="module")
def browser():
    path = chromium_path()
    if path is None:
        message = "no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=path, args=["--no-sandbox"])
        yield browser
        browser.close()


def visit(browser, page_path: Path) -> dict:
    """Open one page offline; return what a reader would see and what went wrong."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, offline=True)
    # Only files of the site load; anything else (a CDN, a font host) is refused and reported.
    refused = []
    context.route("**/*", lambda route: route.continue_() if route.request.url.startswith("file:")
                  else (refused.append(route.request.url), route.abort()))
    page = context.new_page()
    errors = []
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(page_path.as_uri(), wait_until="load")
    # MathJax typesets after load; wait for its promise where the page has math.
    page.wait_for_function("() => !window.MathJax || (MathJax.startup && MathJax.startup.promise)", timeout=20000)
    page.evaluate("() => window.MathJax && MathJax.startup.promise")
    seen = page.evaluate("""() => {
        const main = document.querySelector('main') || document.body;
        return {
          text: main.innerText,
          math: document.querySelectorAll('.math').length,
          typeset: document.querySelectorAll('mjx-container').length,
          mathjaxLoaded: !!window.MathJax,
          images: [...document.images].map(i => ({src: i.src.slice(0, 120), ok: i.complete && i.naturalWidth > 0})),
          links: [...document.querySelectorAll('a[href]')].map(a => a.href),
          figures: [...document.querySelectorAll('figure.llfc-figure')].map(f => !!f.querySelector('figcaption')),
        };
    }""")
    seen["errors"], seen["refused"] = errors, refused
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / (page_path.stem + ".png")))
    context.close()
    return seen


@pytest.mark.slow
def test_every_page_renders_offline(built_book, browser):
    problems = {}
    for path in pages(built_book):
        name = str(path.relative_to(built_book))
        target = redirect_target(path)
        if target is not None:  # rendering it would race the redirect: check where it leads instead
            if broken_links(built_book, [target]):
                problems[name] = [f"redirects to a missing page: {target}"]
            continue
        seen = visit(browser, path)
        found = []
        if seen["errors"]:
            found.append(f"console errors: {seen['errors'][:3]}")
        if seen["refused"]:
            found.append(f"requests outside the site: {seen['refused'][:3]}")
        raw = RAW_TEX.findall(seen["text"])
        if raw:
            found.append(f"raw TeX in the visible text: {raw[:5]}")
        if seen["math"] and seen["typeset"] < seen["math"]:
            found.append(f"{seen['math']} formulas but {seen['typeset']} typeset (MathJax loaded: {seen['mathjaxLoaded']})")
        bad_images = [i["src"] for i in seen["images"] if not i["ok"]]
        if bad_images:
            found.append(f"images not decoded: {bad_images[:3]}")
        broken = broken_links(built_book, seen["links"])
        if broken:
            found.append(f"broken internal links: {broken[:5]}")
        if not all(seen["figures"]):
            found.append("a chapter figure without a caption")
        if found:
            problems[name] = found
    assert not problems, "\n".join(f"{page}: {found}" for page, found in problems.items())


@pytest.mark.slow
def test_chapters_have_rendered_math_figures_and_data_links(built_book, browser):
    """The checks above would pass on an empty page: make sure the chapters have what they should."""
    intro = visit(browser, built_book / "book" / "intro.html")
    assert intro["math"] > 5 and intro["typeset"] >= intro["math"]
    for chapter in sorted((built_book / "notebooks").glob("0*.html")):
        seen = visit(browser, chapter)
        assert seen["typeset"] > 0, chapter.name
        assert all(i["ok"] for i in seen["images"]) and len(seen["images"]) >= 2, chapter.name
        if chapter.name.startswith("00_"):  # the tour trains and plots in the notebook: no results tables
            continue
        assert len(seen["figures"]) >= 2 and all(seen["figures"]), chapter.name
        csv_links = [h for h in seen["links"] if h.endswith(".csv")]
        assert csv_links and not broken_links(built_book, csv_links), chapter.name


def test_the_link_checker_finds_broken_links(tmp_path):
    """The checker itself can fail: a missing file and a missing anchor are reported, good ones are not."""
    (tmp_path / "a.html").write_text('<h1 id="top">A</h1>')
    good = [(tmp_path / "a.html").as_uri(), (tmp_path / "a.html").as_uri() + "#top", "https://example.org/x"]
    bad = [(tmp_path / "missing.html").as_uri(), (tmp_path / "a.html").as_uri() + "#nowhere"]
    assert broken_links(tmp_path, good + bad) == bad
    assert RAW_TEX.search(r"the line \(\theta_\alpha\) here") and not RAW_TEX.search("θα rendered")
    (tmp_path / "index.html").write_text('<meta http-equiv="Refresh" content="0; url=missing/intro.html" />')
    target = redirect_target(tmp_path / "index.html")
    assert target.endswith("missing/intro.html") and broken_links(tmp_path, [target]) == [target]
