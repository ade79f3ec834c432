"""The documentation site: built strictly, then read in a real (headless) browser.

Runs after the notebook tests (files are collected in name order), publishing the copies
they executed. Screenshots land in ``build/screenshots/``.

What a reader must get: an API page without raw reStructuredText, notebook pages without
stderr blocks or stray ``True``/``False`` results, every link and anchor resolving (the
notebooks' tables of contents too), nothing loaded from outside the site (it reads
offline), charts at the size they were drawn and nothing to scroll sideways at 1280 px,
and a learning path on the home page.
"""

from __future__ import annotations

import ast
import functools
import html
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import nbformat

import pytest

import labkit

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "site"
SHOTS = ROOT / "build" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
NOTEBOOK_PAGES = [p.stem for p in NOTEBOOKS]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]

# The site is built from the executed notebooks, so ``make test`` runs this module after
# the rest of the suite (a second pytest run), never beside the notebooks.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built_site() -> Path:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return SITE


@pytest.fixture(scope="module")
def site_url(built_site: Path) -> Iterator[str]:
    handler = functools.partial(_QuietHandler, directory=str(built_site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


def test_every_notebook_page_is_built_with_its_charts(built_site):
    for name in NOTEBOOK_PAGES:
        html = (built_site / "notebooks" / name / "index.html").read_text()
        assert html.count("<img") >= 1, f"{name} page shows no chart"
        assert "Traceback" not in html, f"{name} page shows an error"


def test_api_reference_lists_the_public_functions(built_site):
    html = (built_site / "reference" / "api" / "index.html").read_text()
    functions = [n for n in labkit.__all__ if n[0].islower()]
    missing = [n for n in functions if f"id=\"labkit.{_module_of(n)}.{n}\"" not in html]
    assert not missing, f"API page lacks {missing}"


def _module_of(name: str) -> str:
    return getattr(labkit, name).__module__.rsplit(".", 1)[1]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.fail("chromium is not installed: `make test` installs it (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


def test_browser_shows_notebook_charts_and_search_finds_a_notebook(browser, site_url):
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{site_url}/")
    page.wait_for_load_state("networkidle")  # the search index is loaded by a worker
    page.screenshot(path=str(SHOTS / "home.png"))
    results: list[str] = []
    for _ in range(5):  # typing before the worker is ready yields no results: type again
        page.fill("input.md-search__input", "")
        page.locator("input.md-search__input").type("pre-ping", delay=50)
        try:
            page.wait_for_selector(".md-search-result__item", timeout=4000)
        except Exception:  # noqa: BLE001 - playwright's TimeoutError: try again
            continue
        results = page.locator(".md-search-result__item").all_inner_texts()
        break
    assert any("Pool behaviour" in r for r in results), results

    page.goto(f"{site_url}/notebooks/02_pool_behaviour/")
    page.wait_for_load_state("load")
    loaded = page.eval_on_selector_all(
        "img", "els => els.filter(e => e.complete && e.naturalWidth > 100).length")
    assert loaded >= 3, f"only {loaded} charts rendered"
    page.locator("img").nth(0).scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "notebook-02.png"))
    page.close()


# Charts worth a look on every run, as the site shows them: (page, chart number, file name).
CHART_SHOTS = [("02_pool_behaviour", 1, "02-1-request-timeline.png"),
               ("02_pool_behaviour", 4, "02-2-erlang-c-mean-wait.png"),
               ("03_pool_sizing", 3, "03-2-erlang-c-p99-recommend-pool.png")]


def test_browser_shows_the_timeline_and_the_model_charts(browser, site_url):
    """The request timeline and the model overlays, as a reader sees them (screenshots)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    for name, number, shot in CHART_SHOTS:
        page.goto(f"{site_url}/notebooks/{name}/")
        page.wait_for_load_state("load")
        chart = page.locator(".jp-RenderedImage img").nth(number - 1)
        chart.scroll_into_view_if_needed()
        shown = chart.evaluate("e => e.complete ? e.getBoundingClientRect().width : 0")
        assert shown >= 700, f"{name} chart {number} is shown {shown} px wide"
        chart.screenshot(path=str(SHOTS / shot))
    page.close()


# --- what the built pages contain ---------------------------------------------------------


class _Page(HTMLParser):
    """What the checks need from one built page: ids, links, resources, text by context."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.heading_ids: list[str] = []
        self.links: list[str] = []          # <a href>
        self.resources: list[str] = []      # what the browser fetches: src, stylesheets, icons
        self.stderr_outputs = 0
        self.prose = ""                     # notebook Markdown cells' text outside code
        self._open: list[tuple[str, bool, bool]] = []  # (tag, in notebook Markdown, in code)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {k: v or "" for k, v in attrs}
        if attr.get("id"):
            self.ids.add(attr["id"])
            if re.fullmatch(r"h[1-6]", tag):
                self.heading_ids.append(attr["id"])
        if tag == "a" and attr.get("name"):
            self.ids.add(attr["name"])
        if tag == "a" and "href" in attr:
            self.links.append(attr["href"])
        if tag in {"script", "img", "iframe", "source", "audio", "video", "embed"} \
                and attr.get("src"):
            self.resources.append(attr["src"])
        if tag == "link" and attr.get("href") and attr.get("rel", "") not in {
                "canonical", "alternate", "prev", "next"}:
            self.resources.append(attr["href"])
        if attr.get("data-mime-type") == "application/vnd.jupyter.stderr":
            self.stderr_outputs += 1
        if tag in {"br", "img", "input", "meta", "link", "hr", "source", "path"}:
            return  # void (or self-closed) elements: nothing to pop later
        markdown, code = self._open[-1][1:] if self._open else (False, False)
        markdown = markdown or "jp-RenderedMarkdown" in attr.get("class", "")
        code = code or tag in {"code", "pre", "script", "style", "kbd"}
        self._open.append((tag, markdown, code))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self._open) - 1, -1, -1):
            if self._open[i][0] == tag:
                del self._open[i:]
                break

    def handle_data(self, data: str) -> None:
        if self._open and self._open[-1][1] and not self._open[-1][2]:
            self.prose += data


@functools.cache
def _page(path: Path) -> tuple[str, _Page]:
    text = path.read_text(encoding="utf-8")
    parsed = _Page()
    parsed.feed(text)
    return text, parsed


def _pages(site: Path) -> list[Path]:
    return sorted(site.rglob("*.html"))


def _url(site: Path, path: Path) -> str:
    rel = path.relative_to(site).as_posix()
    return "/" + rel.removesuffix("index.html")


def _target(site: Path, url: str) -> Path | None:
    """The built file a site URL points to (``/x/`` is ``/x/index.html``), if any."""
    path = site / unquote(url).lstrip("/")
    if path.is_dir():
        path = path / "index.html"
    return path if path.is_file() else None


def test_notebook_pages_show_no_stderr_and_no_stray_results(built_site):
    # Progress lines and logged warnings (stderr) stay in JupyterLab; a bare True/False
    # is the return value of a clean-up call, not a result.
    problems = []
    for name in NOTEBOOK_PAGES:
        text, page = _page(built_site / "notebooks" / name / "index.html")
        if page.stderr_outputs:
            problems.append(f"{name}: {page.stderr_outputs} stderr output blocks")
        stray = re.findall(
            r'jp-OutputArea-executeResult"[^>]*>\s*<pre>\s*(True|False|None)\s*</pre>', text)
        if stray:
            problems.append(f"{name}: stray results {stray}")
    assert not problems, problems


def test_pages_name_no_resource_outside_the_site(built_site):
    # Read offline: no Google Fonts, no CDN script, no remote image or stylesheet. Links
    # (<a href>) to other sites are fine; what a page loads is not.
    remote = re.compile(r"^(https?:)?//", re.I)
    inline = re.compile(r"""(?:import\(\s*["']|url\(\s*["']?|@import\s+["'])(?:https?:)?//""", re.I)
    problems = []
    for path in _pages(built_site):
        text, page = _page(path)
        problems += [f"{_url(built_site, path)}: {r}" for r in page.resources if remote.match(r)]
        problems += [f"{_url(built_site, path)}: {m.group(0)}…" for m in inline.finditer(text)]
    assert not problems, problems[:20]


def test_api_reference_renders_its_docstrings(built_site):
    text, _ = _page(built_site / "reference" / "api" / "index.html")
    article = text[text.index("<article"):text.index("</article>")]
    shown = html.unescape(re.sub(r"<[^>]+>", "", article))
    raw = [m for m in (":meth:", ":func:", ":class:", ":attr:", ":mod:", ":exc:", ":data:",
                       "=====", "Example::", "Examples::", "``") if m in shown]
    raw += re.findall(r"\S*::\n", shown)  # an RST literal-block marker
    assert not raw, f"raw reStructuredText on the API page: {raw}"
    assert "<blockquote" not in article, "a '>>>' example rendered as a quote"
    settings = re.search(r"<table>.*?</table>", article, re.S)
    assert settings and "DB_POOL_SIZE" in settings.group(0), \
        "labkit.config's settings table is not rendered as a table"


def test_docstrings_use_the_style_the_site_renders():
    # Google style with Markdown (mkdocs.yml: docstring_style: google), in the core that the
    # API page shows and in labkit.lab alike: no reStructuredText roles or '::' blocks.
    rst = re.compile(r":(meth|func|class|attr|mod|exc|data|obj):`|::\s*$|^\s*={4,}", re.M)
    problems = []
    for path in sorted((ROOT / "labkit").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node, clean=False) or ""
                problems += [f"{path.relative_to(ROOT)} {getattr(node, 'name', '')}: "
                             f"{m.group(0).strip()!r}" for m in rst.finditer(doc)]
    assert not problems, problems


def test_every_link_and_anchor_resolves(built_site):
    # Links between pages, links into a page's sections, the notebooks' tables of contents,
    # and what pages load from the site itself. mkdocs validates Markdown pages' links
    # (validation: in mkdocs.yml); this covers the rendered notebooks and themes too.
    problems = []
    for path in _pages(built_site):
        base = _url(built_site, path)
        _, page = _page(path)
        dupes = sorted({i for i in page.heading_ids if page.heading_ids.count(i) > 1})
        if dupes:
            problems.append(f"{base}: several headings share the id(s) {dupes}")
        for ref in page.links + page.resources:
            parts = urlsplit(urljoin(base, ref))
            if parts.scheme or parts.netloc or ref.startswith(("mailto:", "data:", "javascript:")):
                continue
            target = _target(built_site, parts.path)
            if target is None:
                problems.append(f"{base}: {ref} leads nowhere")
            elif parts.fragment and unquote(parts.fragment) not in _page(target)[1].ids:
                problems.append(f"{base}: {ref} names no anchor on {_url(built_site, target)}")
    assert not problems, problems[:20]


def test_notebook_prose_renders_as_written():
    # A line that starts with '+ ' directly under a paragraph line becomes a bullet (the kit
    # writes its lists with '-', after a blank line): rewrap it, e.g. "balance\n+ 1".
    problems = []
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "markdown":
                continue
            previous, fenced = "", False
            for line in cell.source.splitlines():
                if line.lstrip().startswith("```"):
                    fenced = not fenced
                elif (not fenced and re.match(r" {0,3}\+\s", line)
                      and previous.strip() and not re.match(r" {0,3}[-*+]\s", previous)):
                    problems.append(f"{path.name} cell {index}: {line[:40]!r} becomes a bullet")
                previous = line
    assert not problems, problems


def test_notebook_pages_show_no_stray_markup(built_site):
    # A code span broken by a line break that the renderer read as markup (a bullet, a
    # heading) leaves its backticks in the text.
    problems = []
    for name in NOTEBOOK_PAGES:
        _, page = _page(built_site / "notebooks" / name / "index.html")
        for match in re.finditer(r".{0,30}`.{0,30}", page.prose):
            problems.append(f"{name}: {match.group(0)!r}")
    assert not problems, problems


def test_home_page_gives_a_learning_path_through_every_notebook(built_site):
    text, _ = _page(built_site / "index.html")
    assert 'id="learning-path"' in text, "the home page has no 'Learning path' section"
    path = text[text.index('id="learning-path"'):]
    path = path[:path.index("</table>")]
    linked = re.findall(r'href="notebooks/(\d\d_\w+)/"', path)
    assert sorted(linked) == NOTEBOOK_PAGES, \
        f"the learning path lists {linked}, the notebooks are {NOTEBOOK_PAGES}: each once"
    rows = re.findall(r"<tr>.*?</tr>", path, re.S)[1:]
    assert all(re.search(r"\d+\s*(s|min)\b", row) for row in rows), \
        "each step of the learning path says how long it takes"


def _uses_your_database(path: Path) -> bool:
    code = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells
                     if c.cell_type == "code")
    return bool(re.search(r"\b(local_settings|database_url)\(", code)) \
        and "throwaway_server(" not in code


def _numbers(names: list[str]) -> str:
    """``["01", "02", "03", "05", "06"]`` -> ``"01–03, 05 and 06"``."""
    runs: list[list[int]] = []
    for n in sorted(int(x) for x in names):
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    items = [i for r in runs
             for i in ([f"{r[0]:02d}–{r[-1]:02d}"] if len(r) > 2 else [f"{n:02d}" for n in r])]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def test_readme_and_quick_start_agree_on_which_notebooks_use_database_url():
    mine = _numbers([p.name[:2] for p in NOTEBOOKS if _uses_your_database(p)])
    throwaway = _numbers([p.name[:2] for p in NOTEBOOKS if not _uses_your_database(p)])
    for doc in (ROOT / "README.md", ROOT / "docs" / "quickstart.md"):
        text = " ".join(doc.read_text(encoding="utf-8").split())
        assert f"notebooks {mine}" in text, f"{doc.name} should name notebooks {mine}"
        assert re.search(rf"[Nn]otebooks? {throwaway}\b[^.]*throwaway", text), \
            f"{doc.name} should say that notebook {throwaway} uses a throwaway server"


def test_browser_fetches_nothing_from_outside_and_shows_charts_at_their_size(browser, site_url,
                                                                            built_site):
    # 1280 x 900, a laptop: every chart at the size it was drawn (not stretched, not
    # shrunk), and no code or output that has to be scrolled sideways.
    outside: list[str] = []
    problems: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("request", lambda r: None if r.url.startswith((site_url, "data:", "blob:"))
            else outside.append(f"{page.url} → {r.url}"))
    page.route(re.compile(r"^(?!" + re.escape(site_url) + ").*"), lambda route: route.abort())
    for path in _pages(built_site):
        url = _url(built_site, path)
        page.goto(site_url + url)
        page.wait_for_load_state("networkidle")
        if not url.startswith("/notebooks/"):
            continue
        charts = page.eval_on_selector_all(".jp-RenderedImage img", """els => els.map(e => ({
            drawn: Number(e.getAttribute('width')) || e.naturalWidth,
            ratio: e.naturalWidth / e.naturalHeight,
            shown: e.getBoundingClientRect().width, height: e.getBoundingClientRect().height}))""")
        for i, c in enumerate(charts):
            if not c["height"]:
                problems.append(f"{url} chart {i + 1}: not shown")
                continue
            stretched = abs(c["shown"] / c["height"] - c["ratio"]) > 0.02
            if abs(c["shown"] - c["drawn"]) > 1 or stretched:
                problems.append(f"{url} chart {i + 1}: drawn {c['drawn']} px wide, shown "
                                f"{c['shown']:.0f} x {c['height']:.0f}")
        wide = page.eval_on_selector_all(
            "article pre, article table",
            "els => els.filter(e => e.scrollWidth > e.clientWidth + 1)"
            "          .map(e => e.innerText.split('\\n')[0].slice(0, 50))")
        problems += [f"{url}: scrolls sideways: {w!r}" for w in wide]
    page.close()
    assert not outside and not problems, outside[:10] + problems[:20]
