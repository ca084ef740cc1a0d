"""Connections whose host vanished without a word: no FIN, no RST, packets simply dropped.

The service finds such a connection at the TCP layer (keepalives and a user timeout) within
about 2 s, whether it is in use or idle, answers the requests that met it within 2.5 s, and
never takes a statement that is slow for a good reason (a lock wait) for a dead one.

Packets are really dropped: each test runs the database, the service and any gateway in a
network namespace of its own and drops, with the kernel's firewall, every packet of the
connections established to the database when the host "vanishes", while new connections
work (tests/standins/network_namespace.py). A relay that stopped forwarding would not do:
its kernel would still acknowledge every byte.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest

import db
from dsql_support import dsql_service
from iam_support import aurora, iam_environment
from standins.aurora_gateway import AuroraGateway
from standins.network_namespace import PacketDropper
from support import LiveServer, clean_environment, create_database, run_sql

# --- the socket options, on any machine ----------------------------------------------


class TcpFront:
    """A TCP port in front of the embedded PostgreSQL's Unix socket, so that the client's
    connection is TCP; only the client's socket options are looked at."""

    def __init__(self, unix_path: str):
        self.unix_path = unix_path

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(self.unix_path)

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
            sink.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer), return_exceptions=True)


def unix_socket_of(url: str) -> str:
    from standins.aurora_gateway import parse_upstream_url

    directory, port = parse_upstream_url(url)
    return f"{directory}/.s.PGSQL.{port}"


def use_environment(monkeypatch: pytest.MonkeyPatch, **variables: str) -> None:
    """The process's environment for an in-process service: no database settings but these."""
    for key in list(os.environ):
        if key.startswith(("PG", "DB_", "AWS_", "VERCEL")) or key == "DATABASE_URL":
            monkeypatch.delenv(key)
    for key, value in variables.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_every_pooled_connection_asks_the_kernel_to_watch_for_silence(
    embedded_database: str, loop: str, monkeypatch: pytest.MonkeyPatch
):
    """The service's pool opens its connections with keepalives and a user timeout as
    configured, under asyncio's loop and uvloop's (uvicorn's choice when installed). The
    service reaches the socket through asyncpg's private `_transport`: this test fails if
    asyncpg changes it."""

    async def options() -> list[tuple[int, int, int, int, int]]:
        async with TcpFront(unix_socket_of(embedded_database)) as port:
            name = urlsplit(embedded_database).path.lstrip("/")
            use_environment(
                monkeypatch,
                DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/{name}",
                DB_POOL_MIN="2",
                DB_POOL_MAX="2",
                DB_TCP_KEEPALIVE_IDLE="3",
                DB_TCP_KEEPALIVE_INTERVAL="2",
                DB_TCP_KEEPALIVE_COUNT="4",
                DB_TCP_USER_TIMEOUT="2.5",
            )
            try:
                pool = await db.lifecycle.pool()
                found = []
                async with pool.acquire() as first, pool.acquire() as second:
                    for connection in (first, second):
                        sock = connection._transport.get_extra_info("socket")
                        found.append(
                            (
                                sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
                                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
                            )
                        )
                return found
            finally:
                await db.close()

    if loop == "uvloop":
        import uvloop

        found = uvloop.run(options())
    else:
        found = asyncio.run(options())
    assert found == [(1, 3, 2, 4, 2500)] * 2


def test_keepalives_off_leave_the_socket_as_the_kernel_made_it(embedded_postgres: str):
    settings = db.Settings.from_env(
        {
            "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/postgres",
            "DB_TCP_KEEPALIVE_IDLE": "0",
            "DB_TCP_USER_TIMEOUT": "0",
        }
    )

    async def options() -> tuple[int, int]:
        async with TcpFront(unix_socket_of(embedded_postgres)) as port:
            connection = await asyncpg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres")
            try:
                db.watch_for_silence(connection, settings)
                sock = connection._transport.get_extra_info("socket")
                return (
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
                )
            finally:
                await connection.close()

    assert asyncio.run(options()) == (0, 0)


# --- in a network of the test's own, packets really dropped ----------------------------


@dataclass
class Answer:
    started: float
    ended: float
    status: int | None
    todo_id: str | None = None
    retry_after: str | None = None
    error: str | None = None

    @property
    def seconds(self) -> float:
        return self.ended - self.started


def ask(client: httpx.Client, method: str, path: str, **kwargs) -> Answer:
    started = time.monotonic()
    try:
        response = client.request(method, path, **kwargs)
    except httpx.HTTPError as error:
        return Answer(started, time.monotonic(), None, error=repr(error))
    todo_id = response.json()["id"] if response.status_code == 201 else None
    return Answer(
        started, time.monotonic(), response.status_code, todo_id, response.headers.get("retry-after")
    )


class Traffic:
    """Steady requests from a few threads, about `rate` per second in all: writes and lists."""

    def __init__(self, url: str, rate: float, workers: int = 4):
        self.answers: list[Answer] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._period = workers / rate
        self._threads = [threading.Thread(target=self._work, args=(url, n)) for n in range(workers)]
        for thread in self._threads:
            thread.start()

    def _work(self, url: str, n: int) -> None:
        with httpx.Client(base_url=url, timeout=15) as client:
            i = 0
            self._stop.wait(self._period * n / len(self._threads))  # spread out
            while not self._stop.is_set():
                i += 1
                answer = (
                    ask(client, "POST", "/todos", json={"title": f"steady {n}-{i}"})
                    if i % 2
                    else ask(client, "GET", "/todos?limit=5")
                )
                with self._lock:
                    self.answers.append(answer)
                self._stop.wait(max(0.0, self._period - answer.seconds))

    def stop(self) -> list[Answer]:
        self._stop.set()
        for thread in self._threads:
            thread.join()
        return self.answers


def backends(admin_url: str, database: str) -> dict[int, float]:
    """{pid: wall-clock time it connected} of every connection to `database`, counted at the database."""
    rows = run_sql(
        admin_url,
        "SELECT pid, extract(epoch FROM backend_start)::float8 FROM pg_stat_activity "
        f"WHERE datname = '{database}' AND pid <> pg_backend_pid()",
    )
    return {row[0]: row[1] for row in rows}


def wait_for(condition, within: float, why: str, every: float = 0.05):
    give_up = time.monotonic() + within
    while not (result := condition()):
        assert time.monotonic() < give_up, why
        time.sleep(every)
    return result


def stored_ids(url: str) -> set[str]:
    return {str(row[0]) for row in run_sql(url, "SELECT id FROM todos")}


def logged(server: LiveServer, message: str) -> int:
    return sum(entry["message"] == message for entry in server.logs())


RETRIED = "connection lost: retrying on a fresh connection"


async def hold_the_row(url: str, todo: str, seconds: float) -> None:
    """Hold `todo`'s row lock for `seconds`, from a connection of the test's own."""
    holder = await asyncpg.connect(url)
    try:
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM todos WHERE id = $1 FOR UPDATE", uuid.UUID(todo))
            await asyncio.sleep(seconds)
    finally:
        await holder.close()


def fresh_database(network) -> str:
    """A new database on the namespace's PostgreSQL; its name."""
    return urlsplit(create_database(network.postgres.url())).path.lstrip("/")


def vanish_under_load(
    server: LiveServer,
    silence: Callable[[], int],
    opened_since: Callable[[float], int],
    stored: Callable[[], set[str]],
) -> None:
    """At ~8 requests/s on a warm pool of 8, every established connection to the database goes
    silent at once (`silence`): the first request after it, and the 8 sent together next,
    answer within 2.5 s each; no answer is a 500 or a 503; no acknowledged write is lost; each
    silenced connection costs at most one retry, and the pool is renewed once, not reconnected
    per request (`opened_since(wall-clock time)` counts new connections)."""
    with httpx.Client(base_url=server.url, timeout=15) as client:
        traffic = Traffic(server.url, rate=8)
        try:
            time.sleep(1.5)
            silenced_at = time.time()
            silenced = silence()
            assert silenced >= 8, f"only {silenced} connections were established to silence"
            first = ask(client, "POST", "/todos", json={"title": "first after the host vanished"})

            def one(n: int) -> Answer:
                with httpx.Client(base_url=server.url, timeout=15) as own:
                    if n % 2:
                        return ask(own, "GET", "/todos?limit=5")
                    return ask(own, "POST", "/todos", json={"title": f"next {n}"})

            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                following = list(pool.map(one, range(8)))
            time.sleep(1.5)
        finally:
            answers = traffic.stop()
    told = [
        f"{e['time']} {e['message']} {e.get('error', '')}" for e in server.logs() if e["message"] != "request"
    ]
    assert first.status == 201 and first.seconds < 2.5, f"{first}\n" + "\n".join(told[-12:])
    assert [a.status for a in following] == [201, 200] * 4, following
    assert max(a.seconds for a in following) < 2.5, following
    everything = answers + [first, *following]
    assert len(answers) >= 20  # the load was there
    assert [a for a in everything if a.status not in (200, 201) or a.seconds >= 10] == []
    acknowledged = {a.todo_id for a in everything if a.status == 201}
    assert acknowledged <= stored()
    retries = logged(server, RETRIED)
    assert 1 <= retries <= silenced, retries
    assert 1 <= opened_since(silenced_at) <= 12, opened_since(silenced_at)
    assert "unhandled error" not in {entry["message"] for entry in server.logs()}


def vanish_behind_the_stand_in(
    server: LiveServer, gateway: AuroraGateway, dropper: PacketDropper, url: str
) -> None:
    """vanish_under_load where a stand-in (Aurora's or DSQL's) is the database host: once the
    pool is warm through it, its port goes silent, and the connections it accepted since count
    as opened."""
    assert httpx.get(server.url + "/todos", timeout=15).status_code == 200
    wait_for(lambda: gateway.active_connections >= 8, 10, "the pool never warmed to 8")
    vanish_under_load(
        server,
        lambda: dropper.silence(gateway.port),
        lambda since: sum(attempt.at >= since for attempt in gateway.accepted),
        lambda: stored_ids(url),
    )


@pytest.mark.slow
def test_a_vanished_database_host_under_load_costs_the_next_requests_under_2_5_seconds(network):
    name = fresh_database(network)
    env = clean_environment(
        DATABASE_URL=network.postgres.tcp_url(name), DB_POOL_MIN="8", DB_POOL_MAX="12", LOG_LEVEL="info"
    )
    with LiveServer(env) as server:
        assert httpx.get(server.url + "/todos", timeout=15).status_code == 200
        admin = network.postgres.url()
        wait_for(lambda: len(backends(admin, name)) >= 8, 10, "the pool never warmed to 8")
        vanish_under_load(
            server,
            lambda: network.dropper.silence(network.postgres.port),
            lambda since: sum(started >= since for started in backends(admin, name).values()),
            lambda: stored_ids(network.postgres.url(name)),
        )


@pytest.mark.slow
def test_a_vanished_host_is_found_through_the_aurora_gateway_with_iam_tokens(network, fresh_sts):
    """The same, in IAM mode: TLS and tokens through the Aurora stand-in, whose port is the
    vanished host's."""
    name = fresh_database(network)
    url = network.postgres.url(name)
    with aurora(url, 900) as gateway:
        env = iam_environment(
            gateway, fresh_sts, url, 900, DB_POOL_MIN="8", DB_POOL_MAX="12", LOG_LEVEL="info"
        )
        with LiveServer(env) as server:
            vanish_behind_the_stand_in(server, gateway, network.dropper, url)
            assert fresh_sts.calls == 1  # a reconnect presents the pool's token: no STS call
        assert gateway.refused == []


@pytest.mark.slow
def test_a_vanished_host_is_found_through_the_dsql_stand_in(network, fresh_sts):
    """The same, in DSQL mode, through the DSQL stand-in (which also injects no conflicts here:
    every retry counted is a lost connection's)."""
    name = fresh_database(network)
    url = network.postgres.url(name)
    with dsql_service(
        url, fresh_sts, role=False, gateway_options={"conflict_rate": 0}, DB_POOL_MIN="8", DB_POOL_MAX="12"
    ) as (server, gateway):
        vanish_behind_the_stand_in(server, gateway, network.dropper, url)


@pytest.mark.slow
def test_idle_connections_to_a_vanished_host_are_closed_within_3_seconds(network):
    """No traffic at all: the warm pool's 8 idle connections go silent, and the service's kernel
    gives each up within about 2 s of silence (its second unanswered keepalive probe), counted
    at the database, which sees each connection's RST. The next request is served at once,
    with nothing retried."""
    name = fresh_database(network)
    admin = network.postgres.url()
    env = clean_environment(
        DATABASE_URL=network.postgres.tcp_url(name), DB_POOL_MIN="8", DB_POOL_MAX="12", LOG_LEVEL="info"
    )
    with LiveServer(env) as server, httpx.Client(base_url=server.url, timeout=15) as client:
        assert client.get("/todos").status_code == 200
        pool = wait_for(
            lambda: (found := backends(admin, name)) and len(found) >= 8 and found, 10, "no warm pool"
        )
        time.sleep(0.5)
        silenced_at = time.monotonic()
        assert network.dropper.silence(network.postgres.port) == 8
        wait_for(lambda: not set(pool) & set(backends(admin, name)), 5, "idle connections were never closed")
        closed_after = time.monotonic() - silenced_at
        assert closed_after < 3.0, closed_after
        assert len(backends(admin, name)) <= 8  # at most the pool's minimum, reopened
        answer = ask(client, "GET", "/todos")
        assert answer.status == 200 and answer.seconds < 1.0, answer
        assert logged(server, RETRIED) == 0


@pytest.mark.slow
def test_a_statement_waiting_6_seconds_for_a_row_lock_succeeds_on_its_connection(network):
    """A statement slow for a good reason is never taken for dead: the server's kernel
    acknowledges the statement and every keepalive probe while PostgreSQL waits for the lock."""
    name = fresh_database(network)
    admin = network.postgres.url()
    env = clean_environment(
        DATABASE_URL=network.postgres.tcp_url(name), DB_POOL_MIN="1", DB_POOL_MAX="2", LOG_LEVEL="info"
    )
    with LiveServer(env) as server, httpx.Client(base_url=server.url, timeout=15) as client:
        created = client.post("/todos", json={"title": "locked"})
        assert created.status_code == 201
        todo = created.json()["id"]
        before = backends(admin, name)

        locker = threading.Thread(
            target=asyncio.run, args=(hold_the_row(network.postgres.url(name), todo, 6),)
        )
        locker.start()
        time.sleep(0.3)
        try:
            answer = ask(client, "PATCH", f"/todos/{todo}", json={"completed": True})
        finally:
            locker.join()
        assert answer.status == 200 and 5.5 < answer.seconds < 8, answer
        after = backends(admin, name)
        # The same connection ran it: none opened, none lost, nothing retried.
        assert after == before, (before, after)
        assert logged(server, RETRIED) == 0


@pytest.mark.slow
def test_after_a_pause_one_answering_connection_does_not_vouch_for_the_others(network):
    """Keepalives off (so the kernel finds nothing by itself): of a warm pool of 4, the
    connection used last still answers and the other 3 went silent during a pause. After
    the pause, a request takes the answering one (it waits behind a row lock), and 3 more
    sent together take the silent ones: each is checked before its own use and replaced,
    not trusted because its sibling answered a ping, and all 4 answer 200."""
    name = fresh_database(network)
    admin = network.postgres.url()
    env = clean_environment(
        DATABASE_URL=network.postgres.tcp_url(name),
        DB_POOL_MIN="4",
        DB_POOL_MAX="4",
        DB_TCP_KEEPALIVE_IDLE="0",
        DB_TCP_USER_TIMEOUT="0",
        LOG_LEVEL="info",
    )
    with LiveServer(env) as server, httpx.Client(base_url=server.url, timeout=15) as client:
        todo = client.post("/todos", json={"title": "locked"}).json()["id"]
        wait_for(lambda: len(backends(admin, name)) >= 4, 10, "the pool never warmed to 4")
        assert client.get("/todos").status_code == 200
        last_used = run_sql(
            admin,
            "SELECT client_port FROM pg_stat_activity "
            f"WHERE datname = '{name}' AND pid <> pg_backend_pid() ORDER BY state_change DESC LIMIT 1",
        )[0][0]
        assert network.dropper.silence(network.postgres.port, spare=frozenset({last_used})) == 3
        time.sleep(db.THAW_GAP + 0.5)

        def one(n: int) -> Answer:
            with httpx.Client(base_url=server.url, timeout=15) as own:
                if n == 0:
                    return ask(own, "PATCH", f"/todos/{todo}", json={"completed": True})
                return ask(own, "GET", "/todos?limit=5")

        locker = threading.Thread(
            target=asyncio.run, args=(hold_the_row(network.postgres.url(name), todo, 2),)
        )
        locker.start()
        try:
            time.sleep(0.2)
            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                patched = pool.submit(one, 0)
                time.sleep(0.3)  # the PATCH holds the answering connection, behind the lock
                answers = list(pool.map(one, range(1, 4)))
                answers.append(patched.result())
        finally:
            locker.join()
    assert [a.status for a in answers] == [200] * 4, answers
    assert max(a.seconds for a in answers[:3]) < 2.0, answers
    # The pool's own check after the pause pinged the connection that still answers (so the
    # pool was kept), and each silent one was checked and replaced before its own use.
    assert logged(server, "idle connections did not answer after a pause: replacing the pool") == 0
    assert logged(server, "connection discarded: silent after a pause") == 3
