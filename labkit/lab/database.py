"""Which database the notebooks and tests use: ``DATABASE_URL``, else the local server."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL

from labkit.config import Settings, parse_url, read_env_file
from labkit.lab.server import default_server

REPO_ENV_FILE = Path(__file__).resolve().parents[2] / ".env"


def environment(env: Mapping[str, str] | None = None) -> Mapping[str, str]:
    """``env`` as given, or the process environment over the repository's ``.env``."""
    if env is not None:
        return env
    return {**read_env_file(REPO_ENV_FILE), **os.environ}

__all__ = ["database_url", "environment", "local_settings"]


def database_url(env: Mapping[str, str] | None = None) -> URL:
    """Return ``DATABASE_URL`` (environment, then ``.env``); else start the local server.

    The returned ``URL`` masks its password when printed.
    """
    env = environment(env)
    raw = env.get("DATABASE_URL", "").strip()
    if raw:
        return parse_url(raw)
    return default_server().ensure_running().url()


def local_settings(env: Mapping[str, str] | None = None, **changes: Any) -> Settings:
    """Return :class:`Settings` for the notebooks' database, with ``changes`` applied."""
    env = environment(env)
    settings = Settings.from_env(env, default_url=database_url(env) if not env.get(
        "DATABASE_URL", "").strip() else None)
    return settings.replace(**changes) if changes else settings
