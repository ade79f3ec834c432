"""Which database the notebooks and tests use: ``DATABASE_URL``, else the local server."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import URL

from labkit.config import Settings, parse_url
from labkit.lab.server import default_server

__all__ = ["database_url", "local_settings"]


def database_url(env: Mapping[str, str] | None = None) -> URL:
    """Return ``DATABASE_URL`` when set; otherwise start (or reuse) the local server.

    The returned ``URL`` masks its password when printed.
    """
    env = os.environ if env is None else env
    raw = env.get("DATABASE_URL", "").strip()
    if raw:
        return parse_url(raw)
    return default_server().ensure_running().url()


def local_settings(env: Mapping[str, str] | None = None, **changes: Any) -> Settings:
    """Return :class:`Settings` for the notebooks' database, with ``changes`` applied."""
    env = os.environ if env is None else env
    settings = Settings.from_env(env, default_url=database_url(env) if not env.get(
        "DATABASE_URL", "").strip() else None)
    return settings.replace(**changes) if changes else settings
