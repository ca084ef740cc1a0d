"""Request limits, over raw sockets so that a body can be huge, slow, stalled or cut short: each
is refused with a problem+json error (413, 408) or dropped quietly, never a server error.
"""

from __future__ import annotations

import concurrent.futures
import json
import socket
import threading
import time
import uuid

import httpx
import pytest

from raw_http import RawResponse, closed_by_server, connect, read_response, request_head
from support import LiveServer, clean_environment, unhandled

pytestmark = pytest.mark.slow  # bodies that trickle and stall over raw sockets, past the read timeout

BODY_READ_TIMEOUT = 3.0  # app.BODY_READ_TIMEOUT for this module's service (10 s in production)
JSON = "application/json"
PROBLEM = "application/problem+json"
SUCCESS = {200, 201, 204}


@pytest.fixture(scope="module")
def live(embedded_database: str):
    env = clean_environment(DATABASE_URL=embedded_database)
    with LiveServer(env, shortened={"app.BODY_READ_TIMEOUT": BODY_READ_TIMEOUT}) as server:
        with httpx.Client(base_url=server.url, timeout=15) as client:
            assert client.get("/todos").status_code == 200  # pool and schema ready
        yield server


def assert_raw_problem(response: RawResponse, status: int) -> dict:
    assert response.status == status, response
    assert response.headers["content-type"] == PROBLEM
    body = json.loads(response.body)
    assert body["status"] == status
    return body


@pytest.mark.parametrize("method", ["POST", "PATCH"])
def test_oversized_bodies_are_refused_before_they_are_read(live: LiveServer, method: str):
    """413 as soon as the body is known to be too big; the rest is never sent.

    A server that read the body whole would wait for the missing bytes until its body
    timeout and answer 408 instead.
    """
    path = "/todos" if method == "POST" else f"/todos/{uuid.uuid4()}"
    with connect(live) as sock:  # announced: 50 MiB, of which 1 KiB arrives
        sock.sendall(
            request_head(method, path, {"Content-Type": JSON, "Content-Length": str(50 << 20)})
            + b'{"title": "'
            + b"x" * 1024
        )
        assert_raw_problem(read_response(sock, 30), 413)
    with connect(live) as sock:  # streamed: 80 KiB of chunks, and the body never ends
        sock.sendall(request_head(method, path, {"Content-Type": JSON, "Transfer-Encoding": "chunked"}))
        for _ in range(80):
            sock.sendall(b"400\r\n" + b"x" * 1024 + b"\r\n")
        assert_raw_problem(read_response(sock, 30), 413)
    assert unhandled(live) == []


def test_slow_and_stalled_bodies_are_cut_off_with_408(live: LiveServer):
    """A body slower than BODY_READ_TIMEOUT gets 408, and the server hangs up.

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
        assert waited < 4 * BODY_READ_TIMEOUT, f"the 408 took {waited:.1f} s"  # the trickle: 100 s
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
            time.sleep(BODY_READ_TIMEOUT / 10)
            sock.sendall(piece)
        assert read_response(sock, 30).status == 201
    assert unhandled(live) == []


def test_a_body_cut_short_by_the_client_is_no_server_error(live: LiveServer):
    """Content-Length larger than what is sent, then the client hangs up: not a 500, not an
    "unhandled error" log (Starlette raises ClientDisconnect from the body stream)."""
    cut = {
        "cut-length": (
            request_head(
                "POST",
                "/todos",
                {"Content-Type": JSON, "Content-Length": "1000", "X-Request-ID": "cut-length"},
            ),
            b'{"title": "cu',
        ),
        "cut-chunked": (
            request_head(
                "PATCH",
                f"/todos/{uuid.uuid4()}",
                {"Content-Type": JSON, "Transfer-Encoding": "chunked", "X-Request-ID": "cut-chunked"},
            ),
            b"40\r\n" + b'{"completed": tr',
        ),
    }
    for head, partial in cut.values():
        with connect(live) as sock:
            sock.sendall(head + partial)
            time.sleep(0.3)
    deadline = time.monotonic() + 15
    while True:
        lines = {
            e["request_id"]: e
            for e in live.logs()
            if e["message"] == "request" and e.get("request_id") in cut
        }
        if len(lines) == len(cut) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert set(lines) == set(cut), "the server never finished these requests"
    for line in lines.values():
        assert line["status"] < 500, line
    assert unhandled(live) == []
