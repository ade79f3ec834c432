"""Solution 11.1: a psycopg_pool that serves the burst in two waves.

What was wrong: 2 connections serve 10 requests of 0.3 s in five waves; psycopg_pool
serves waiters first come, first served, so the requests of the third wave and later
would wait 0.6 s or more, longer than ``timeout`` (0.5 s), and gave up with
``PoolTimeout``. With 5 connections the burst takes two waves: the second starts after
0.3 s, within the timeout. ``min_size = max_size`` keeps the 5 open between bursts, so
the burst does not wait for connections being opened one at a time. Raising ``timeout``
instead would only let requests queue longer.
"""

MIN_SIZE = 5     # connections kept open between bursts
MAX_SIZE = 5     # two waves of 0.3 s for 10 requests, within the budget of 6
TIMEOUT = 0.5    # seconds a request may wait for a connection
