"""Which database the notebooks and tests use: ``DATABASE_URL``, else the local server.

The rules are those of ``Settings.from_env``: ``DATABASE_URL`` from the environment or
the repository's ``.env`` (the environment wins); without it, the local server, started
on first use. With ``ENVIRONMENT=production`` a missing ``DATABASE_URL`` is a
``ConfigurationError``, and no local server is started.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL

from labkit.config import Settings
from labkit.lab.envfile import read_env_file
from labkit.lab.server import default_server

__all__ = ["database_url", "environment", "local_settings"]

REPO_ENV_FILE = Path(__file__).resolve().parents[2] / ".env"


def environment(env: Mapping[str, str] | None = None) -> Mapping[str, str]:
    """Return ``env`` as given, or the process environment over the repository's ``.env``."""
    if env is not None:
        return env
    return {**read_env_file(REPO_ENV_FILE), **os.environ}


def _start_local_server() -> URL:
    return default_server().ensure_running().url()


def database_url(env: Mapping[str, str] | None = None) -> URL:
    """Return ``DATABASE_URL`` (environment, then ``.env``); else start the local server.

    The returned ``URL`` masks its password when printed.

    Raises:
        ConfigurationError: ``ENVIRONMENT=production`` and ``DATABASE_URL`` is not set
            (the local server is not started), or a setting is malformed.
    """
    return local_settings(env).url


def local_settings(env: Mapping[str, str] | None = None, **changes: Any) -> Settings:
    """Return ``Settings`` for the notebooks' database, with ``changes`` applied.

    Raises:
        ConfigurationError: As for ``database_url``.
    """
    settings = Settings.from_env(environment(env), default_url=_start_local_server)
    return settings.replace(**changes) if changes else settings
