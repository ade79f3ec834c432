"""The reference service's entry points, kept for ``uvicorn examples.fastapi_app:app``.

The service itself lives in ``examples/service/`` (start with its ``__init__.py``);
this module only re-exports what notebooks, tests and docs import from here::

    uvicorn examples.fastapi_app:app                      # sync handlers
    uvicorn examples.fastapi_app:async_app                # the async twin
    uvicorn examples.fastapi_app:create_app --factory     # settings read at start-up
"""

from examples.service.db import AsyncSessionDep, SessionDep
from examples.service.main import app, async_app, create_app, create_async_app
from examples.service.routes import READY_TIMEOUT

__all__ = ["READY_TIMEOUT", "AsyncSessionDep", "SessionDep", "app", "async_app",
           "create_app", "create_async_app"]
