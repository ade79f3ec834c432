"""The documentation site: built strictly, then read in a real (headless) browser.

Runs after the notebook tests (files are collected in name order), publishing the copies
they executed. Screenshots land in ``build/screenshots/``.
"""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import labkit

ROOT = Path(__file__).resolve().parents[1]
SITE = ROOT / "site"
SHOTS = ROOT / "build" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NOTEBOOK_PAGES = sorted(p.stem for p in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]

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
