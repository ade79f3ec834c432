"""Exercise 09.2, solved: size each worker's pool from the budget, the probe counted.

What was wrong: each of the 4 workers could open pool_size + max_overflow = 15
connections, plus the one its health probe keeps: 64 in all, against a budget of 16.
The first worker took the whole budget and the server refused the second one ("too
many connections for role"). The budget is workers × (pool_size + max_overflow + 1
probe) ≤ 16, so 4 per worker, 3 of them for the pool; and a worker needs 3 at its
busiest: pool_size + max_overflow = 3 exactly. Overflow and the probe count against
the budget like the pool itself.
"""

# The service: 4 worker processes, each with its own pool and labkit's health probe (one
# connection of its own per engine), logging in as a role that may open 16 connections
# (CONNECTION LIMIT 16). At its busiest a worker serves 3 requests at once, each holding
# a connection.
WORKERS, BUDGET, BUSIEST = 4, 16, 3

POOL_SIZE = 2
MAX_OVERFLOW = 1     # WORKERS * (POOL_SIZE + MAX_OVERFLOW + 1) = 16 <= BUDGET; 3 >= BUSIEST
