"""MkDocs hook: publish the notebooks executed by the test run (``build/notebooks/``).

Notebooks live in git without outputs; ``make test`` (or ``make notebooks``) executes each
once against the database and writes the executed copy to ``build/notebooks/``. This hook
publishes those copies as ``notebooks/<name>.ipynb`` so mkdocs-jupyter renders them with
their charts, without executing anything a second time. A notebook without an executed
copy is published without outputs, with a warning (so ``mkdocs build --strict`` fails).

What JupyterLab shows and what the site shows differ in four ways, all decided here:

- **Progress and log lines stay in JupyterLab.** A long cell reports progress on stderr,
  and labkit logs its warnings there; a reader of the site wants the results, not red
  blocks repeating an error the cell has already printed. The published copy
  (``build/site-notebooks/``) leaves out every ``stderr`` stream, and every
  ``execute_result`` that is a bare ``True``/``False`` (the return value of a clean-up
  call such as ``server.__exit__(...)``): a lesson prints what it wants shown.
- **The table of contents links the headings that are there.** mkdocs-jupyter builds it
  from a Markdown rendering whose slugs differ from the published ids
  (``4-database-down-at-start-up`` for ``4-database-down-at-start-up-wait_for_database``);
  it is rebuilt from the published headings.
- **Links between notebooks lead to their pages.** A notebook links to another as
  JupyterLab resolves it (``05_request_lifecycle.ipynb#client-hang-up``); the published
  page links to ``../05_request_lifecycle/#client-hang-up`` instead.
- **Links are checked, and nothing is fetched from outside.** A ``#anchor`` link inside a
  notebook page that names no id, and two headings with one id (the second's TOC entry
  leads to the first), are warnings, so ``mkdocs build --strict`` fails. The page's ids
  are registered, so MkDocs validates links from other pages into it (``validation:`` in
  ``mkdocs.yml``). nbconvert's MathJax and Mermaid loaders (CDN scripts; no notebook uses
  either) are removed, so the pages read offline.
"""

from __future__ import annotations

import html
import logging
import re
from datetime import datetime
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import nbformat
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files
from mkdocs.structure.toc import get_toc

ROOT = Path(__file__).resolve().parents[2]
EXECUTED = ROOT / "build" / "notebooks"
PUBLISHED = ROOT / "build" / "site-notebooks"
STRAY_RESULTS = {"True", "False"}

log = logging.getLogger("mkdocs.hooks.executed_notebooks")


def publishable(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Return ``nb`` without stderr streams and bare ``True``/``False`` results."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        cell.outputs = [out for out in cell.outputs if not _hidden(out)]
    return nb


def _hidden(out: nbformat.NotebookNode) -> bool:
    if out.output_type == "stream":
        return out.get("name") == "stderr"
    if out.output_type == "execute_result":
        data = out.get("data", {})
        return set(data) == {"text/plain"} and data["text/plain"].strip() in STRAY_RESULTS
    return False


@event_priority(100)  # before mkdocs-jupyter turns .ipynb files into pages
def on_files(files: Files, config) -> Files:
    sources = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    (PUBLISHED / "notebooks").mkdir(parents=True, exist_ok=True)
    for nb in sources:
        executed = EXECUTED / nb.name
        if not executed.exists():
            # `mkdocs serve` still shows the others; `mkdocs build --strict` stops here.
            log.warning("Notebook %s has no executed copy in %s (run `make notebooks`): "
                        "published without outputs.", nb.name, EXECUTED)
            executed = nb
        notebook = nbformat.read(executed, as_version=4)
        _TIMES[nb.stem] = {"runtime": _run_seconds(notebook), "worktime": _work_minutes(notebook)}
        text = nbformat.writes(publishable(notebook))
        target = PUBLISHED / "notebooks" / nb.name
        if not target.exists() or target.read_text(encoding="utf-8") != text:
            target.write_text(text, encoding="utf-8")
        files.append(File(f"notebooks/{nb.name}", src_dir=str(PUBLISHED),
                          dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files


# --- times on the learning path ---------------------------------------------------------

_TIMES: dict[str, dict[str, float | None]] = {}
_TIME_TOKEN = re.compile(r"\{(runtime|worktime):(\d\d_\w+)\}")
WORDS_PER_MINUTE, CODE_LINES_PER_MINUTE = 150, 20


def _run_seconds(nb: nbformat.NotebookNode) -> float | None:
    """How long the cells took to run, from the timings nbclient records in each cell."""
    stamps = [datetime.fromisoformat(stamp.replace("Z", "+00:00"))
              for cell in nb.cells
              for key, stamp in cell.get("metadata", {}).get("execution", {}).items()
              if key in ("iopub.status.busy", "shell.execute_reply")]
    return (max(stamps) - min(stamps)).total_seconds() if stamps else None


def _work_minutes(nb: nbformat.NotebookNode) -> float:
    """Time to read a notebook and follow its code: an estimate from its length."""
    words = sum(len(c.source.split()) for c in nb.cells if c.cell_type == "markdown")
    lines = sum(len(c.source.splitlines()) for c in nb.cells if c.cell_type == "code")
    return max(5, 5 * round((words / WORDS_PER_MINUTE + lines / CODE_LINES_PER_MINUTE) / 5))


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Fill ``{runtime:NN_name}`` / ``{worktime:NN_name}`` from the published notebooks.

    The home page's learning path quotes how long each notebook ran in the run this site
    publishes, so the number cannot drift from the notebook it describes.
    """
    def fill(match: re.Match[str]) -> str:
        kind, name = match.groups()
        value = _TIMES.get(name, {}).get(kind)
        if value is None:
            log.warning("Doc file '%s' asks for the %s of notebook %s, which has no "
                        "executed copy with timings.", page.file.src_uri, kind, name)
            return "?"
        if kind == "worktime":
            return f"{value:.0f} min"
        return f"{value:.0f} s" if value < 60 else f"{value // 60:.0f} min {value % 60:.0f} s"

    return _TIME_TOKEN.sub(fill, markdown)


# --- notebook pages -----------------------------------------------------------------------

_CDN_LOADERS = [
    # nbconvert's MathJax loader and its configuration (mkdocs-jupyter leaves src="")
    re.compile(r"<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->", re.S),
    # nbconvert's Mermaid loader: imports mermaid from a CDN when a diagram is present
    re.compile(r"<script type=\"module\">(?:(?!</script>).)*?mermaid(?:(?!</script>).)*</script>",
               re.S),
]


# A notebook links to another as JupyterLab resolves it (``05_request_lifecycle.ipynb#x``);
# on the site that notebook is the page ``../05_request_lifecycle/``.
_NOTEBOOK_LINK = re.compile(r'href="(\d\d_[A-Za-z0-9_]+)\.ipynb(#[^"]*)?"')


def on_page_content(html_text: str, page, config, files) -> str:
    if not page.file.src_uri.endswith(".ipynb"):
        return html_text
    for pattern in _CDN_LOADERS:
        html_text = pattern.sub("", html_text)

    def to_page(match: re.Match[str]) -> str:
        if files.get_file_from_path(f"notebooks/{match[1]}.ipynb") is None:
            log.warning("Notebook page '%s' links to %s.ipynb, which is not published.",
                        page.file.src_uri, match[1])
        return f'href="../{match[1]}/{match[2] or ""}"'

    html_text = _NOTEBOOK_LINK.sub(to_page, html_text)
    parsed = _Anchors()
    parsed.feed(html_text)
    page.present_anchor_ids = parsed.ids
    page.toc = get_toc(_nest(parsed.headings))
    for href in sorted(set(parsed.local_links) - parsed.ids):
        log.warning("Notebook page '%s' links to '#%s', but there is no such anchor on "
                    "this page.", page.file.src_uri, href)
    seen: set[str] = set()
    for heading in parsed.headings:
        if heading["id"] in seen:  # its TOC entry would lead to the first one
            log.warning("Notebook page '%s' has two headings with the id '#%s'; give them "
                        "different titles.", page.file.src_uri, heading["id"])
        seen.add(heading["id"])
    return html_text


class _Anchors(HTMLParser):
    """Ids, headings (level, id, text) and ``href="#..."`` links of a page's content."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.local_links: list[str] = []
        self.headings: list[dict] = []
        self._heading: dict | None = None
        self._skip = 0  # inside a heading's permalink (the pilcrow)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {name: value or "" for name, value in attrs}
        if attr.get("id"):
            self.ids.add(attr["id"])
        if tag == "a" and attr.get("name"):
            self.ids.add(attr["name"])
        href = attr.get("href", "") if tag == "a" else ""
        if href.startswith("#") and len(href) > 1:
            self.local_links.append(unquote(href[1:]))
        if re.fullmatch(r"h[1-6]", tag) and attr.get("id"):
            self._heading = {"level": int(tag[1]), "id": attr["id"], "name": "",
                             "children": []}
        elif self._heading is not None and "anchor-link" in attr.get("class", "").split():
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if self._heading is None:
            return
        if tag == "a" and self._skip:
            self._skip -= 1
        elif re.fullmatch(r"h[1-6]", tag):
            self._heading["name"] = html.escape(" ".join(self._heading["name"].split()))
            self.headings.append(self._heading)
            self._heading = None

    def handle_data(self, data: str) -> None:
        if self._heading is not None and not self._skip:
            self._heading["name"] += data


def _nest(headings: list[dict]) -> list[dict]:
    """Turn a flat list of headings into the nested TOC tokens MkDocs expects."""
    root: list[dict] = []
    stack: list[dict] = []
    for heading in headings:
        while stack and stack[-1]["level"] >= heading["level"]:
            stack.pop()
        (stack[-1]["children"] if stack else root).append(heading)
        stack.append(heading)
    return root
