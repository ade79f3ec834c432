"""The notebook side of labkit: a local PostgreSQL, load generators, faults, charts.

Never imported by the core. Needs the packages of ``requirements.txt``.
"""

from labkit.lab.database import database_url, local_settings
from labkit.lab.server import ClusterError, LocalServer, ServerInfo, default_server

__all__ = [
    "ClusterError",
    "LocalServer",
    "ServerInfo",
    "database_url",
    "default_server",
    "local_settings",
]
