"""Read a ``.env`` file: ``KEY=VALUE`` lines, for the notebooks, tests and lab commands.

The lab's copy of the reader (the core reads only the environment). Callers merge it
under the environment, which wins: ``{**read_env_file(path), **os.environ}``.
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path

from labkit.errors import ConfigurationError

__all__ = ["read_env_file"]

logger = logging.getLogger(__name__)


def read_env_file(path: str | Path) -> dict[str, str]:
    """Read ``KEY=VALUE`` lines from a ``.env`` file (``#`` comments, optional quotes).

    Logs a warning when the file is readable or writable by group or others: it usually
    holds the database password, so it should be ``chmod 600``. A missing file reads as
    empty.

    Raises:
        ConfigurationError: The file cannot be read, or a line is not ``KEY=VALUE``.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return {}
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("%s is accessible to other users (mode %o); it may hold a password: "
                       "chmod 600 %s", path, stat.S_IMODE(mode), path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}") from None
    values: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigurationError(f"{path}:{number}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        values[key.strip()] = value
    return values
