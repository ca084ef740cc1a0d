"""IAM authentication that never breaks (issue 3), proven against honest stand-ins.

AWS STS is moto's ThreadedMotoServer, in this process, reached through
AWS_ENDPOINT_URL_STS. Aurora is `AuroraGateway` in front of a real PostgreSQL: it speaks
TLS with its own CA (the service runs with PGSSLMODE=verify-full), checks every connection's
password as a SigV4 token against the credentials moto issued, and refuses tokens older
than the configured TTL; open connections keep working, exactly like Aurora.
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import threading
import time
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx
import pytest

from iam_support import REGION, ROLE_ARN, Sts, oidc_token
from standins.aurora_gateway import AuroraGateway, moto_credentials_lookup, parse_upstream_url
from support import LiveServer, clean_environment, create_database, drop_database, run_sql, wait_until_serving



@pytest.fixture(scope="module")
def iam_database(embedded_postgres: str):
    url = create_database(embedded_postgres)
    yield url
    drop_database(embedded_postgres, url)


@contextmanager
def aurora(database_url: str, ttl: float, mode: str = "iam", **options):
    host, port = parse_upstream_url(database_url)
    with AuroraGateway(host, port, max_token_age=ttl, region=REGION, mode=mode,
                       credentials_lookup=moto_credentials_lookup(), **options) as gateway:
        yield gateway


def iam_environment(gateway: AuroraGateway, sts: Sts, database_url: str, ttl: int, **overrides: str) -> dict:
    """The service's environment for IAM mode behind `gateway`; `overrides` win."""
    settings = dict(
        PGHOST="127.0.0.1", PGPORT=str(gateway.port), PGUSER="postgres",
        PGDATABASE=urlsplit(database_url).path.lstrip("/"), DB_AUTH="iam", AWS_REGION=REGION,
        AWS_ROLE_ARN=ROLE_ARN, AWS_ENDPOINT_URL_STS=sts.url, AWS_EC2_METADATA_DISABLED="true",
        VERCEL_OIDC_TOKEN=oidc_token(), PGSSLROOTCERT=gateway.ca_file, DB_TOKEN_TTL=str(ttl),
        DB_POOL_MIN="1", DB_POOL_MAX="6")
    return clean_environment(**{**settings, **overrides})


def apply_postgres_schema(url: str) -> None:
    """The schema in PostgreSQL's dialect, for DSQL-mode tests here: the IAM gateway relays SQL
    unchanged (it cannot run CREATE INDEX ASYNC); DSQL's SQL surface is tests/standins/dsql_gateway.py's."""
    import db

    run_sql(url, db.CREATE_TABLE, *db.CREATE_INDEXES)


def assert_no_secrets(texts: list[str], sts: Sts, env: dict) -> None:
    """No OIDC token, STS secret, session token or database token anywhere in `texts`."""
    secrets = [env["VERCEL_OIDC_TOKEN"], *sts.secrets()]
    for text in texts:
        for secret in secrets:
            assert secret not in text
        for shape in ("X-Amz-Signature", "X-Amz-Security-Token", "Amz-Credential", "Action=connect",
                      "Action=DbConnect"):
            assert shape not in text


def replacements(live: LiveServer) -> int:
    return sum(1 for entry in live.logs() if entry["message"] == "pool replaced")


def soak(live: LiveServer, workers: int, duration: float) -> list[str]:
    """`workers` clients create, read, complete and list todos for `duration` seconds.

    Every answer must be the one expected (none is retried here), and afterwards every todo
    created must read back completed. Returns the ids created.
    """
    failures: list[str] = []
    created: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + duration

    def worker(n: int) -> None:
        with httpx.Client(base_url=live.url, timeout=15) as client:
            i = 0
            while time.monotonic() < stop_at:
                i += 1
                made = client.post("/todos", json={"title": f"soak {n}-{i}"})
                steps = [(made, 201)]
                if made.status_code == 201:
                    todo_id = made.json()["id"]
                    with lock:
                        created.append(todo_id)
                    steps.append((client.get(f"/todos/{todo_id}"), 200))
                    steps.append((client.patch(f"/todos/{todo_id}", json={"completed": True}), 200))
                steps.append((client.get("/todos", params={"limit": 5}), 200))
                for response, wanted in steps:
                    if response.status_code != wanted:
                        with lock:
                            failures.append(f"{response.request.method} {response.request.url.path}"
                                            f" -> {response.status_code} {response.text[:200]}")

    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(worker, range(workers)))

    assert failures == []
    with httpx.Client(base_url=live.url, timeout=15) as client:
        for todo_id in created:
            got = client.get(f"/todos/{todo_id}")
            assert got.status_code == 200 and got.json()["completed"] is True
    return created


# --- 1. soak ----------------------------------------------------------------------------

def test_soak_across_many_replacements_loses_nothing(fresh_sts: Sts, iam_database: str):
    # More workers than connections: requests queue on the pool, so some are still waiting
    # on the old pool when it is replaced; they must finish, not be cancelled.
    ttl, duration, workers = 4, 32.0, 10
    with aurora(iam_database, ttl) as gateway:
        env = iam_environment(gateway, fresh_sts, iam_database, ttl, DB_POOL_MAX="3")
        with LiveServer(env) as live:
            created = soak(live, workers, duration)
            assert len(created) > 100
            with httpx.Client(base_url=live.url, timeout=15) as client:
                ready = client.get("/readyz").json()
            assert ready["auth"] == "iam" and ready["token"]["ttl_seconds"] == ttl
            assert replacements(live) >= 4, f"only {replacements(live)} replacements"
            # Credentials are reused until shortly before they expire: not one STS call per pool.
            assert 1 <= fresh_sts.calls <= 2
            assert fresh_sts.web_identity_tokens[0] == env["VERCEL_OIDC_TOKEN"]
            # Every connection the service opened presented a token Aurora accepted.
            assert gateway.refused == [] and len(gateway.accepted) > replacements(live)
            assert_no_secrets([live.logs_text(), json.dumps(ready)], fresh_sts, env)


# --- 2. freeze ----------------------------------------------------------------------------

def test_thawed_instance_serves_its_first_request(fresh_sts: Sts, iam_database: str):
    ttl = 4
    with aurora(iam_database, ttl) as gateway:
        env = iam_environment(gateway, fresh_sts, iam_database, ttl)
        with LiveServer(env) as live, httpx.Client(base_url=live.url, timeout=15) as client:
            assert client.post("/todos", json={"title": "before the freeze"}).status_code == 201

            # A short freeze: the server's idle connections are dropped meanwhile.
            live.signal(signal.SIGSTOP)
            gateway.drop_connections()
            time.sleep(1)
            live.signal(signal.SIGCONT)
            assert client.get("/todos").status_code == 200

            # A freeze past the token's life: no timer fired, the connections are gone, and
            # the pool's token is too old to open new ones.
            before = replacements(live)
            live.signal(signal.SIGSTOP)
            gateway.drop_connections()
            time.sleep(ttl + 1.5)
            live.signal(signal.SIGCONT)
            first = client.get("/todos")
            assert first.status_code == 200, first.text
            assert "before the freeze" in first.text
            assert client.post("/todos", json={"title": "after the thaw"}).status_code == 201
            assert replacements(live) > before
            assert gateway.refused == []


def test_first_request_after_a_thaw_with_silently_dead_sockets_answers_fast(fresh_sts: Sts, iam_database: str):
    """While the instance is frozen, a NAT forgets its connections: no FIN, no RST, nothing.
    The first request after the thaw must not wait for a dead socket (it used to take the
    8 s deadline and answer 503)."""
    import db

    with aurora(iam_database, 900) as gateway:
        env = iam_environment(gateway, fresh_sts, iam_database, 900, DB_POOL_MIN="2")
        with LiveServer(env) as live, httpx.Client(base_url=live.url, timeout=15) as client:
            assert client.post("/todos", json={"title": "before the black hole"}).status_code == 201
            assert client.get("/readyz").json()["pool"]["idle"] >= 1
            live.signal(signal.SIGSTOP)
            try:
                assert gateway.black_hole() >= 1
                time.sleep(db.THAW_GAP + 1)
            finally:
                live.signal(signal.SIGCONT)
            first = client.get("/todos")
            assert first.status_code == 200 and "before the black hole" in first.text, first.text
            assert first.elapsed.total_seconds() < 2.5, f"first request after the thaw took {first.elapsed}"
            assert client.post("/todos", json={"title": "after the thaw"}).status_code == 201
            messages = [entry["message"] for entry in live.logs()]
            assert "idle connections did not answer after a pause: replacing the pool" in messages
            assert gateway.refused == []


# --- 3. STS down ----------------------------------------------------------------------------

def test_sts_outage_keeps_the_current_pool_then_recovers(fresh_sts: Sts, iam_database: str):
    ttl = 8
    # Credentials that expire quickly make every replacement need STS.
    fresh_sts.credential_lifetime = 20
    with aurora(iam_database, ttl) as gateway:
        env = iam_environment(gateway, fresh_sts, iam_database, ttl)
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
            assert client.get("/readyz").json()["status"] == "ok"
            assert gateway.refused == []
            assert_no_secrets([live.logs_text()], fresh_sts, env)


def test_sts_outage_past_the_token_life_is_single_flight_with_backoff(fresh_sts: Sts, iam_database: str):
    """STS refuses every call from before the pool is due until 16 s past its token's life,
    under ~30 requests/s: attempts are single-flight and back off, whatever the traffic."""
    ttl = 4
    fresh_sts.credential_lifetime = 20  # shorter than botocore's refresh window: every token needs STS
    with aurora(iam_database, ttl) as gateway:
        env = iam_environment(gateway, fresh_sts, iam_database, ttl)
        with LiveServer(env) as live, httpx.Client(base_url=live.url, timeout=15) as client:
            assert client.get("/todos").status_code == 200
            token_age = client.get("/readyz").json()["token"]["age_seconds"]
            fresh_sts.outage = True
            expires = time.monotonic() + 0.95 * ttl - token_age  # db.EXPIRED_AT
            outage_ends = expires + 16
            answers: list[tuple[float, float, int, str | None]] = []
            lock = threading.Lock()
            stop = threading.Event()

            def traffic() -> None:  # ~10 requests/s per thread
                with httpx.Client(base_url=live.url, timeout=15) as own:
                    while not stop.is_set():
                        started = time.monotonic()
                        response = own.get("/todos")
                        with lock:
                            answers.append((started, time.monotonic(), response.status_code,
                                            response.headers.get("retry-after")))
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
                            recovered = next((end for start, end, status, _ in answers
                                              if start >= back and status == 200), None)
                    time.sleep(1)
                finally:
                    stop.set()
                    for worker in workers:
                        worker.result()

            assert {status for _, _, status, _ in answers} <= {200, 503}
            # While the token is valid the current pool serves; past it, 503s, at once.
            assert all(status == 200 for _, end, status, _ in answers if end < expires - 0.3)
            late = [(start, end, status, retry) for start, end, status, retry in answers
                    if expires + 0.5 <= start and end <= back]
            assert len(late) >= 200, f"only {len(late)} requests past the token's life"
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


def test_event_loop_keeps_serving_while_sts_is_slow(fresh_sts: Sts, iam_database: str):
    fresh_sts.delay = 3.0
    with aurora(iam_database, 60) as gateway:
        env = iam_environment(gateway, fresh_sts, iam_database, 60)
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


# --- 4. optimistic concurrency ------------------------------------------------------------

@pytest.mark.parametrize("mode", ["password", "dsql"])
def test_conflicting_patches_all_succeed_through_retries(fresh_sts: Sts, embedded_postgres: str, mode: str):
    url = create_database(embedded_postgres)
    database = urlsplit(url).path.lstrip("/")
    try:
        # Aurora DSQL runs every transaction at REPEATABLE READ, with optimistic concurrency.
        run_sql(url, f'ALTER DATABASE "{database}" SET default_transaction_isolation = \'repeatable read\'')
        if mode == "password":
            env = clean_environment(DATABASE_URL=url, DB_POOL_MAX="10")
            server, gateway = LiveServer(env), None
        else:
            apply_postgres_schema(url)
            gateway = AuroraGateway(*parse_upstream_url(url), max_token_age=900, region=REGION, mode="dsql",
                                    credentials_lookup=moto_credentials_lookup(), upstream_user="postgres").start()
            env = iam_environment(gateway, fresh_sts, url, 900, DB_AUTH="dsql", PGUSER="admin", DB_POOL_MAX="10")
            server = LiveServer(env)
        with server, httpx.Client(base_url=server.url, timeout=15) as client:
            todo = client.post("/todos", json={"title": "contended"}).json()
            titles = [f"writer {i}" for i in range(30)]
            with concurrent.futures.ThreadPoolExecutor(15) as pool:
                results = list(pool.map(
                    lambda title: client.patch(f"/todos/{todo['id']}", json={"title": title, "completed": True}),
                    titles))
            assert [r.status_code for r in results] == [200] * len(titles), [r.text for r in results if r.status_code != 200]
            final = client.get(f"/todos/{todo['id']}").json()
            assert final["title"] in titles and final["completed"] is True
            assert final["updated_at"] == max(r.json()["updated_at"] for r in results)
            retried = [e for e in server.logs() if e["message"] == "retrying after a serialization conflict"]
            assert retried, "the workload produced no conflict, so it proves nothing"
    finally:
        if gateway is not None:
            gateway.stop()
        drop_database(embedded_postgres, url)


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
