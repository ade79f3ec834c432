"""Execute every notebook against the real server; a failing cell fails the suite.

Executed copies (with outputs and charts) are written to ``build/notebooks/`` so the
documentation site publishes exactly what this run measured, without running twice.

A learner's laptop is busy too. With ``LABKIT_BUSY_CORES=n`` (``make test-busy`` sets 1)
the notebooks run while ``n`` unrelated CPU-bound processes, each pinned to a core, keep
those cores busy for the whole session; the executed copies then go to
``build/notebooks-busy/`` and the site's copies are left alone. Every notebook's
assertions must hold either way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from sqlalchemy.engine import URL

from labkit.testing import create_database

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
BUSY_CORES = int(os.environ.get("LABKIT_BUSY_CORES") or 0)
EXECUTED = ROOT / "build" / ("notebooks-busy" if BUSY_CORES > 0 else "notebooks")
# ``make test`` runs this module on one worker while the rest of the suite runs on the
# other, so the notebooks get a database of their own on the same server.
NOTEBOOK_DATABASE = "labkit_notebooks"
# Charts each notebook must draw at least (the issue for each notebook says how many).

# Notebook 08 draws the same charts for root and for an ordinary user: its partitions run
# in a user namespace, or through the fault proxy where the kernel allows none.
MIN_CHARTS = {"02_pool_behaviour": 8, "04_commit_semantics": 6, "07_failure_cases": 11,
              "06_async_vs_sync": 3, "03_pool_sizing": 10,
              "08_network": 8,
              "05_request_lifecycle": 12, "09_beyond_one_process": 8, "10_testing": 2,
              "11_drivers": 9, "12_fleet": 11}


# An unrelated CPU-bound process: a busy loop on one core (like a compiler or a video call).
_BURNER = """
import os, sys
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {int(sys.argv[1])})
while True:
    pass
"""


def _cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, seconds) a process has used so far; None where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def busy_cores() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Keep ``LABKIT_BUSY_CORES`` cores busy while the notebooks run (none by default)."""
    if BUSY_CORES <= 0:
        yield []
        return
    cpus = (sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else list(range(os.cpu_count() or 1)))
    if BUSY_CORES >= len(cpus):
        pytest.fail(f"LABKIT_BUSY_CORES={BUSY_CORES} leaves none of {len(cpus)} cores free")
    burners = [subprocess.Popen([sys.executable, "-c", _BURNER, str(cpu)])
               for cpu in cpus[-BUSY_CORES:]]
    try:
        yield burners
    finally:
        for burner in burners:
            burner.kill()
        for burner in burners:
            burner.wait()


@pytest.fixture(scope="module")
def notebook_url(db_url: URL) -> Iterator[URL]:
    """The notebooks' own database beside the suite's, handed to their kernels as
    ``DATABASE_URL`` (which every notebook honours), so no table is shared with a test
    running at the same time."""
    url = db_url.set(database=NOTEBOOK_DATABASE)
    create_database(url, allow_any=True)
    patch = pytest.MonkeyPatch()
    patch.setenv("DATABASE_URL", url.render_as_string(hide_password=False))
    try:
        yield url
    finally:
        patch.undo()


def test_notebooks_are_found():
    assert len(NOTEBOOKS) >= 3


@pytest.mark.notebook
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path: Path, notebook_url: URL, busy_cores) -> None:
    nb = nbformat.read(path, as_version=4)
    assert not any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), \
        f"{path.name} is committed with outputs; clear them"
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    burned = [_cpu_seconds(burner.pid) for burner in busy_cores]
    start = time.monotonic()
    client.execute()
    elapsed = time.monotonic() - start
    busy = ""
    if busy_cores:
        assert all(burner.poll() is None for burner in busy_cores), "a CPU burner stopped"
        used = [_cpu_seconds(b.pid) for b in busy_cores]
        if None not in used and None not in burned:
            share = [(u - b) / elapsed for u, b in zip(used, burned)]  # type: ignore[operator]
            busy = ", busy cores: " + " ".join(f"{s:.2f}" for s in share) + " CPU each"
            # The run counts as busy only if the burners really ran (they share their
            # cores with whatever else the machine is doing).
            assert min(share) > 0.1, f"the CPU burners got only {share} of a core"
    EXECUTED.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, EXECUTED / path.name)
    images = sum("image/png" in out.get("data", {})
                 for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
    print(f"{path.name}: {elapsed:.1f} s, {images} charts{busy}")
    assert images >= MIN_CHARTS.get(path.stem, 1), f"{path.name} drew only {images} charts"
    password = notebook_url.password or ""
    if password:
        assert password not in nbformat.writes(nb), f"{path.name} printed the password"
