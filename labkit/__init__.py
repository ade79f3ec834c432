"""labkit: PostgreSQL connection management for SQLAlchemy, small enough to copy.

The core needs SQLAlchemy and the drivers only and uses relative imports: copy it under any
name (docs/recipes/copy.md lists it and the optional modules). ``labkit.lab`` is the
notebooks' side and never imported here.
"""

from .config import DEVELOPMENT_POOL, PRODUCTION_POOL, TEST_POOL, PoolProfile, Settings
from .config import build_url, mask_url
from .engine import create_async_engine, create_engine
from .errors import (CommitOutcomeUnknownError, ConfigurationError, ConnectionLostError,
                     DatabaseError, DatabaseUnavailableError, IntegrityError, LabkitError,
                     PoolTimeoutError, QueryTimeoutError, RetryExhaustedError,
                     SerializationError, TransientError)
from .health import HealthReport, async_health_check, health_check
from .metrics import PoolMetrics
from .retry import (DEFAULT_RETRY, RetryPolicy, async_run_in_transaction,
                    async_wait_for_database, run_in_transaction, wait_for_database)
from .session import (async_session_scope, create_async_sessionmaker, create_sessionmaker,
                      session_scope)

__version__ = "0.2.0"

__all__ = [
    "DEFAULT_RETRY", "DEVELOPMENT_POOL", "PRODUCTION_POOL", "TEST_POOL",
    "CommitOutcomeUnknownError", "ConfigurationError", "ConnectionLostError", "DatabaseError",
    "DatabaseUnavailableError", "HealthReport", "IntegrityError", "LabkitError", "PoolMetrics",
    "PoolProfile", "PoolTimeoutError", "QueryTimeoutError", "RetryExhaustedError",
    "RetryPolicy", "SerializationError", "Settings", "TransientError", "async_health_check",
    "async_run_in_transaction", "async_session_scope", "async_wait_for_database", "build_url",
    "create_async_engine", "create_async_sessionmaker", "create_engine", "create_sessionmaker",
    "health_check", "mask_url", "run_in_transaction", "session_scope", "wait_for_database",
]
