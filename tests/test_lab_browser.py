"""``make lab`` as a learner uses it: JupyterLab in a real (headless) browser.

JupyterLab starts with the command ``make lab`` runs (read from ``make --dry-run lab``), on a
free port with a token of its own, against the suite's server. Chromium then does what a
learner does: opens ``01_first_contact.ipynb`` from the file browser, picks *Run → Run All
Cells* from the menu bar, and waits. Every code cell must have run (an execution count in its
prompt), none may show a traceback, and the first chart must be on screen.

The notebook is never saved (it is committed without outputs): autosave is off in a settings
folder of the test's own, and the server's log must show no save. Screenshots land in
``build/screenshots/`` (the first chart always; the whole window when a check fails).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import URL

from labkit.testing import create_database

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "build" / "screenshots"
NOTEBOOK = ROOT / "notebooks" / "01_first_contact.ipynb"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# The site check's flags. Without --no-sandbox Chromium refuses to start as root.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
# A database of its own on the suite's server: notebook 01 creates and drops its tables
# while tests/test_notebooks.py may be running the same notebook on the other worker.
LAB_DATABASE = "labkit_lab"
# Bounds, each far above the few seconds each step takes on a 2-core machine.
SERVER_START_S = 45
NOTEBOOK_OPEN_S = 45
RUN_ALL_S = 90

pytestmark = pytest.mark.slow


def lab_command() -> list[str]:
    """``make lab``'s last step, the JupyterLab command, with this interpreter's venv."""
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MFLAGS", "MAKELEVEL"}}
    proc = subprocess.run(["make", "--no-print-directory", "--dry-run", "lab",
                           f"VENV={sys.prefix}"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=30, check=True)
    jupyter = str(Path(sys.prefix) / "bin" / "jupyter")
    lines = [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]
    found = [words for words in lines if words[:2] == [jupyter, "lab"]]
    assert found, f"`make lab` runs no `{jupyter} lab`:\n{proc.stdout}"
    return found[-1]


@pytest.fixture(scope="module")
def lab(db_url: URL, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """JupyterLab as ``make lab`` starts it, plus: no browser of its own, any free port, a
    token, autosave off, settings, workspaces and runtime files in a folder of the test's."""
    url = db_url.set(database=LAB_DATABASE)
    create_database(url, allow_any=True)
    home = tmp_path_factory.mktemp("lab")
    settings = home / "settings" / "@jupyterlab" / "docmanager-extension"
    settings.mkdir(parents=True)
    (settings / "plugin.jupyterlab-settings").write_text(json.dumps({"autosave": False}))
    token = secrets.token_hex(16)
    command = lab_command() + [
        "--no-browser", "--ip=127.0.0.1", "--port=0", f"--IdentityProvider.token={token}",
        f"--LabApp.user_settings_dir={home / 'settings'}",
        f"--LabApp.workspaces_dir={home / 'workspaces'}"]
    env = {**os.environ, "DATABASE_URL": url.render_as_string(hide_password=False),
           "JUPYTER_RUNTIME_DIR": str(home / "runtime")}
    log = (home / "lab.log").open("wb")
    server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        base = _wait_until_serving(server, token, home / "runtime", home / "lab.log")
        yield {"base": base, "token": token, "log": home / "lab.log"}
    finally:
        _stop(server)
        log.close()
    saved = [line for line in (home / "lab.log").read_text().splitlines() if "Saving" in line]
    assert not saved, f"JupyterLab saved a notebook (committed without outputs): {saved}"


def _wait_until_serving(server: subprocess.Popen[bytes], token: str, runtime: Path,
                        log: Path) -> str:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        assert server.poll() is None, f"jupyter lab exited:\n{log.read_text()[-3000:]}"
        for info in runtime.glob("jpserver-*.json"):
            try:
                base = json.loads(info.read_text())["url"].rstrip("/")
                status = urllib.request.Request(
                    f"{base}/api/status", headers={"Authorization": f"token {token}"})
                with urllib.request.urlopen(status, timeout=5):
                    return str(base)
            except (ValueError, KeyError, OSError):
                pass  # written but not yet complete, or not yet answering
        time.sleep(0.25)
    raise AssertionError(f"jupyter lab not serving after {SERVER_START_S} s:\n"
                         f"{log.read_text()[-3000:]}")


def _stop(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM: the server shuts its kernels down and exits; its process group goes after."""
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(server.pid, signal.SIGKILL)  # kernels left behind, if any
    except ProcessLookupError:
        pass
    server.wait(timeout=10)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium; "
                    "`make test` installs it when run as root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        instance = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


# The prompts of the notebook's code cells: "[ ]:" not run, "[*]:" running or queued,
# "[7]:" run.
_PROMPTS = "() => [...document.querySelectorAll('.jp-NotebookPanel .jp-CodeCell')]" \
           ".map(c => (c.querySelector('.jp-InputPrompt') || {}).textContent || '')"
# Shown while the kernel starts, runs or restarts; "idle" once it waits for work.
_KERNEL_IDLE = ".jp-NotebookPanel .jp-Notebook-ExecutionIndicator[data-status='idle']"


def test_run_all_cells_of_notebook_01_shows_outputs_and_the_first_chart(browser, lab):
    SHOTS.mkdir(parents=True, exist_ok=True)
    (SHOTS / "lab-01-failed.png").unlink(missing_ok=True)  # a previous run's
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        _run_notebook_01(page, lab)
    except BaseException:
        page.screenshot(path=str(SHOTS / "lab-01-failed.png"))
        print(f"screenshot: {SHOTS / 'lab-01-failed.png'}\njupyter lab's log:\n"
              f"{lab['log'].read_text()[-3000:]}")
        raise
    finally:
        page.close()


def _run_notebook_01(page: Any, lab: dict[str, Any]) -> None:
    page.goto(f"{lab['base']}/lab?token={lab['token']}")
    # The file browser lists notebooks/ (make lab's notebook folder): open 01 by double-click.
    entry = page.locator(f".jp-DirListing-item[title*='{NOTEBOOK.name}']")
    entry.wait_for(timeout=NOTEBOOK_OPEN_S * 1000)
    entry.dblclick()
    # Loaded: every code cell of the file on the page, and the kernel started and idle.
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code_cells = sum(cell["cell_type"] == "code" for cell in cells)
    page.wait_for_function(
        f"n => ({_PROMPTS})().length === n && document.querySelector(\"{_KERNEL_IDLE}\")",
        arg=code_cells, timeout=NOTEBOOK_OPEN_S * 1000, polling=250)
    prompts = page.evaluate(_PROMPTS)
    assert not any(re.search(r"\d", p) for p in prompts), f"cells ran before Run All: {prompts}"

    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    started = time.monotonic()
    # Done: no cell queued or running, and the kernel idle. A failing cell stops the run: the
    # cells after it are left unnumbered, which the checks below report.
    page.wait_for_function(
        f"() => {{ const p = ({_PROMPTS})(); return p.some(t => /\\d/.test(t)) && "
        f"!p.some(t => t.includes('*')) && "
        f"document.querySelector(\"{_KERNEL_IDLE}\") !== null; }}",
        timeout=RUN_ALL_S * 1000, polling=250)
    elapsed = time.monotonic() - started

    prompts = page.evaluate(_PROMPTS)
    tracebacks = page.eval_on_selector_all(
        ".jp-NotebookPanel .jp-OutputArea-output",
        "els => els.map(e => e.textContent).filter(t => t.includes('Traceback'))"
        ".map(t => t.slice(0, 1500))")
    assert not tracebacks, "a cell failed:\n" + "\n---\n".join(tracebacks)
    not_run = [i for i, p in enumerate(prompts, 1) if not re.search(r"\[\d+\]", p)]
    assert not not_run, f"code cells {not_run} of {len(prompts)} did not run: {prompts}"
    counts = [int(re.search(r"\d+", p).group()) for p in prompts]  # type: ignore[union-attr]
    assert counts == list(range(1, len(prompts) + 1)), f"not run top to bottom: {prompts}"
    with_output = page.eval_on_selector_all(
        ".jp-NotebookPanel .jp-CodeCell",
        "cells => cells.filter(c => c.querySelector('.jp-OutputArea-output')).length")
    assert with_output >= len(prompts) // 3, \
        f"only {with_output} of {len(prompts)} code cells show an output"

    # A chart: a PNG or SVG output (JupyterLab shows either in an <img>), or an inline <svg>.
    charts = page.locator(".jp-NotebookPanel .jp-OutputArea-output"
                          ":is(.jp-RenderedImage, .jp-RenderedSVG) :is(img, svg)")
    assert charts.count() >= 1, f"no chart among the outputs of {len(prompts)} code cells"
    chart = charts.first
    chart.scroll_into_view_if_needed(timeout=10_000)
    shown = chart.evaluate(
        "e => ({width: e.getBoundingClientRect().width, height: e.getBoundingClientRect()"
        ".height, loaded: e.tagName.toLowerCase() === 'svg' || (e.complete && "
        "e.naturalWidth > 100)})")
    assert shown["loaded"] and shown["width"] >= 300 and shown["height"] >= 150, \
        f"the first chart is not shown: {shown}"
    chart.screenshot(path=str(SHOTS / "lab-01-first-chart.png"))
    print(f"Run All Cells: {len(prompts)} code cells in {elapsed:.1f} s, {with_output} with "
          f"output; first chart {shown['width']:.0f}x{shown['height']:.0f} px")
