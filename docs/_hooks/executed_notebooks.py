"""MkDocs hook: publish the notebooks executed by the test run (``build/notebooks/``).

Notebooks live in git without outputs; ``make test`` (or ``make notebooks``) executes each
once against the database and writes the executed copy to ``build/notebooks/``. This hook
adds those copies to the site as ``notebooks/<name>.ipynb`` so mkdocs-jupyter renders them
with their charts, without executing anything a second time.
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
EXECUTED = ROOT / "build" / "notebooks"


@event_priority(100)  # before mkdocs-jupyter turns .ipynb files into pages
def on_files(files: Files, config) -> Files:
    sources = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    missing = [nb.name for nb in sources if not (EXECUTED / nb.name).exists()]
    if missing:
        raise PluginError(
            f"executed notebooks missing in {EXECUTED}: {', '.join(missing)}. "
            "Run `make notebooks` (or `make test`) first.")
    for nb in sources:
        files.append(File(f"notebooks/{nb.name}", src_dir=str(EXECUTED.parent),
                          dest_dir=config["site_dir"],
                          use_directory_urls=config["use_directory_urls"]))
    return files
