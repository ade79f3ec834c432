"""Exercise 09.2, solved: size each worker's pool from the budget.

What was wrong: each of the 4 workers could open pool_size + max_overflow = 15
connections, 60 in all, against a budget of 12: at the busiest moment the server
refused the 13th ("too many connections for role"). The budget is
workers × (pool_size + max_overflow) ≤ 12, so 3 per worker, and a worker needs 3 at
its busiest: pool_size + max_overflow = 3 exactly. Overflow counts against the budget
like the pool itself.
"""

# The service: 4 worker processes, each with its own pool, logging in as a role that may
# open 12 connections (CONNECTION LIMIT 12). At its busiest a worker serves 3 requests
# at once, each holding a connection.
WORKERS, BUDGET, BUSIEST = 4, 12, 3

POOL_SIZE = 2
MAX_OVERFLOW = 1     # WORKERS * (POOL_SIZE + MAX_OVERFLOW) = 12 <= BUDGET; 3 >= BUSIEST
