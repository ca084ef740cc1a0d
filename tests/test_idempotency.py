"""Safe retries (issue 12): `Idempotency-Key` on POST /todos, against a real PostgreSQL.

The same key and the same todo fields answer 201 with the same todo and store nothing new,
whether the request is repeated, sent 20 times at once, or retried after a 503 whose insert
did commit (the database's reply held back by a proxy until the service gave up). The same
key with different fields is a 422 naming the header; a malformed key is a 422. Every test
counts rows in the database, not just statuses.
"""

from __future__ import annotations

import concurrent.futures
import os
import socket
import threading
import time
import uuid
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from support import LiveServer, clean_environment, create_database, drop_database, run_sql

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def keyed_database(embedded_postgres: str):
    url = create_database(embedded_postgres)
    yield url
    drop_database(embedded_postgres, url)


@pytest.fixture(scope="module")
def live(keyed_database: str):
    with LiveServer(clean_environment(DATABASE_URL=keyed_database)) as server:
        yield server


@pytest.fixture(scope="module")
def http(live: LiveServer):
    with httpx.Client(base_url=live.url, timeout=20) as client:
        assert client.get("/todos").status_code == 200
        yield client


def count(url: str) -> int:
    return run_sql(url, "SELECT count(*) FROM todos")[0][0]


def rows_titled(url: str, title: str) -> int:
    return run_sql(url, "SELECT count(*) FROM todos WHERE title = '%s'" % title.replace("'", "''"))[0][0]


def assert_key_problem(response: httpx.Response) -> None:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["detail"].startswith("Idempotency-Key:"), response.json()


def key() -> str:
    return str(uuid.uuid4())


# --- the same key, the same todo ----------------------------------------------------------

def test_repeated_creates_with_one_key_store_one_todo(http, keyed_database):
    headers = {"Idempotency-Key": key()}
    first = http.post("/todos", json={"title": "pay rent"}, headers=headers)
    assert first.status_code == 201, first.text
    todo = first.json()
    for _ in range(4):
        again = http.post("/todos", json={"title": "pay rent"}, headers=headers)
        assert again.status_code == 201
        assert again.json() == todo and again.headers["location"] == f"/todos/{todo['id']}"
    assert rows_titled(keyed_database, "pay rent") == 1
    # Without a key, the same body is a new todo each time.
    for _ in range(2):
        assert http.post("/todos", json={"title": "pay rent"}).status_code == 201
    assert rows_titled(keyed_database, "pay rent") == 3


def test_the_same_fields_in_another_spelling_are_the_same_request(http, keyed_database):
    """Sameness is judged on the todo the request asks for: trimmed title, completed."""
    headers = {"Idempotency-Key": key()}
    todo = http.post("/todos", json={"title": "water plants"}, headers=headers).json()
    same = [dict(json={"title": "  water plants\n"}), dict(json={"completed": False, "title": "water plants"}),
            dict(params={"title": "water plants"}), dict(params={"title": "water plants", "completed": "false"})]
    for spelling in same:
        response = http.post("/todos", headers=headers, **spelling)
        assert response.status_code == 201 and response.json() == todo, (spelling, response.text)
    assert rows_titled(keyed_database, "water plants") == 1


def test_twenty_concurrent_creates_with_one_key_store_one_todo(http, keyed_database):
    headers = {"Idempotency-Key": key()}
    barrier = threading.Barrier(20)

    def create(_: int) -> httpx.Response:
        barrier.wait(10)
        return http.post("/todos", json={"title": "concurrent once"}, headers=headers)

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(create, range(20)))
    assert [r.status_code for r in responses] == [201] * 20, [r.text for r in responses if r.status_code != 201]
    assert len({r.text for r in responses}) == 1  # the very same todo, timestamps included
    assert rows_titled(keyed_database, "concurrent once") == 1


# --- the same key, another todo; malformed keys ---------------------------------------------

def test_one_key_with_different_fields_is_422_and_changes_nothing(http, keyed_database):
    headers = {"Idempotency-Key": key()}
    todo = http.post("/todos", json={"title": "feed cat"}, headers=headers).json()
    for other in ({"title": "feed dog"}, {"title": "feed cat", "completed": True}):
        assert_key_problem(http.post("/todos", json=other, headers=headers))
    assert_key_problem(http.post("/todos", params={"title": "feed dog"}, headers=headers))
    assert http.get(f"/todos/{todo['id']}").json() == todo
    assert rows_titled(keyed_database, "feed cat") == 1 and rows_titled(keyed_database, "feed dog") == 0


@pytest.mark.parametrize("bad", [
    b"", b"x" * 256, b"tab\tinside", b"del\x7f", "caf\u00e9".encode("latin-1"), "caf\u00e9".encode(),
    b"nul\x00byte",
], ids=["empty", "256 characters", "tab", "DEL", "latin-1", "utf-8", "NUL"])
def test_a_malformed_key_is_422_and_stores_nothing(live: LiveServer, keyed_database, bad: bytes):
    """Raw headers: an HTTP client library would refuse to send most of these."""
    from test_hardening import connect, read_response, request_head

    before = count(keyed_database)
    body = b'{"title": "malformed key"}'
    head = request_head("POST", "/todos", {"Content-Type": "application/json", "Content-Length": str(len(body))})
    head = head[:-2] + b"Idempotency-Key: " + bad + b"\r\n\r\n"
    with connect(live) as sock:
        sock.sendall(head + body)
        response = read_response(sock, 15)
    if response.status == 400 and response.headers.get("content-type", "").startswith("text/plain"):
        assert bad in (b"nul\x00byte", b"del\x7f"), response  # only uvicorn's parser may say this
    else:
        assert response.status == 422, response
        assert response.headers["content-type"] == PROBLEM
        assert b"Idempotency-Key" in response.body
    assert count(keyed_database) == before


def test_keys_at_the_limits_are_accepted_and_a_repeated_header_is_refused(http, keyed_database):
    for good in ("k", "~" * 255, "with inner spaces", '"a-quoted-sf-string"', key()):
        response = http.post("/todos", json={"title": f"limit {len(good)}"}, headers={"Idempotency-Key": good})
        assert response.status_code == 201, (good, response.text)
    before = count(keyed_database)
    twice = http.post("/todos", json={"title": "twice"},
                      headers=[("Idempotency-Key", "one"), ("Idempotency-Key", "two")])
    assert_key_problem(twice)
    assert count(keyed_database) == before


# --- what deriving the id from the key implies ------------------------------------------------

def test_after_a_patch_a_retry_answers_the_todo_as_it_is_now(http, keyed_database):
    headers = {"Idempotency-Key": key()}
    todo = http.post("/todos", json={"title": "draft"}, headers=headers).json()
    patched = http.patch(f"/todos/{todo['id']}", json={"completed": True}).json()
    retry = http.post("/todos", json={"title": "draft"}, headers=headers)
    assert retry.status_code == 201 and retry.json() == patched
    assert rows_titled(keyed_database, "draft") == 1


def test_after_a_delete_the_same_key_creates_the_todo_again(http, keyed_database):
    headers = {"Idempotency-Key": key()}
    todo = http.post("/todos", json={"title": "phoenix"}, headers=headers).json()
    assert http.delete(f"/todos/{todo['id']}").status_code == 204
    again = http.post("/todos", json={"title": "phoenix"}, headers=headers)
    assert again.status_code == 201 and again.json()["id"] == todo["id"]
    assert rows_titled(keyed_database, "phoenix") == 1


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


def test_a_keyed_create_through_the_api_token_uses_the_scoped_id(keyed_database):
    env = clean_environment(DATABASE_URL=keyed_database, API_TOKEN="scoped-token")
    with LiveServer(env) as server, httpx.Client(base_url=server.url, timeout=20) as client:
        auth = {"Authorization": "Bearer scoped-token", "Idempotency-Key": "shared-key"}
        created = client.post("/todos", json={"title": "scoped"}, headers=auth)
        assert created.status_code == 201
    import app
    os.environ["API_TOKEN"] = "scoped-token"
    try:
        assert created.json()["id"] == str(app.keyed_todo_id("shared-key"))
    finally:
        del os.environ["API_TOKEN"]


# --- a 503 whose insert did commit ------------------------------------------------------------

class ReplyHoldingProxy:
    """TCP on 127.0.0.1 → the embedded PostgreSQL's Unix socket; `hold()` stops its replies.

    While holding, what the service sends still reaches PostgreSQL (so an insert runs and
    commits), but nothing PostgreSQL answers reaches the service: to the service the database
    has gone silent mid-query, as on a network that drops one direction.
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
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, database_url: str) -> str:
        database = urlsplit(database_url).path.lstrip("/")
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def hold(self) -> None:
        self.released.clear()

    def release(self) -> None:
        self.released.set()

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.socket(socket.AF_UNIX)
            server.connect(self.socket_path)
            self.sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, is_reply: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if is_reply:
                    while not self.released.wait(0.1):
                        if self.closing:
                            return
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
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


def test_a_retry_after_a_503_whose_insert_committed_stores_nothing_new(embedded_postgres: str):
    url = create_database(embedded_postgres)
    proxy = ReplyHoldingProxy(embedded_postgres)
    # One connection, so that the insert is already prepared on it when the replies stop:
    # the statement goes out at once instead of waiting for a Parse reply that never comes.
    env = clean_environment(DATABASE_URL=proxy.url(url), DB_POOL_MIN="1", DB_POOL_MAX="1")
    try:
        with LiveServer(env) as server, httpx.Client(base_url=server.url, timeout=30) as client:
            warm = client.post("/todos", json={"title": "warm up"}, headers={"Idempotency-Key": key()})
            assert warm.status_code == 201
            headers, body = {"Idempotency-Key": key()}, {"title": "sent once, answered 503"}
            proxy.hold()
            try:
                started = time.monotonic()
                lost = client.post("/todos", json=body, headers=headers)
                waited = time.monotonic() - started
            finally:
                proxy.release()
            assert lost.status_code == 503 and lost.headers["retry-after"], lost.text
            assert waited < 11, f"the 503 took {waited:.1f} s"
            # The client was told 503, yet the insert committed: a plain retry would duplicate.
            assert rows_titled(url, body["title"]) == 1, "the insert did not commit: the test proves nothing"
            retries = [client.post("/todos", json=body, headers=headers) for _ in range(3)]
            assert [r.status_code for r in retries] == [201] * 3, [r.text for r in retries]
            assert len({r.json()["id"] for r in retries}) == 1
            assert rows_titled(url, body["title"]) == 1
            assert count(url) == 2
            assert not [e for e in server.logs() if e["level"] in ("error", "critical")]
    finally:
        proxy.close()
        drop_database(embedded_postgres, url)
