"""The copy recipe, tested as a copy: the core renamed ``myapp.db`` in a bare environment.

The required core (and the optional ``web`` and ``testing`` modules the promise tests
use) is copied as it is, with no import rewritten, into a package ``myapp.db``, in a
virtual environment that has only SQLAlchemy, the drivers and pytest. There the core's
behaviour tests (``tests/core``) run against the copy: the same tests, the same server.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_CORE = ("__init__.py", "__main__.py", "_private.py", "config.py", "engine.py",
                 "errors.py", "health.py", "metrics.py", "retry.py", "session.py",
                 "watchdog.py")
OPTIONAL_USED = ("web.py", "testing.py")

pytestmark = pytest.mark.slow


def _requirements() -> list[str]:
    wanted = ("sqlalchemy", "asyncpg", "psycopg2-binary")
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines
            if line.strip().lower().startswith(wanted)] + ["pytest>=8.3,<10"]


def _bare_environment() -> Path:
    """A virtual environment with the core's dependencies only, reused while they match."""
    venv = ROOT / "build" / "copy-venv"
    stamp = venv / "requirements.stamp"
    wanted = "\n".join(_requirements())
    if stamp.exists() and stamp.read_text() == wanted:
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet",
                    *_requirements()], check=True, timeout=600)
    stamp.write_text(wanted)
    return venv


def test_the_core_renamed_myapp_db_passes_the_cores_behaviour_tests(
        tmp_path: Path, db_url: URL) -> None:
    venv = _bare_environment()
    package = tmp_path / "src" / "myapp" / "db"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    for name in REQUIRED_CORE + OPTIONAL_USED:
        shutil.copy(ROOT / "labkit" / name, package / name)
    tests = tmp_path / "core_tests"
    shutil.copytree(ROOT / "tests" / "core", tests,
                    ignore=shutil.ignore_patterns("__pycache__"))
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PYTHON", "VIRTUAL_ENV", "PYTEST"))
           and key not in ("DATABASE_URL", "ENVIRONMENT")}  # each call below sets its own
    env.update(LABKIT_CORE="myapp.db", PYTHONPATH=str(tmp_path / "src"),
               LABKIT_CORE_DATABASE_URL=db_url.render_as_string(hide_password=False))
    python = str(venv / "bin" / "python")
    # Nothing of labkit is importable there: the copy stands alone.
    assert subprocess.run([python, "-c", "import labkit"], env=env, cwd=tmp_path,
                          capture_output=True).returncode != 0
    # --basetemp: a second pytest session must not reset /tmp/pytest-of-<user>, where the
    # outer session's throwaway servers live.
    result = subprocess.run(
        [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
         "--basetemp", str(tmp_path / "inner"), str(tests)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", result.stdout).group(1))  # type: ignore[union-attr]
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
         str(ROOT / "tests" / "core")], capture_output=True, text=True, cwd=ROOT)
    expected = int(re.search(r"(\d+) tests? collected", collected.stdout).group(1))  # type: ignore[union-attr]
    assert passed == expected >= 40
    health = subprocess.run([python, "-m", "myapp.db", "health", "--timeout", "5"], env={
        **env, "DATABASE_URL": env["LABKIT_CORE_DATABASE_URL"]}, cwd=tmp_path, capture_output=True,
        text=True)
    assert health.returncode == 0 and health.stdout.startswith("ok: PostgreSQL")
    assert (db_url.password or "\0") not in health.stdout + health.stderr
    for extra, words in (({}, "DATABASE_URL is not set"), ({"ENVIRONMENT": "production"},
                                                            "production")):
        refused = subprocess.run([python, "-m", "myapp.db", "health"], env={**env, **extra},
                                 cwd=tmp_path, capture_output=True, text=True)
        assert refused.returncode == 2 and words in refused.stderr
        assert "Traceback" not in refused.stderr

