"""The fleet simulator's rules, each checked on a small seeded fleet (no server needed)."""

from __future__ import annotations

import dataclasses

import pytest

from labkit.lab.fleet import (Bouncer, Failover, Fleet, Pool, Retry, RollingDeploy, ScaleTo,
                              Server, ServerRestart, Sessions, Workload, connection_budget,
                              simulate)
from labkit.retry import DEFAULT_RETRY, STARTUP_RETRY

STEADY = Workload(rate_per_s=2000, hold_s=0.005)


def _burst(pool_timeout: float) -> Fleet:
    return Fleet(instances=1, pool=Pool(pool_size=3, max_overflow=2, pool_timeout=pool_timeout,
                                        probe=False))


def test_burst_obeys_pool_size_overflow_and_pool_timeout() -> None:
    burst = Workload(rate_per_s=0, hold_s=0.3, hold="constant", bursts=[(0.1, 15)])
    result = simulate(_burst(0.5), burst, duration_s=2, warm=False)
    assert result.peak_server_connections == 5            # pool_size + max_overflow
    assert sum(w < 0.15 for w in result.waits_s) == 5      # five at once
    assert sum(w >= 0.15 for w in result.waits_s) == 5     # five after one hold
    assert result.failures == {"pool_timeout": 5}         # two holds > pool_timeout
    patient = simulate(_burst(1.0), burst, duration_s=3, warm=False)
    assert patient.failures == {} and patient.succeeded == 15


def test_over_budget_connects_fail_and_within_budget_they_do_not() -> None:
    pool = Pool(pool_size=10, max_overflow=0)
    over = Fleet(instances=60, pool=pool, server=Server(max_connections=100))
    assert not connection_budget(over).ok and connection_budget(over).needed == 660
    result = simulate(over, Workload(rate_per_s=6000, hold_s=0.02), duration_s=3)
    assert result.failures.get("too_many", 0) > 0 and sum(result.connect_failures) > 0
    assert result.peak_server_connections <= 97             # never past the usable slots
    within = dataclasses.replace(over, server=Server(max_connections=700))
    assert connection_budget(within).ok
    fine = simulate(within, Workload(rate_per_s=6000, hold_s=0.02), duration_s=3)
    assert fine.failures == {} and sum(fine.connect_failures) == 0


def test_pgbouncer_caps_server_connections() -> None:
    fleet = Fleet(instances=100, pool=Pool(pool_size=5, max_overflow=5),
                  server=Server(max_connections=2000))
    load = Workload(rate_per_s=8000, hold_s=0.01)
    direct = simulate(fleet, load, duration_s=3)
    bounced = simulate(dataclasses.replace(
        fleet, bouncer=Bouncer(default_pool_size=120, max_client_conn=5000)), load, duration_s=3)
    assert direct.peak_server_connections > 200
    assert bounced.peak_server_connections <= 120 and bounced.failures == {}


def test_pgbouncer_session_mode_serves_pool_size_clients_at_once() -> None:
    fleet = Fleet(instances=0, pool=Pool(pool_size=1, max_overflow=0, probe=False),
                  server=Server(max_connections=24))
    clients = Sessions(clients=60, transactions=3, hold_s=0.01, think_s=0.05)
    results = {mode: simulate(dataclasses.replace(fleet, bouncer=Bouncer(
        mode=mode, default_pool_size=10, max_client_conn=1000)), clients, duration_s=30)
        for mode in ("session", "transaction")}
    assert results["session"].served_at_once_peak == 10
    assert results["transaction"].served_at_once_peak > 30
    assert results["transaction"].elapsed_s < results["session"].elapsed_s / 2
    direct = simulate(fleet, clients, duration_s=30)
    assert direct.clients_served == 21 and direct.failures == {"too_many": 39}


def test_stale_connections_fail_without_pre_ping_only() -> None:
    fleet = Fleet(instances=20, pool=Pool(pool_size=5, max_overflow=5),
                  server=Server(max_connections=500))
    restart = [ServerRestart(at_s=1.0, down_s=0.2)]
    plain = simulate(fleet, STEADY, duration_s=4, faults=restart)
    pinged = simulate(dataclasses.replace(fleet, pool=dataclasses.replace(fleet.pool,
                      pre_ping=True)), STEADY, duration_s=4, faults=restart)
    # With pre-ping only the requests in flight at the restart are lost (about rate x hold).
    assert pinged.failures.get("lost", 0) < 30
    assert plain.failures.get("lost", 0) > pinged.failures.get("lost", 0) + 20


def test_default_retry_retries_lost_connections_not_refused_connects() -> None:
    fleet = Fleet(instances=20, pool=Pool(pool_size=5, max_overflow=5),
                  server=Server(max_connections=500))
    restart = [ServerRestart(at_s=1.0, down_s=0.5)]
    result = simulate(fleet, STEADY, duration_s=4, faults=restart, retry=Retry(DEFAULT_RETRY))
    assert result.failures.get("refused", 0) > 0          # DatabaseUnavailableError: not retried
    assert result.failures.get("lost", 0) < 5              # ConnectionLostError: retried
    startup = simulate(fleet, STEADY, duration_s=4, faults=restart, retry=Retry(STARTUP_RETRY))
    assert startup.failures == {}                           # retries every transient error


def test_full_jitter_spreads_the_herd() -> None:
    # 200 processes start together while the server is down: their probes retry in step.
    fleet = Fleet(instances=200, pool=Pool(pool_size=2, max_overflow=2),
                  server=Server(max_connections=2000))
    down = [ServerRestart(at_s=0.0, down_s=3.0)]
    peaks = {}
    for name, startup in {"none": dataclasses.replace(STARTUP_RETRY, jitter=0.0),
                          "policy": STARTUP_RETRY}.items():
        result = simulate(fleet, STEADY, duration_s=5, faults=down, startup=startup,
                          bin_s=0.01, warm=False)
        peaks[name] = max(result.connect_attempts[50:300])  # the retries after the first
    assert peaks["none"] == 200                             # every probe in the same 10 ms
    assert peaks["policy"] < 0.5 * peaks["none"], peaks     # +-10 % spreads the later ones
    herd = Retry(dataclasses.replace(STARTUP_RETRY, jitter=0.0))
    fleet = dataclasses.replace(fleet, pool=Pool(pool_size=2, max_overflow=2, probe=False))
    spread = {name: max(simulate(fleet, Workload(rate_per_s=0, hold_s=0.005,
                                                 bursts=[(0.5, 400)]),
                                 duration_s=3, faults=[ServerRestart(at_s=0.4, down_s=2.0)],
                                 retry=retry, bin_s=0.01).connect_attempts[60:])
              for name, retry in {"none": herd, "full": Retry(STARTUP_RETRY, jitter="full")}.items()}
    assert spread["none"] > 4 * spread["full"], spread


def test_retry_budget_limits_retries() -> None:
    fleet = Fleet(instances=20, pool=Pool(pool_size=5, max_overflow=5),
                  server=Server(max_connections=500))
    restart = [ServerRestart(at_s=1.0, down_s=1.0)]
    free = simulate(fleet, STEADY, duration_s=4, faults=restart, retry=Retry(STARTUP_RETRY))
    capped = simulate(fleet, STEADY, duration_s=4, faults=restart,
                      retry=Retry(STARTUP_RETRY, budget=0.1))
    assert sum(capped.retries) < sum(free.retries) / 2


def test_failover_to_a_read_only_primary_ends_only_with_recycle() -> None:
    pool = Pool(pool_size=3, max_overflow=3, pre_ping=True)
    fleet = Fleet(instances=20, pool=pool, server=Server(max_connections=500))
    failover = [Failover(at_s=1.0, promote_s=0.5, dns_ttl_s=2.0, old="read-only")]
    load = Workload(rate_per_s=500, hold_s=0.005)
    kept = simulate(fleet, load, duration_s=12, faults=failover)
    recycled = simulate(dataclasses.replace(fleet, pool=dataclasses.replace(pool, recycle_s=3.0)),
                        load, duration_s=12, faults=failover)
    assert kept.recovery_s(1.5) is None                     # pre-ping cannot see read-only
    recovered = recycled.recovery_s(1.5)
    assert recovered is not None and recovered <= 3.0 + 2.0 + 1.0


def test_rolling_deploy_and_scaling_add_connections() -> None:
    fleet = Fleet(instances=20, workers=2, pool=Pool(pool_size=5, max_overflow=5),
                  server=Server(max_connections=1000))
    load = Workload(rate_per_s=2000, hold_s=0.005)
    steady = simulate(fleet, load, duration_s=20)
    deploy = simulate(fleet, load, duration_s=20,
                      faults=[RollingDeploy(at_s=2, batch=10, every_s=4, drain_s=6)])
    assert deploy.peak_server_connections > 1.3 * steady.peak_server_connections
    assert deploy.failures == {}
    scaled = simulate(fleet, load, duration_s=10, faults=[ScaleTo(at_s=2, instances=40)])
    assert max(scaled.serving) == 80 and scaled.serving[1] == 40


def test_same_seed_same_result() -> None:
    fleet = Fleet(instances=10, pool=Pool(pool_size=2, max_overflow=1))
    a, b = (simulate(fleet, STEADY, duration_s=2, faults=[ServerRestart(at_s=1)],
                     retry=Retry(STARTUP_RETRY, jitter="full"), seed=7) for _ in range(2))
    assert a.summary() == b.summary() and list(a.connect_attempts) == list(b.connect_attempts)


def test_invalid_settings_name_the_argument() -> None:
    with pytest.raises(ValueError, match="pool_size"):
        Pool(pool_size=0)
    with pytest.raises(ValueError, match="mode"):
        Bouncer(mode="statement")  # type: ignore[arg-type]


def test_fleet_command_prints_budget_waits_and_storm_and_writes_the_chart(tmp_path, capsys) -> None:
    from labkit.lab.__main__ import main

    out = tmp_path / "fleet.png"
    args = ["fleet", "--instances", "20", "--workers", "2", "--pool-size", "2",
            "--max-overflow", "2", "--rate", "200", "--hold-ms", "5", "--restart-s", "1",
            "--seconds", "5", "--out", str(out)]
    assert main([*args, "--max-connections", "300"]) == 0
    text = capsys.readouterr().out
    assert "40 x 5 = 200 connections for 297 usable slots: fits" in text
    assert "Erlang C per process" in text and "failures none" in text
    for policy in ("no retry", "DEFAULT_RETRY", "STARTUP_RETRY", "STARTUP_RETRY, full jitter"):
        assert f"  {policy} " in text
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert main([*args, "--max-connections", "40"]) == 0
    tight = capsys.readouterr().out
    assert "OVER BUDGET" in tight and "too_many" in tight


def test_cpu_bound_work_queues_for_the_servers_cores() -> None:
    fleet = Fleet(instances=10, pool=Pool(pool_size=20, max_overflow=0),
                  server=Server(max_connections=500, cores=2))
    # Two cores serve 200 queries of 10 ms CPU a second.
    under, over = (simulate(fleet, Workload(rate_per_s=rate, hold_s=0.0, cpu_s=0.01),
                            duration_s=5) for rate in (100, 300))
    mean = {name: sum(r.latencies_s) / len(r.latencies_s)
            for name, r in {"under": under, "over": over}.items()}
    assert mean["under"] < 0.03 and mean["over"] > 30 * mean["under"], mean
    more_cores = dataclasses.replace(fleet, server=Server(max_connections=500, cores=4))
    relieved = simulate(more_cores, Workload(rate_per_s=300, hold_s=0.0, cpu_s=0.01), duration_s=5)
    assert sum(relieved.latencies_s) / len(relieved.latencies_s) < 0.03


def test_daily_curve_shapes_the_arrival_rate() -> None:
    fleet = Fleet(instances=5, pool=Pool(pool_size=5, max_overflow=5))
    curve = Workload(rate_per_s=1000, hold_s=0.002, curve=[(0, 0.2), (5, 1.0), (10, 0.2)])
    result = simulate(fleet, curve, duration_s=10)
    assert 150 < result.arrivals[0] < 320 and 850 < result.arrivals[5] < 1150
