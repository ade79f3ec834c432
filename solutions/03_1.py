"""Solution 03.1: size the pool for the tail, not for the average.

What was wrong: Little's law (150/s x 12 ms = 1.8) gives the connections in use *on
average*, and a pool of 2 is then 90 % busy: most requests queue and the p99 wait runs
to hundreds of milliseconds. ``recommend_pool`` asks Erlang C for the smallest pool whose
p99 checkout wait meets the target: 5 connections, about 36 % busy on average.
"""

from labkit.sizing import recommend_pool

CHECKOUTS_PER_S = 150        # measured: checkouts per second at the busiest hour
MEAN_HOLD_S = 0.012          # measured: mean time a request holds its connection
TARGET_P99_WAIT_S = 0.010    # asked: p99 checkout wait at most 10 ms

advice = recommend_pool(CHECKOUTS_PER_S, MEAN_HOLD_S, target_wait_s=TARGET_P99_WAIT_S,
                        percentile=99, headroom=0)
POOL_SIZE = advice.pool_size
print(advice.explanation)
