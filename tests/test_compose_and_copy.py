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
