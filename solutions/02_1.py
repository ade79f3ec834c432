"""Solution 02.1: a pool that serves the burst in two waves.

What was wrong: 3 + 2 = 5 connections serve 12 requests of 0.3 s in three waves; the
third wave would start after 0.6 s, longer than ``pool_timeout`` (0.5 s), so its requests
gave up with ``PoolTimeoutError``. With 6 connections the burst takes two waves: the
second starts after 0.3 s, well within the timeout. Raising ``pool_timeout`` instead
would only let requests queue longer. 6 in all (here 4 kept, 2 overflow for the burst)
stays within the 8 connections the server gives this process.
"""

POOL_SIZE = 4        # connections kept open between bursts
MAX_OVERFLOW = 2     # opened for a burst, closed after it: 6 in all, two waves of 0.3 s
POOL_TIMEOUT = 0.5   # seconds a request may wait for a connection
