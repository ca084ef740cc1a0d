"""SIGTERM with requests in flight: they finish, then the pool closes, then the process exits."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from support import (
    ROOT,
    LiveServer,
    TableLock,
    clean_environment,
    create_database,
    drop_database,
    free_port,
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


def test_sigterm_stops_the_embedded_postgresql_that_python_app_py_started():
    """`python app.py` with no database configured runs PostgreSQL under ./.data; SIGTERM
    stops it, as Ctrl-C does, and the service still ends as SIGTERM ends a process."""
    # Not under pytest's tmp_path: a concurrent pytest run deletes older session folders.
    workdir = Path(tempfile.mkdtemp(prefix="aurora-todo-sigterm-"))
    log_path, pid_file = workdir / "server.log", workdir / ".data" / "postgres" / "postmaster.pid"
    env = {**clean_environment(), "PORT": str(free_port()), "PYTHONUNBUFFERED": "1"}
    postmaster = None
    try:
        with log_path.open("w") as log_file:
            process = subprocess.Popen(
                [sys.executable, str(ROOT / "app.py")], cwd=workdir, env=env, stdout=log_file, stderr=log_file
            )
        deadline = time.monotonic() + 60
        while "Uvicorn running" not in log_path.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        postmaster = int(pid_file.read_text().split()[0])
        assert running(postmaster)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == -signal.SIGTERM, log_path.read_text()
        assert not running(postmaster), "the embedded PostgreSQL outlived the service"
        assert not pid_file.exists()
    finally:
        if process.poll() is None:
            process.kill()
        if postmaster is not None and running(postmaster):
            os.kill(postmaster, signal.SIGTERM)
        shutil.rmtree(workdir, ignore_errors=True)


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie that nobody reaped."""
    with contextlib.suppress(FileNotFoundError):
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    return False
