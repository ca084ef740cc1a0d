"""IAM tokens that never break a request, against honest stand-ins: moto's STS on loopback
(AWS_ENDPOINT_URL_STS) and the Aurora stand-in in front of a real PostgreSQL, which speaks TLS
with its own CA (the service runs with PGSSLMODE=verify-full), checks every connection's
password as a SigV4 token against the credentials moto issued and refuses tokens older than
the configured TTL, while open connections keep working, exactly like Aurora.

- pools are replaced across many token lifetimes under load and nothing is lost;
- STS down or slow: the current pool keeps serving, one STS call at a time with backoff,
  and the event loop keeps answering;
- DSQL tokens are signed for DbConnectAdmin as `admin` and DbConnect as a role.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import httpx
import pytest

from iam_support import (
    apply_postgres_schema,
    assert_no_secrets,
    aurora,
    iam_environment,
    ready_after_soak,
    replacements,
    soak,
)
from standins.sts import Sts
from support import LiveServer, create_database, drop_database, wait_until_serving

pytestmark = pytest.mark.slow  # soaks and STS outages across token lifetimes

# --- 1. soak ----------------------------------------------------------------------------


def test_soak_across_many_replacements_loses_nothing(fresh_sts: Sts, embedded_database: str):
    # More workers than connections: requests queue on the pool, so some are still waiting
    # on the old pool when it is replaced; they must finish, not be cancelled.
    ttl, workers = 3, 10
    with aurora(embedded_database, ttl) as gateway:
        env = iam_environment(gateway, fresh_sts, embedded_database, ttl, DB_POOL_MAX="3")
        with LiveServer(env) as live:
            created = soak(live, workers, replaced=4)
            assert len(created) > 50
            ready = ready_after_soak(live, "iam", ttl, replaced=4)
            # Credentials are reused until shortly before they expire: not one STS call per pool.
            assert 1 <= fresh_sts.calls <= 2
            assert fresh_sts.web_identity_tokens[0] == env["VERCEL_OIDC_TOKEN"]
            # Every connection the service opened presented a token Aurora accepted.
            assert gateway.refused == [] and len(gateway.accepted) > replacements(live)
            assert_no_secrets([live.logs_text(), json.dumps(ready)], fresh_sts, env)


# --- 3. STS down ----------------------------------------------------------------------------


def test_sts_outage_keeps_the_current_pool_then_recovers(fresh_sts: Sts, embedded_database: str):
    ttl = 5
    # Credentials that expire quickly make every replacement need STS.
    fresh_sts.credential_lifetime = 20
    with aurora(embedded_database, ttl) as gateway:
        env = iam_environment(gateway, fresh_sts, embedded_database, ttl)
        with LiveServer(env) as live, httpx.Client(base_url=live.url, timeout=15) as client:
            assert client.get("/todos").status_code == 200
            fresh_sts.stop()
            try:
                degraded_seen = False
                give_up = time.monotonic() + 3 * ttl
                while time.monotonic() < give_up:
                    ready = client.get("/readyz")
                    report = ready.json()
                    left = report.get("token", {}).get("seconds_left", 0)
                    if left < 1.0:
                        break
                    # While the current pool's token is valid, every request succeeds.
                    assert ready.status_code == 200, report
                    assert client.get("/todos").status_code == 200
                    assert client.post("/todos", json={"title": "during the outage"}).status_code == 201
                    if report["status"] == "degraded":
                        degraded_seen = True
                        assert report["state"] in ("backing off", "retrying")
                        assert report["replacement"]["failures"] >= 1
                        assert report["replacement"]["last_error"]
                    time.sleep(0.2)
                else:
                    pytest.fail("the token never neared its end: did the replacement not need STS?")
                assert degraded_seen
                # Past the token's life: a clear 503, quickly, never a hang or a 500.
                time.sleep(1.5)
                late = client.get("/todos")
                assert late.status_code == 503 and late.headers["retry-after"]
                assert late.elapsed.total_seconds() < 10
            finally:
                fresh_sts.start()
            wait_until_serving(client, 20, "did not recover after STS came back")
            recovered = client.get("/readyz").json()
            assert (recovered["status"], recovered["state"]) == ("ok", "serving")
            assert gateway.refused == []
            assert_no_secrets([live.logs_text()], fresh_sts, env)


def test_sts_outage_past_the_token_life_is_single_flight_with_backoff(fresh_sts: Sts, embedded_database: str):
    """STS refuses every call from before the pool is due until 8 s past its token's life,
    under ~30 requests/s: attempts are single-flight and back off, whatever the traffic."""
    ttl = 4
    fresh_sts.credential_lifetime = 20  # shorter than botocore's refresh window: every token needs STS
    with aurora(embedded_database, ttl) as gateway:
        env = iam_environment(gateway, fresh_sts, embedded_database, ttl)
        with LiveServer(env) as live, httpx.Client(base_url=live.url, timeout=15) as client:
            assert client.get("/todos").status_code == 200
            token_age = client.get("/readyz").json()["token"]["age_seconds"]
            fresh_sts.outage = True
            expires = time.monotonic() + 0.95 * ttl - token_age  # db.EXPIRED_AT
            outage_ends = expires + 8  # past two backoff steps at their full length
            answers: list[tuple[float, float, int, str | None]] = []
            lock = threading.Lock()
            stop = threading.Event()

            def traffic() -> None:  # ~10 requests/s per thread
                with httpx.Client(base_url=live.url, timeout=15) as own:
                    while not stop.is_set():
                        started = time.monotonic()
                        response = own.get("/todos")
                        with lock:
                            answers.append(
                                (
                                    started,
                                    time.monotonic(),
                                    response.status_code,
                                    response.headers.get("retry-after"),
                                )
                            )
                        stop.wait(max(0.0, 0.1 - (time.monotonic() - started)))

            with concurrent.futures.ThreadPoolExecutor(3) as pool:
                workers = [pool.submit(traffic) for _ in range(3)]
                try:
                    time.sleep(max(0.0, outage_ends - time.monotonic()))
                    attempts = fresh_sts.attempts
                    fresh_sts.outage = False
                    back = time.monotonic()
                    recovered = None
                    while recovered is None and time.monotonic() < back + 10:
                        time.sleep(0.1)
                        with lock:
                            recovered = next(
                                (end for start, end, status, _ in answers if start >= back and status == 200),
                                None,
                            )
                    time.sleep(1)
                finally:
                    stop.set()
                    for worker in workers:
                        worker.result()

            assert {status for _, _, status, _ in answers} <= {200, 503}
            # While the token is valid the current pool serves; past it, 503s, at once.
            assert all(status == 200 for _, end, status, _ in answers if end < expires - 0.3)
            late = [
                (start, end, status, retry)
                for start, end, status, retry in answers
                if expires + 0.5 <= start and end <= back
            ]
            assert len(late) >= 100, f"only {len(late)} requests past the token's life"
            assert {status for _, _, status, _ in late} == {503}
            assert all(retry and int(retry) > 0 for _, _, _, retry in late)
            slowest = max(end - start for start, end, _, _ in late)
            assert slowest < 1.0, f"a 503 took {slowest:.2f} s"
            # Single-flight with backoff: one STS request per step, not one per request.
            assert 3 <= attempts <= 12, f"{attempts} STS requests during the outage"
            assert recovered is not None and recovered - back < 7, "no recovery within seconds"
            assert client.get("/readyz").json()["status"] == "ok"
            # One STS call per new token, outage or not.
            tokens = sum(1 for e in live.logs() if e["message"] in ("pool created", "pool replaced"))
            assert fresh_sts.calls <= tokens, f"{fresh_sts.calls} STS calls for {tokens} tokens"
            assert gateway.refused == []
            assert_no_secrets([live.logs_text()], fresh_sts, env)


def test_a_503_in_the_credential_backoff_says_how_long_the_backoff_has_left(
    fresh_sts: Sts, embedded_database: str
):
    """With STS down from the first request, every 503 carries Retry-After: the time left
    before the next attempt, rounded up (not a fixed figure), growing with the backoff; /readyz
    reports the same wait in seconds and in its own Retry-After."""
    fresh_sts.outage = True
    with aurora(embedded_database, 900) as gateway:
        env = iam_environment(gateway, fresh_sts, embedded_database, 900)
        with LiveServer(env) as live, httpx.Client(base_url=live.url, timeout=15) as client:
            seen = []  # (Retry-After of a 503, the backoff /readyz reported just after, its Retry-After)
            give_up = time.monotonic() + 8
            while time.monotonic() < give_up:
                step = fresh_sts.attempts
                refused = client.get("/todos")
                assert refused.status_code == 503 and refused.elapsed.total_seconds() < 7, refused.text
                ready = client.get("/readyz")
                report = ready.json()
                assert ready.status_code == 503
                # A pair that straddles an attempt (the backoff ended between the two requests
                # and a new, longer one began) compares two different waits: not counted.
                if report["state"] == "backing off" and fresh_sts.attempts == step:
                    seen.append(
                        (
                            int(refused.headers["retry-after"]),
                            report["replacement"]["retry_in_seconds"],
                            int(ready.headers["retry-after"]),
                        )
                    )
                time.sleep(0.1)
            attempts = fresh_sts.attempts
        assert len(seen) >= 20, seen
        for retry_after, left, readyz_retry_after in seen:
            # The 503 came first: by the time /readyz looked, a little less was left.
            assert 1 <= retry_after <= 10 and left <= retry_after and retry_after - 1 <= left + 0.3, seen
            assert readyz_retry_after == max(1, min(10, -int(-left // 1))), seen
        assert max(retry for retry, _, _ in seen) >= 2 and len({retry for retry, _, _ in seen}) >= 2, seen
        assert 3 <= attempts <= 8, attempts  # one STS request per backoff step


def test_event_loop_keeps_serving_while_sts_is_slow(fresh_sts: Sts, embedded_database: str):
    fresh_sts.delay = 3.0
    with aurora(embedded_database, 60) as gateway:
        env = iam_environment(gateway, fresh_sts, embedded_database, 60)
        with LiveServer(env) as live, httpx.Client(base_url=live.url, timeout=15) as client:
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                first = pool.submit(client.get, "/todos")  # creates the pool: STS takes 3 s
                time.sleep(0.3)
                health = []
                while not first.done():
                    started = time.perf_counter()
                    assert client.get("/healthz").status_code == 200
                    health.append(time.perf_counter() - started)
                    time.sleep(0.05)
                assert first.result().status_code == 200
                assert first.result().elapsed.total_seconds() >= 2.5
            assert len(health) >= 20 and max(health) < 0.5, health


def test_dsql_admin_and_role_tokens(fresh_sts: Sts, embedded_postgres: str):
    url = create_database(embedded_postgres)
    apply_postgres_schema(url)
    try:
        for user in ("admin", "todo_app"):
            with aurora(url, 900, mode="dsql", upstream_user="postgres") as gateway:
                env = iam_environment(gateway, fresh_sts, url, 900, DB_AUTH="dsql", PGUSER=user)
                with LiveServer(env) as live, httpx.Client(base_url=live.url, timeout=15) as client:
                    made = client.post("/todos", json={"title": f"as {user}"})
                    assert made.status_code == 201
                    assert client.get(made.headers["location"]).status_code == 200
                    assert client.get("/readyz").json()["auth"] == "dsql"
                actions = {attempt.action for attempt in gateway.accepted}
                assert actions == {"DbConnectAdmin" if user == "admin" else "DbConnect"}
    finally:
        drop_database(embedded_postgres, url)
