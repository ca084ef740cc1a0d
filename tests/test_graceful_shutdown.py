"""SIGTERM with requests in flight: they finish, then the pool closes, then the process exits."""

from __future__ import annotations

import concurrent.futures
import signal
import time

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
    waiting_on_lock,
)

pytestmark = pytest.mark.slow  # a process signalled with requests in flight


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
