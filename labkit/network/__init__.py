"""Optional: engines for the network between the application and PostgreSQL.

``tcp`` (TCP keepalives and ``TCP_USER_TIMEOUT`` on both drivers) and ``pooler`` (engines
for PgBouncer in transaction mode), each useful alone. They need the core beside them
(``from ..config import Settings``); the core never imports them. Nothing here is imported
by this package itself.
"""
