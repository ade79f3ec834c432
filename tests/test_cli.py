"""``python -m labkit health --json`` and ``python -m labkit.lab db up|down|status|url``;
never a password in the output.

Exit codes: 0 healthy (running), 1 not healthy (not running), 2 usage or configuration
error.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import URL


ROOT = Path(__file__).resolve().parents[1]


def url_as_text(url: URL) -> str:
    """The URL with its password, as DATABASE_URL or ``--url`` takes it."""
    return url.render_as_string(hide_password=False)


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
            cwd: Path = ROOT, module: str = "labkit") -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("DATABASE_URL", "ENVIRONMENT")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def run_lab(*args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m labkit.lab ...``: the local server's commands."""
    return run_cli(*args, env=env, timeout=timeout, module="labkit.lab")


@pytest.fixture
def lab_home() -> Iterator[Path]:
    """A ``LABKIT_HOME`` for a private local server, outside pytest's temporary root."""
    folder = Path(tempfile.mkdtemp(prefix="labkit-cli-"))
    yield folder / "home"
    shutil.rmtree(folder, ignore_errors=True)


def test_health_json_ok_on_the_server_under_test(db_url, password):
    proc = run_cli("health", "--json", "--url", url_as_text(db_url))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is True
    assert {"ok", "latency_ms", "server_version", "error"} <= set(report)
    assert password not in proc.stdout + proc.stderr


def test_health_reads_database_url_from_the_environment(db_url, password):
    proc = run_cli("health", env={"DATABASE_URL": url_as_text(db_url)})
    assert proc.returncode == 0
    assert proc.stdout.startswith("ok: PostgreSQL")
    assert password not in proc.stdout + proc.stderr


def test_health_on_a_stopped_server_exits_1_within_3_seconds(stopped_server_url):
    start = time.monotonic()
    proc = run_cli("health", "--json", "--timeout", "2", "--url", url_as_text(stopped_server_url))
    elapsed = time.monotonic() - start
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["ok"] is False and report["error"] == "DatabaseUnavailableError"
    assert elapsed < 3 + 1.0  # interpreter start-up included; the probe itself is bounded
    assert stopped_server_url.password not in proc.stdout + proc.stderr


def test_health_on_a_hung_server_answers_within_its_timeout(hung_port):
    start = time.monotonic()
    proc = run_cli("health", "--json", "--timeout", "1",
                   "--url", f"postgresql://u:hunter2@127.0.0.1:{hung_port}/d")
    assert time.monotonic() - start < 1 + 2.0
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["error"] == "DatabaseUnavailableError"  # was HealthCheckTimeoutError
    assert "did not answer the health check within 1 s" in report["message"]
    assert "hunter2" not in proc.stdout + proc.stderr


def test_health_on_an_unresolvable_host_is_unavailable_within_its_timeout():
    start = time.monotonic()
    proc = run_cli("health", "--json", "--timeout", "2",
                   "--url", "postgresql://u:hunter2@nonexistent.invalid:5432/d")
    assert time.monotonic() - start < 2 + 2.0
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["error"] == "DatabaseUnavailableError"
    assert "hunter2" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("url", [
    "postgresql://u:hunter2@127.0.0.1:99999/d",
    "definitely not a url hunter2",
    "mysql://u:hunter2@127.0.0.1/d",
    "postgresql://u:hunter2@127.0.0.1/d?sslmod=require",
    "postgresql://u:hunter2@127.0.0.1/d?sslrootcert=/etc/ssl/root.crt",
])
def test_health_with_bad_urls_explains_without_the_password(url):
    """A URL that cannot be used is a configuration error: exit 2, as documented."""
    proc = run_cli("health", "--json", "--url", url)
    assert proc.returncode == 2
    report = json.loads(proc.stdout)
    assert report["error"] == "ConfigurationError"
    assert "hunter2" not in proc.stdout + proc.stderr


def test_health_with_wrong_password_says_authentication(db_url):
    if not db_url.password:
        pytest.skip("the server under test uses no password")
    proc = run_cli("health", "--json", "--url", url_as_text(db_url.set(password="Wr0ng!pw")))
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["error"] == "AuthenticationError"
    assert "Wr0ng!pw" not in proc.stdout + proc.stderr


def test_db_commands_on_a_private_server(lab_home):
    env = {"LABKIT_HOME": str(lab_home)}
    assert run_lab("db", "status", env=env).returncode == 1
    up = run_lab("db", "up", env=env)
    assert up.returncode == 0, up.stderr
    last_line = up.stdout.strip().splitlines()[-1]
    assert last_line.startswith("postgresql://postgres:***@127.0.0.1:")
    try:
        assert run_lab("db", "status", env=env).returncode == 0
        again = run_lab("db", "up", env=env)  # reuses the running server
        assert again.stdout.strip().splitlines()[-1] == last_line
        revealed = run_lab("db", "url", "--reveal", env=env).stdout.strip()
        password = revealed.split(":")[2].split("@")[0]
        assert len(password) > 10
        # health checks DATABASE_URL only (no local-server fallback any more)
        healthy = run_cli("health", "--json", env={**env, "DATABASE_URL": revealed})
        assert json.loads(healthy.stdout)["ok"] is True
        for proc in (up, again, healthy):
            assert password not in proc.stdout + proc.stderr
    finally:
        assert run_lab("db", "down", env=env).returncode == 0
    start = time.monotonic()
    down = run_cli("health", "--json", "--timeout", "2",
                   env={**env, "DATABASE_URL": revealed})
    assert down.returncode == 1, down.stdout + down.stderr
    assert time.monotonic() - start < 3 + 1.0
    assert json.loads(down.stdout)["error"] == "DatabaseUnavailableError"
    assert password not in down.stdout + down.stderr
    assert run_lab("db", "status", env=env).returncode == 1
    run_lab("db", "down", "--destroy", env=env)


def _answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="only as root does the server run as another user")
def test_db_down_never_reports_stopped_while_the_server_still_runs(lab_home):
    """When the server's user can no longer reach its folder (pytest resets
    /tmp/pytest-of-<user> to 0700 at every session start), ``db down`` used to print
    "stopped" and exit 0 with the server still answering; ``--destroy`` deleted its files
    and left it running, orphaned."""
    env = {"LABKIT_HOME": str(lab_home)}
    up = run_lab("db", "up", env=env)
    assert up.returncode == 0, up.stderr
    port = int(up.stdout.strip().splitlines()[-1].rsplit(":", 1)[1].split("/")[0])
    assert _answers(port)
    try:
        os.chmod(lab_home.parent, 0o700)  # what pytest does to its temporary root
        down = run_lab("db", "down", env=env)
        assert down.returncode == 1, down.stdout + down.stderr
        assert "Permission denied" in down.stderr and "stopped" not in down.stdout
        assert _answers(port)  # the error told the truth: the server still runs
        destroyed = run_lab("db", "down", "--destroy", env=env)
        assert destroyed.returncode == 0, destroyed.stdout + destroyed.stderr
        assert not _answers(port)
        assert not lab_home.exists()
    finally:  # never leave a server behind, whatever failed
        os.chmod(lab_home.parent, 0o711)
        run_lab("db", "down", "--destroy", env=env)


def test_lab_db_usage_errors_exit_2():
    for args in ((), ("db",), ("db", "restart"), ("db", "url", "--bogus")):
        proc = run_lab(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "usage: python -m labkit.lab" in proc.stderr


def test_lab_db_url_without_a_server_exits_1(tmp_path):
    env = {"LABKIT_HOME": str(tmp_path / "home")}
    for args in (("db", "url"), ("db", "url", "--reveal")):
        proc = run_lab(*args, env=env)
        assert proc.returncode == 1
        assert proc.stdout == "" and "no local server initialised" in proc.stderr
    status = run_lab("db", "status", env=env)
    assert status.returncode == 1 and status.stdout.strip() == "not-initialized"


def test_lab_envfile_reads_key_values_and_warns_when_others_can_read(tmp_path, caplog):
    from labkit.errors import ConfigurationError
    from labkit.lab.envfile import read_env_file

    path = tmp_path / ".env"
    assert read_env_file(path) == {}  # a missing file reads as empty
    path.write_text("# comment\nexport DATABASE_URL='postgresql://u:hunter2@h/d'\n\n"
                    "DB_POOL_SIZE=7  # seven\nENVIRONMENT=\"test\"\n")
    path.chmod(0o600)
    with caplog.at_level("WARNING"):
        assert read_env_file(path) == {"DATABASE_URL": "postgresql://u:hunter2@h/d",
                                       "DB_POOL_SIZE": "7", "ENVIRONMENT": "test"}
    assert not caplog.records
    path.chmod(0o644)
    with caplog.at_level("WARNING"):
        read_env_file(path)
    assert "chmod 600" in caplog.text and "hunter2" not in caplog.text
    path.write_text("not a setting\n")
    with pytest.raises(ConfigurationError, match=":1: expected KEY=VALUE"):
        read_env_file(path)


SPECIAL = "p@ss:w/rd?#%&= '\"x"


@pytest.fixture
def special_role(throwaway_server):
    """A role on the throwaway server whose password holds every URL-special character."""
    from sqlalchemy import text

    from labkit import TEST_POOL, Settings, create_engine

    admin = create_engine(Settings(url=throwaway_server.info().url()), pool=TEST_POOL)
    with admin.begin() as conn:
        conn.execute(text("DROP ROLE IF EXISTS labkit_special"))
        quoted = SPECIAL.replace("'", "''")
        conn.execute(text(f"CREATE ROLE labkit_special LOGIN PASSWORD '{quoted}'"))
    yield throwaway_server.info()
    with admin.begin() as conn:
        conn.execute(text("DROP ROLE IF EXISTS labkit_special"))
    admin.dispose()


def test_special_characters_in_password_work_when_built_with_build_url(special_role):
    from labkit import build_url

    url = build_url(user="labkit_special", password=SPECIAL, host=special_role.host,
                    port=special_role.port, database=special_role.database)
    proc = run_cli("health", "--json", "--url", url_as_text(url))
    assert proc.returncode == 0, proc.stdout
    assert json.loads(proc.stdout)["ok"] is True
    assert SPECIAL not in proc.stdout + proc.stderr

    wrong = build_url(user="labkit_special", password=SPECIAL + "!", host=special_role.host,
                      port=special_role.port, database=special_role.database)
    proc = run_cli("health", "--json", "--url", url_as_text(wrong))
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["error"] == "AuthenticationError"
    assert "p@ss" not in proc.stdout + proc.stderr


def test_special_characters_pasted_unencoded_are_refused_without_leaking(special_role):
    raw = (f"postgresql://labkit_special:{SPECIAL}@{special_role.host}:{special_role.port}"
           f"/{special_role.database}")
    proc = run_cli("health", "--json", "--url", raw)
    assert proc.returncode == 2
    report = json.loads(proc.stdout)
    assert report["error"] == "ConfigurationError"
    for fragment in ("p@ss", "w/rd", "%&="):
        assert fragment not in proc.stdout + proc.stderr


def test_unencoded_at_in_the_password_is_a_configuration_error_not_a_host_error(db_url):
    """Pins: ``app:S3cr@tPass@host`` exits 2 with a ``ConfigurationError`` that says to
    percent-encode; before, it was "could not translate host name" for ``tPass@host``,
    leaking the end of the password, reported as "Is the server running"."""
    raw = f"postgresql://app:S3cr@tPass@{db_url.host}:{db_url.port}/{db_url.database}"
    proc = run_cli("health", "--json", "--url", raw)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["error"] == "ConfigurationError" and "%40" in report["message"]
    output = proc.stdout + proc.stderr
    assert "tPass" not in output and "S3cr" not in output
    assert "server running" not in output


# --- production guard ----------------------------------------------------------------

@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_health_in_production_without_database_url_is_refused(json_flag):
    """Pins: ``ENVIRONMENT=production python -m labkit health`` with no DATABASE_URL exits
    2 naming DATABASE_URL; before, it quietly checked the local server and said ok."""
    proc = run_cli("health", *json_flag, env={"ENVIRONMENT": "production"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "DATABASE_URL is not set" in proc.stderr and "production" in proc.stderr
    assert "ok: PostgreSQL" not in proc.stdout
    if json_flag:
        report = json.loads(proc.stdout)
        assert report["ok"] is False and report["error"] == "ConfigurationError"
        assert "DATABASE_URL" in report["message"]


def test_health_in_production_with_database_url_checks_it(db_url, password):
    proc = run_cli("health", env={"ENVIRONMENT": "production",
                                  "DATABASE_URL": url_as_text(db_url)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert password not in proc.stdout + proc.stderr


@pytest.mark.parametrize("helper", ["database_url", "local_settings"])
def test_make_lab_database_step_refuses_production_without_database_url(tmp_path, helper):
    """Pins: the first step of ``make lab`` (``labkit.lab.database_url()``), and
    ``local_settings()``, raise a ``ConfigurationError`` naming DATABASE_URL in
    production, and start no local server on the way (``LABKIT_HOME`` stays empty)."""
    home = tmp_path / "home"
    code = f"from labkit.lab import {helper}; print('database:', {helper}())"
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(ENVIRONMENT="production", LABKIT_HOME=str(home))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "database:" not in proc.stdout
    assert "ConfigurationError: DATABASE_URL is not set" in proc.stderr
    assert not home.exists() or not any(home.iterdir()), sorted(home.iterdir())


# --- only --url and DATABASE_URL ---------------------------------------------------------

def test_health_reads_neither_dotenv_nor_a_local_server(tmp_path, closed_port):
    """Pins: ``python -m labkit health`` checks ``--url``, else ``DATABASE_URL`` from the
    environment, nothing else: a ``./.env`` is not read (merge it into the environment
    yourself) and no local server is guessed or started; without a URL it exits 2."""
    (tmp_path / ".env").write_text(
        f"DATABASE_URL=postgresql://u:hunter2@127.0.0.1:{closed_port}/d\n")
    (tmp_path / ".env").chmod(0o600)
    home = tmp_path / "home"
    for json_flag in ([], ["--json"]):
        proc = run_cli("health", *json_flag, cwd=tmp_path, env={"LABKIT_HOME": str(home)})
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "DATABASE_URL is not set" in proc.stderr
        assert "hunter2" not in proc.stdout + proc.stderr
        if json_flag:
            assert json.loads(proc.stdout)["error"] == "ConfigurationError"
    assert not home.exists()
