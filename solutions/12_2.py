"""Solution 12.2: a backoff that starts near a second and is capped at two.

What was wrong: the policy retried every 50 ms without backoff, so each request waiting
for the restarting server tried 20 times a second: with 1,500 requests waiting by the
end of a 3 s restart, that is about 25,000 connection attempts a second; and 50
attempts 50 ms apart give up after 2.5 s, before the server is back, so the requests
that arrived first were lost anyway. The attempts per second are the waiting requests
over the current delay, so the short first delays cost the most: starting at 1 s and
doubling to a cap of 2 s keeps the attempts near 1,200 a second, and the cap bounds how
long the backlog takes once the server is back (about one max_delay). Ten attempts and
a 10 s deadline outlast the restart. The kit's STARTUP_RETRY (0.1 s doubling to 2 s) is
made for one process waiting at start-up: across a fleet its short first delays send
about 2,600 attempts a second.
"""

from labkit import RetryPolicy, TransientError

POLICY = RetryPolicy(
    max_attempts=10,
    initial_delay=1.0,     # seconds before the first retry
    multiplier=2.0,        # each delay this many times the one before ...
    max_delay=2.0,         # ... up to this many seconds
    jitter=0.1,            # +-10 % on every delay
    deadline=10.0,         # seconds after the first attempt, at most
    retry_on=(TransientError,),
)
