"""Safe retries: `Idempotency-Key` on POST /todos, against a real PostgreSQL.

The tests that use the module's `server` run once per backend: the plain service, and the
service in DSQL mode (as admin and as a role) behind the DSQL stand-in, which enforces DSQL's
SQL surface and injects optimistic-concurrency conflicts into writes.

The same key and the same todo fields answer 201 with the same todo and store nothing new,
whether the request is repeated, sent 20 times at once, or retried after a 503 whose insert
did commit (the database's reply held back by a proxy until the service gave up). The same
key with different fields is a 422 naming the header; a malformed key is a 422. Every test
counts rows in the database, not just statuses.

PATCH and DELETE need no key: when the connection is reset after the statement committed
(the proxy drops PostgreSQL's reply), the service retries once on a fresh connection and
answers 200 with the change, or 404 (the todo is gone), never 500 — two statements on the
wire, not a storm.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import uuid
from typing import NamedTuple
from urllib.parse import parse_qs, urlsplit

import pytest

from idempotency_support import assert_key_problem, count, key, rows_titled
from support import InProcess, Response, clean_environment, create_database, drop_database, run_sql

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def http(app_client: InProcess) -> InProcess:
    return app_client


@pytest.mark.parametrize(
    "bad",
    [
        b"",
        b"x" * 256,
        b"tab\tinside",
        b"del\x7f",
        "caf\u00e9".encode("latin-1"),
        "caf\u00e9".encode(),
        b"nul\x00byte",
    ],
    ids=["empty", "256 characters", "tab", "DEL", "latin-1", "utf-8", "NUL"],
)
def test_a_malformed_key_is_422_and_stores_nothing(http: InProcess, embedded_database: str, bad: bytes):
    """The header's raw bytes, as the ASGI server hands them over (uvicorn's own parser may
    refuse NUL and DEL before the app sees them: test_hostile_input.py sends such framing)."""
    before = count(embedded_database)
    response = http.post(
        "/todos",
        content=b'{"title": "malformed key"}',
        headers=[(b"Content-Type", b"application/json"), (b"Idempotency-Key", bad)],
    )
    assert_key_problem(response)
    assert count(embedded_database) == before


def test_keys_are_scoped_by_the_api_token(monkeypatch):
    import app

    monkeypatch.delenv("API_TOKEN", raising=False)
    open_id = app.keyed_todo_id("order-1")
    monkeypatch.setenv("API_TOKEN", "token-a")
    id_a = app.keyed_todo_id("order-1")
    monkeypatch.setenv("API_TOKEN", "token-b")
    id_b = app.keyed_todo_id("order-1")
    assert len({open_id, id_a, id_b}) == 3
    assert id_b == app.keyed_todo_id("order-1") and id_b != app.keyed_todo_id("order-2")
    assert "token-b" not in str(id_b) and id_b.version == 5


def test_a_keyed_create_through_the_api_token_uses_the_scoped_id(embedded_postgres: str):
    url = create_database(embedded_postgres)
    env = clean_environment(DATABASE_URL=url, API_TOKEN="scoped-token")
    try:
        with InProcess(env) as client:
            auth = {"Authorization": "Bearer scoped-token", "Idempotency-Key": "shared-key"}
            created = client.post("/todos", json={"title": "scoped"}, headers=auth)
            assert created.status_code == 201
    finally:
        drop_database(embedded_postgres, url)
    import app

    os.environ["API_TOKEN"] = "scoped-token"
    try:
        assert created.json()["id"] == str(app.keyed_todo_id("shared-key"))
    finally:
        del os.environ["API_TOKEN"]


# --- a 503 whose insert did commit ------------------------------------------------------------


class StatementCounter:
    """Reads one client's stream of the PostgreSQL protocol (v3) and calls `on_execute(sql)`
    for each statement it runs: an Execute message (the extended protocol, asyncpg's prepared
    statements; its SQL is the one the portal was bound to) or a Query message (the simple
    protocol, e.g. `connection.execute("SELECT 1")`)."""

    SSL_OR_GSS_REQUESTS = (80877103, 80877104)

    def __init__(self, on_execute) -> None:
        self.buffer = b""
        self.started = False  # past the untyped startup message(s)
        self.on_execute = on_execute
        self.prepared: dict[bytes, str] = {}  # statement name -> SQL (from Parse)
        self.portals: dict[bytes, str] = {}  # portal name -> SQL (from Bind)

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if not self.started:
                if len(self.buffer) < 8:
                    return
                length = int.from_bytes(self.buffer[:4], "big")
                code = int.from_bytes(self.buffer[4:8], "big")
                if len(self.buffer) < length:
                    return
                self.buffer = self.buffer[length:]
                self.started = code not in self.SSL_OR_GSS_REQUESTS
                continue
            if len(self.buffer) < 5:
                return
            length = int.from_bytes(self.buffer[1:5], "big")
            if len(self.buffer) < 1 + length:
                return
            kind, fields = self.buffer[:1], self.buffer[5 : 1 + length].split(b"\0")
            if kind == b"P":  # Parse: statement name, SQL, ...
                self.prepared[fields[0]] = fields[1].decode()
            elif kind == b"B":  # Bind: portal name, statement name, ...
                self.portals[fields[0]] = self.prepared.get(fields[1], "")
            elif kind == b"E":  # Execute: portal name, row limit
                self.on_execute(self.portals.get(fields[0], ""))
            elif kind == b"Q":  # Query: SQL
                self.on_execute(fields[0].decode())
            self.buffer = self.buffer[1 + length :]


class Withheld(NamedTuple):
    """A reply the proxy threw away: the command's tag ("DELETE 1"; empty when the portal
    stopped at its row limit, as with asyncpg's fetchrow), its data rows, and the transaction
    status at ReadyForQuery ("I": idle, the statement's implicit transaction committed)."""

    tag: str
    rows: int
    status: str


class _Link:
    """One service connection through the proxy: its two sockets, and whether it is doomed
    (`ReplyHoldingProxy.drop_after_reply`)."""

    def __init__(self, client: socket.socket, server: socket.socket):
        self.client, self.server = client, server
        self.doomed = False
        self.reply = b""  # the doomed statement's reply, read so far
        self.reply_rows, self.reply_tag = 0, ""
        self.requests_pumped = threading.Event()  # the service-to-PostgreSQL pump has stopped


class ReplyHoldingProxy:
    """TCP on 127.0.0.1 → the embedded PostgreSQL's Unix socket; it can hold or drop replies.

    `hold()`: what the service sends still reaches PostgreSQL (so an insert runs and
    commits), but nothing PostgreSQL answers reaches the service: to the service the database
    has gone silent mid-query, as on a network that drops one direction.

    `drop_after_reply(command)`: the next statement that starts with `command` reaches
    PostgreSQL and runs to its end (committed: PostgreSQL has sent ReadyForQuery); then its
    reply is thrown away and the service's connection reset (RST): to the service the
    connection was lost mid-query, after the commit. `withheld` lists the command tags of
    the replies thrown away ("DELETE 1").

    `executed` lists the SQL of every statement the service ran (the protocol's Execute and
    Query messages), `statements` counts them.
    """

    def __init__(self, postgres_url: str):
        parts = urlsplit(postgres_url)
        directory = parse_qs(parts.query)["host"][0]
        self.socket_path = f"{directory}/.s.PGSQL.{parts.port or 5432}"
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.released = threading.Event()
        self.released.set()
        self.closing = False
        self.sockets: list[socket.socket] = []
        self.executed: list[str] = []
        self.withheld: list[Withheld] = []
        self._drop_command: str | None = None
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def statements(self) -> int:
        return len(self.executed)

    def url(self, database_url: str) -> str:
        database = urlsplit(database_url).path.lstrip("/")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def hold(self) -> None:
        self.released.clear()

    def release(self) -> None:
        self.released.set()

    def drop_after_reply(self, command: str) -> None:
        self._drop_command = command.upper()

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.socket(socket.AF_UNIX)
            server.connect(self.socket_path)
            self.sockets += [client, server]
            link = _Link(client, server)
            threading.Thread(target=self._pump_requests, args=(link,), daemon=True).start()
            threading.Thread(target=self._pump_replies, args=(link,), daemon=True).start()

    def _executing(self, link: _Link, sql: str) -> None:
        """Called before the statement is passed on, so before PostgreSQL can answer it."""
        with self._lock:
            self.executed.append(sql)
            if self._drop_command and sql.lstrip().upper().startswith(self._drop_command):
                self._drop_command = None
                link.doomed = True

    def _pump_requests(self, link: _Link) -> None:
        counter = StatementCounter(lambda sql: self._executing(link, sql))
        try:
            while chunk := link.client.recv(65536):
                counter.feed(chunk)
                link.server.sendall(chunk)
        except OSError:
            pass
        finally:
            link.requests_pumped.set()
            if not link.doomed:  # a doomed link is reset by the other pump, not closed here
                self._shut(link)

    def _pump_replies(self, link: _Link) -> None:
        try:
            while chunk := link.server.recv(65536):
                if link.doomed:  # the reply to the doomed statement: read to its end, drop
                    if self._withhold(link, chunk):
                        return
                    continue
                while not self.released.wait(0.1):
                    if self.closing:
                        return
                link.client.sendall(chunk)
        except OSError:
            pass
        finally:
            self._shut(link)

    def _withhold(self, link: _Link, chunk: bytes) -> bool:
        """Read the doomed statement's reply; at its ReadyForQuery (the implicit transaction
        has ended by then) note what it said and reset the service's connection. True once done.

        The service sent the statement only after the previous reply had reached it, so its
        reply starts at the first chunk read after the statement went out."""
        link.reply += chunk
        while len(link.reply) >= 5:
            kind, length = link.reply[:1], int.from_bytes(link.reply[1:5], "big")
            if len(link.reply) < 1 + length:
                return False
            body, link.reply = link.reply[5 : 1 + length], link.reply[1 + length :]
            if kind == b"D":  # DataRow
                link.reply_rows += 1
            elif kind == b"C":  # CommandComplete: its tag, e.g. "DELETE 1"
                link.reply_tag = body.rstrip(b"\0").decode()
            elif kind == b"Z":  # ReadyForQuery: "I" when no transaction is left open
                with self._lock:
                    self.withheld.append(Withheld(link.reply_tag, link.reply_rows, body.decode()))
                self._reset(link)
                return True
        return False

    def _reset(self, link: _Link) -> None:
        """Reset the service's connection (RST, not FIN) and close PostgreSQL's."""
        link.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        link.client.shutdown(socket.SHUT_RD)  # wakes the other pump's recv; sends nothing
        link.requests_pumped.wait(5)
        link.client.close()  # with a zero linger: RST
        link.server.close()

    @staticmethod
    def _shut(link: _Link) -> None:
        for sock in (link.client, link.server):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.closing = True
        self.released.set()
        self.listener.close()
        for sock in self.sockets:
            sock.close()


@pytest.fixture(scope="module")
def proxied(embedded_postgres: str):
    """(database url, proxy, client): the service, in this process, reaching its database
    through the proxy.

    One connection, so that the statements are already prepared on it when the replies stop:
    an insert goes out at once instead of waiting for a Parse reply that never comes.
    The proxy fronts the embedded PostgreSQL's Unix socket.
    """
    url = create_database(embedded_postgres)
    proxy = ReplyHoldingProxy(embedded_postgres)
    env = clean_environment(DATABASE_URL=proxy.url(url), DB_POOL_MIN="1", DB_POOL_MAX="1")
    try:
        with InProcess(env) as client:
            yield url, proxy, client
    finally:
        proxy.close()
        drop_database(embedded_postgres, url)


def test_a_create_without_a_key_costs_one_statement_a_repeated_key_two(proxied):
    """No extra round trip for requests without a key (counted on the wire, not timed)."""
    url, proxy, client = proxied
    warm_key = key()
    for _ in range(2):  # prepares every statement a create may run on the one connection
        assert (
            client.post(
                "/todos", json={"title": "warm up"}, headers={"Idempotency-Key": warm_key}
            ).status_code
            == 201
        )

    def statements_for(**request) -> int:
        before = proxy.statements
        response = client.post("/todos", **request)
        assert response.status_code == 201, response.text
        return proxy.statements - before

    assert statements_for(json={"title": "no key"}) == 1
    headers = {"Idempotency-Key": key()}
    assert statements_for(json={"title": "keyed"}, headers=headers) == 1  # a new key: the insert alone
    assert statements_for(json={"title": "keyed"}, headers=headers) == 2  # a repeat: the insert, then a read
    assert count(url) == 3


def test_a_retry_after_a_503_whose_insert_committed_stores_nothing_new(proxied, monkeypatch):
    """The service gives up after its deadline (shortened here from db.OPERATION_DEADLINE's
    8 s: the mechanism, not the figure, is what this proves) while the insert commits."""
    import db

    url, proxy, client = proxied
    monkeypatch.setattr(db, "OPERATION_DEADLINE", 2.0)
    warm = {"Idempotency-Key": key()}
    for _ in range(2):  # the insert and the read, prepared on the one connection
        assert client.post("/todos", json={"title": "warm up"}, headers=warm).status_code == 201
    headers, body = {"Idempotency-Key": key()}, {"title": "sent once, answered 503"}
    proxy.hold()
    try:
        started = time.monotonic()
        lost = client.post("/todos", json=body, headers=headers)
        waited = time.monotonic() - started
    finally:
        proxy.release()
    assert lost.status_code == 503 and lost.headers["retry-after"], lost.text
    assert waited < 2.0 + db.CANCEL_GRACE + 1, f"the 503 took {waited:.1f} s"
    # The client was told 503, yet the insert committed: a plain retry would duplicate.
    assert rows_titled(url, body["title"]) == 1, "the insert did not commit: the test proves nothing"
    retries = [client.post("/todos", json=body, headers=headers) for _ in range(3)]
    assert [r.status_code for r in retries] == [201] * 3, [r.text for r in retries]
    assert len({r.json()["id"] for r in retries}) == 1
    assert rows_titled(url, body["title"]) == 1
    assert not [e for e in client.logs() if e["level"] in ("error", "critical")]


# --- a PATCH or DELETE whose connection was lost after it committed -----------------------------


def lost_after_commit(proxy: ReplyHoldingProxy, command: str, send) -> tuple[Response, Withheld, list[str]]:
    """Send a request whose `command` statement runs and commits, and whose connection is
    then reset before the reply reaches the service. The response, the reply the service
    never saw, and the `command` statements that reached PostgreSQL meanwhile."""
    before, withheld = proxy.statements, len(proxy.withheld)
    proxy.drop_after_reply(command)
    response = send()
    assert len(proxy.withheld) == withheld + 1, "no reply was dropped: the test proves nothing"
    lost = proxy.withheld[-1]
    assert lost.status == "I", lost  # committed before the connection went
    return (
        response,
        lost,
        [sql for sql in proxy.executed[before:] if sql.lstrip().upper().startswith(command)],
    )


def test_a_delete_retried_after_its_connection_was_lost_is_404_never_500(proxied):
    """SPEC: a lost connection is retried once on a fresh one; a retried DELETE of a todo
    that the first attempt removed may answer 404, never 500."""
    import db

    url, proxy, client = proxied
    todo = client.post("/todos", json={"title": "deleted once, answered never"}).json()
    response, lost, deletes = lost_after_commit(
        proxy, "DELETE", lambda: client.delete(f"/todos/{todo['id']}")
    )
    assert lost.tag == "DELETE 1"  # the first attempt removed it; the service never heard so
    assert response.status_code in (204, 404), response.text
    if response.status_code == 404:
        assert response.headers["content-type"] == PROBLEM and response.json()["status"] == 404
    assert deletes == [db.DELETE_TODO] * 2  # the first attempt and one retry, not a storm
    assert run_sql(url, f"SELECT count(*) FROM todos WHERE id = '{todo['id']}'")[0][0] == 0
    # The service goes on: a read, and a whole create and delete on the fresh connection.
    assert client.get(f"/todos/{todo['id']}").status_code == 404
    other = client.post("/todos", json={"title": "after the lost delete"}).json()
    assert client.delete(f"/todos/{other['id']}").status_code == 204
    assert not [e for e in client.logs() if e["level"] in ("error", "critical")]


def test_a_patch_retried_after_its_connection_was_lost_is_200_with_the_change(proxied):
    import db

    url, proxy, client = proxied
    todo = client.post("/todos", json={"title": "patched once, answered never"}).json()
    response, lost, updates = lost_after_commit(
        proxy, "UPDATE", lambda: client.patch(f"/todos/{todo['id']}", json={"completed": True})
    )
    assert lost.rows == 1  # the first attempt changed it; the service never heard so
    assert response.status_code == 200, response.text
    assert response.json()["completed"] is True and response.json()["id"] == todo["id"]
    assert updates == [db.UPDATE_TODO] * 2
    assert [tuple(r) for r in run_sql(url, f"SELECT completed FROM todos WHERE id = '{todo['id']}'")] == [
        (True,)
    ]
    assert client.get(f"/todos/{todo['id']}").json() == response.json()
    assert not [e for e in client.logs() if e["level"] in ("error", "critical")]


def test_a_todo_deleted_between_the_insert_and_the_read_is_inserted_anew(embedded_postgres: str, monkeypatch):
    """The insert finds the id taken, then the row is deleted before it is read: create_todo
    inserts again (the id is free) instead of answering with nothing."""
    import asyncio

    import asyncpg

    import db

    database_url = create_database(embedded_postgres)
    monkeypatch.setattr(db, "lifecycle", db.PoolLifecycle())  # a pool of this test's own
    todo_id = uuid.uuid4()
    run_sql(
        database_url,
        db.CREATE_TABLE,
        f"INSERT INTO todos VALUES ('{todo_id}', 'doomed', false, now(), now())",
    )
    real_fetchrow = asyncpg.connection.Connection.fetchrow
    deleted: list[object] = []

    async def fetchrow(self, query, *args, **kwargs):
        if query == db.GET_TODO and not deleted:  # between the two statements: someone deletes it
            other = await asyncpg.connect(database_url)
            deleted.append(await other.execute("DELETE FROM todos WHERE id = $1", todo_id))
            await other.close()
        return await real_fetchrow(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.connection.Connection, "fetchrow", fetchrow)
    monkeypatch.setenv("DATABASE_URL", database_url)

    async def create() -> tuple:
        try:
            return tuple(await db.create_todo(todo_id, "reborn", True))
        finally:
            await db.close()

    try:
        row = asyncio.run(create())
        assert deleted == ["DELETE 1"]
        assert row[:3] == (todo_id, "reborn", True)
        stored = run_sql(database_url, f"SELECT title FROM todos WHERE id = '{todo_id}'")
        assert [tuple(r) for r in stored] == [("reborn",)]
    finally:
        drop_database(embedded_postgres, database_url)


def test_the_openapi_document_describes_the_header_and_its_422(http: InProcess):
    import app

    spec = http.get("/openapi.json").json()
    create = spec["paths"]["/todos"]["post"]
    header = next(p for p in create["parameters"] if p["name"] == "Idempotency-Key")
    assert header["in"] == "header" and header["required"] is False
    assert header["schema"] == {
        "type": "string",
        "minLength": 1,
        "maxLength": 255,
        "pattern": app.IDEMPOTENCY_KEY_PATTERN,
    }
    assert "Idempotency-Key" in create["responses"]["422"]["description"]
    assert all(
        p["name"] != "Idempotency-Key" for p in spec["paths"]["/todos/{todo_id}"]["patch"]["parameters"]
    )
