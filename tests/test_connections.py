"""Connections that survive what Aurora and Vercel do, proven on real PostgreSQL.

- failover: the database turns read-only for new sessions (as the old writer does after an
  Aurora failover, reached through stale DNS) and its sessions are terminated, under write
  load: every answer is 201 or 503 + Retry-After, no acknowledged write is lost, and writes
  succeed again within seconds of the new writer taking over;
- fleet: several instances against a database that admits fewer connections than their
  pools could open: too many connections is a 503 + Retry-After, never a 500.

The Vercel-side mechanisms (idle release, thaw checks, STS backoff) are proven through the
real runtime in tests/test_vercel_e2e.py and against the IAM stand-ins in
tests/test_iam_tokens.py and tests/test_freeze_and_thaw.py.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from support import LiveServer, clean_environment, create_database, drop_database, run_sql, wait_until_serving

pytestmark = pytest.mark.slow  # a failover and a fleet, under load

PROBLEM = "application/problem+json"


@dataclass
class Answer:
    started: float
    ended: float
    status: int | None
    retry_after: str | None = None
    content_type: str | None = None
    todo_id: str | None = None
    error: str | None = None


class Writes:
    """Worker threads POSTing todos to one or more servers until stopped; every answer kept."""

    def __init__(self, urls: list[str], workers: int, pause: float = 0.01):
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pause = pause
        self._pool = concurrent.futures.ThreadPoolExecutor(workers)
        self._futures = [self._pool.submit(self._work, urls[n % len(urls)], n) for n in range(workers)]

    def _work(self, url: str, n: int) -> None:
        with httpx.Client(base_url=url, timeout=20) as client:
            i = 0
            while not self._stop.is_set():
                i += 1
                started = time.monotonic()
                try:
                    response = client.post("/todos", json={"title": f"write {n}-{i}"})
                except httpx.HTTPError as error:
                    answer = Answer(started, time.monotonic(), None, error=repr(error))
                else:
                    answer = Answer(
                        started,
                        time.monotonic(),
                        response.status_code,
                        response.headers.get("retry-after"),
                        response.headers.get("content-type"),
                        response.json()["id"] if response.status_code == 201 else None,
                    )
                with self._lock:
                    self.answers.append(answer)
                self._stop.wait(self._pause)

    def stop(self) -> None:
        self._stop.set()
        for future in self._futures:
            future.result()
        self._pool.shutdown()

    def counts(self) -> tuple[int, int]:
        """(201s, 503s) so far."""
        with self._lock:
            statuses = [a.status for a in self.answers]
        return statuses.count(201), statuses.count(503)

    def first_success_after(self, moment: float, timeout: float) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                ends = [a.ended for a in self.answers if a.started >= moment and a.status == 201]
            if ends:
                return min(ends)
            time.sleep(0.05)
        return None


def assert_201_or_503(answers: list[Answer]) -> None:
    """Every answer is a 201, or a 503 problem with Retry-After, within the SPEC's 10 s."""
    wrong = [a for a in answers if a.status not in (201, 503) or a.ended - a.started >= 10]
    assert wrong == [], wrong[:5]
    refused = [a for a in answers if a.status == 503]
    assert all(a.retry_after and int(a.retry_after) > 0 and a.content_type == PROBLEM for a in refused), (
        refused[:5]
    )


def stored_ids(url: str) -> set[str]:
    return {str(row[0]) for row in run_sql(url, "SELECT id FROM todos")}


def terminate_sessions(admin_url: str, database: str) -> int:
    rows = run_sql(
        admin_url,
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        f"WHERE datname = '{database}' AND pid <> pg_backend_pid()",
    )
    return rows[0][0]


def test_failover_to_a_read_only_writer_under_write_load(embedded_postgres: str):
    url = create_database(embedded_postgres)
    database = urlsplit(url).path.lstrip("/")
    try:
        with LiveServer(clean_environment(DATABASE_URL=url, DB_POOL_MAX="6")) as server:
            assert httpx.post(server.url + "/todos", json={"title": "before"}, timeout=15).status_code == 201
            writes = Writes([server.url], workers=6)
            try:
                assert writes.first_success_after(time.monotonic(), 10), "no write before the failover"
                # The failover: the writer the service reaches is now read-only (new sessions
                # start read-only, as on a replica) and the sessions it had are cut.
                run_sql(
                    embedded_postgres, f'ALTER DATABASE "{database}" SET default_transaction_read_only = on'
                )
                terminate_sessions(embedded_postgres, database)
                failed_over = time.monotonic()
                time.sleep(2.5)
                # The new writer takes over. The service's read-only sessions stay open: its
                # next write on each finds out (25006) and must move to fresh connections.
                run_sql(embedded_postgres, f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
                back = time.monotonic()
                recovered = writes.first_success_after(back, 10)
                time.sleep(2)
            finally:
                writes.stop()
            answers = writes.answers
            assert_201_or_503(answers)
            during = [a for a in answers if a.started >= failed_over + 0.5 and a.ended <= back]
            assert len(during) >= 10 and {a.status for a in during} == {503}, (
                "writes during the read-only phase should be refused, not stored"
            )
            assert recovered is not None and recovered - back < 5, "writes did not recover within seconds"
            after = [a for a in answers if a.started >= back + 1.5]
            assert after and {a.status for a in after} == {201}, [a for a in after if a.status != 201][:5]
            # No acknowledged write is lost.
            acknowledged = {a.todo_id for a in answers if a.status == 201}
            assert acknowledged and acknowledged <= stored_ids(url)
            messages = [entry["message"] for entry in server.logs()]
            assert "read-only database: retrying on fresh connections" in messages
            assert not [m for m in messages if m == "unhandled error"]
    finally:
        run_sql(embedded_postgres, f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
        drop_database(embedded_postgres, url)


def with_user(url: str, user: str) -> str:
    parts = urlsplit(url)
    host = parts.netloc.split("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{user}@{host}"))


def backends(admin_url: str, database: str) -> int:
    return run_sql(admin_url, f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{database}'")[0][0]


SLOW_INSERTS = """
CREATE FUNCTION slow_insert() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN PERFORM pg_sleep(0.05); RETURN NEW; END $$
"""
SLOW_INSERTS_TRIGGER = (
    "CREATE TRIGGER slow_insert BEFORE INSERT ON todos FOR EACH ROW EXECUTE FUNCTION slow_insert()"
)


def test_fleet_against_a_connection_cap_is_503_never_500(embedded_postgres: str):
    """4 instances whose pools could open 32 connections, a database that admits 12 (as a
    small Aurora instance's max_connections would): the excess is 503 + Retry-After, and the
    connections fall back once the load stops."""
    url = create_database(embedded_postgres)
    database = urlsplit(url).path.lstrip("/")
    role = "fleet_" + uuid.uuid4().hex[:8]
    # The cap binds roles that are not superusers, like the service's role on Aurora.
    run_sql(
        embedded_postgres,
        f'CREATE ROLE "{role}" LOGIN',
        f'ALTER DATABASE "{database}" OWNER TO "{role}"',
        f'ALTER DATABASE "{database}" CONNECTION LIMIT 12',
    )
    # Each insert holds its connection 50 ms, as on a busy database: the instances' pools
    # grow under load instead of one connection each keeping up.
    import db

    run_sql(with_user(url, role), db.CREATE_TABLE, *db.CREATE_INDEXES, SLOW_INSERTS, SLOW_INSERTS_TRIGGER)
    idle = 2
    env = clean_environment(
        DATABASE_URL=with_user(url, role), DB_POOL_MIN="0", DB_POOL_MAX="8", DB_IDLE_TIMEOUT=str(idle)
    )
    servers: list[LiveServer] = []
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # four processes start at once
            starting = [pool.submit(LiveServer, env) for _ in range(4)]
        servers.extend(f.result() for f in starting if f.exception() is None)  # stopped below
        for future in starting:
            future.result()  # a server that did not start fails the test
        with httpx.Client(timeout=15) as client:
            wait_until_serving(client, 15, "the first instance never served", servers[0].url + "/todos")
        writes = Writes([server.url for server in servers], workers=24, pause=0)
        try:
            # Until the cap has refused some and 100 writes went through (at most 15 s).
            give_up = time.monotonic() + 15
            while time.monotonic() < give_up and not (writes.counts()[1] and writes.counts()[0] >= 100):
                time.sleep(0.25)
            time.sleep(0.5)
        finally:
            writes.stop()
        answers = writes.answers
        assert_201_or_503(answers)
        refused = [a for a in answers if a.status == 503]
        assert refused, "the load never reached the connection cap: this proves nothing"
        assert len(answers) - len(refused) >= 100, f"only {len(answers) - len(refused)} writes succeeded"
        acknowledged = {a.todo_id for a in answers if a.status == 201}
        assert acknowledged <= stored_ids(url)
        for server in servers:
            messages = [entry["message"] for entry in server.logs()]
            assert "unhandled error" not in messages
        # Idle connections close after DB_IDLE_TIMEOUT: the database gets its connections back.
        give_up = time.monotonic() + idle + 5
        while backends(embedded_postgres, database) > 0:
            assert time.monotonic() < give_up, (
                f"{backends(embedded_postgres, database)} connections still open"
            )
            time.sleep(0.2)
    finally:
        for server in servers:
            server.stop()
        drop_database(embedded_postgres, url)
        run_sql(embedded_postgres, f'DROP ROLE IF EXISTS "{role}"')
