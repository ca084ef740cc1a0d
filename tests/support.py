"""Test support: real PostgreSQL databases, the service in this process or as a real process.

- `run_sql(url, *statements)` runs SQL on a database, from sync tests.
- `create_database(admin_url)` makes a fresh, empty database and returns its URL.
- `InProcess(env)` serves the app in this process (Starlette's TestClient: httpx over ASGI,
  lifespan run) with exactly that environment; `logs()` reads the JSON lines it wrote.
- `assert_problem(response, status, field)` and `create_todo(client, title)`: the checks and
  the step most HTTP tests share.
- `run_python(*arguments, env=…)` runs this Python in the repository root, its output kept;
  `migrate(env)` is `python db.py migrate` with that environment.
- `LiveServer` starts `python app.py` (uvicorn) in a subprocess with a chosen environment,
  waits for /healthz, and keeps its stderr (the JSON logs) for tests to read;
  `unhandled(server)` is what it logged as an error.
- `TableLock(url)` holds the todos table locked until `release()`; `waiting_on_lock(url)`
  counts the statements queued behind it.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
from starlette.testclient import TestClient

if TYPE_CHECKING:
    import httpx2

    import db

ROOT = Path(__file__).resolve().parent.parent
# The suite's two HTTP clients: httpx against a process, and Starlette's TestClient (built on
# httpx2) in this one. Helpers that serve both take and return these.
Client: TypeAlias = "httpx.Client | TestClient"
Response: TypeAlias = "httpx.Response | httpx2.Response"


async def fetch_sql(url: str, *statements: str) -> list:
    """Run statements in order on one connection; the rows of the last one."""
    connection = await asyncpg.connect(url)
    try:
        result: list = []
        for statement in statements:
            result = await connection.fetch(statement)
        return result
    finally:
        await connection.close()


def run_sql(url: str, *statements: str) -> list:
    """`fetch_sql` from synchronous code."""
    return asyncio.run(fetch_sql(url, *statements))


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


def create_database(admin_url: str) -> str:
    name = "todo_test_" + uuid.uuid4().hex[:12]
    run_sql(admin_url, f'CREATE DATABASE "{name}"')
    return with_database(admin_url, name)


def drop_database(admin_url: str, url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    run_sql(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


PROBLEM = "application/problem+json"


def assert_problem(response: Response, status: int, field: str | None = None) -> dict:
    """A problem+json error (RFC 9457) with this status, naming `field` in its detail."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["type"] == "about:blank" and body["title"]
    if field is not None:
        assert field in body["detail"], body
    assert "Traceback" not in response.text
    return body


def create_todo(client: Client, title: str, **fields: object) -> dict:
    """POST /todos, which must answer 201; the todo."""
    response = client.post("/todos", json={"title": title, **fields})
    assert response.status_code == 201, response.text
    return response.json()


# Ports for servers the tests start come from below the kernel's ephemeral range (Linux:
# 32768 and up, macOS: 49152 and up), from which every outgoing connection takes its local
# port. A port the kernel hands out for bind(0) is free only until the server binds it: with
# four xdist workers opening connections meanwhile, one of them took it.
SERVER_PORTS = range(10_000, 32_768)


def free_port() -> int:
    """A port on 127.0.0.1 that nothing is bound to, for a server about to listen on it."""
    while True:
        port = random.choice(SERVER_PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:  # in use: another
                continue
            return port


def clean_environment(**overrides: str) -> dict[str, str]:
    """The test process's environment without any database or AWS settings, plus overrides."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("PG", "DB_", "AWS_", "VERCEL")) and key not in ("DATABASE_URL", "API_TOKEN")
    }
    env.update(overrides)
    return env


def run_python(*arguments: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`python *arguments` in the repository root with exactly `env`, for at most a minute;
    its exit code and output (text), for the test to judge."""
    return subprocess.run(
        [sys.executable, *arguments], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def migrate(env: dict[str, str], role: str | None = None) -> subprocess.CompletedProcess[str]:
    """`python db.py migrate [role]`, a process of its own with exactly `env`."""
    return run_python(str(ROOT / "db.py"), "migrate", *([role] if role else []), env=env)


def wait_until_serving(client: Client, within: float, why: str, path: str = "/todos") -> None:
    """Poll `path` until it answers 200; fail with `why` after `within` seconds."""
    deadline = time.monotonic() + within
    while client.get(path).status_code != 200:
        assert time.monotonic() < deadline, why
        time.sleep(0.2)


class InProcess(TestClient):
    """The app served in this process with exactly `env` as its environment, as a context
    manager: entering runs the lifespan (logging set up, nothing connected), leaving closes the
    pool. Requests go through httpx into the ASGI app, without sockets or a subprocess, so a
    test costs what its requests cost. Each has a pool lifecycle of its own (`db.lifecycle`,
    swapped in while it serves), so one may be opened while another is open.

    What a process must prove (its own stderr, signals, uvicorn's parser, `python app.py`)
    stays with `LiveServer`.
    """

    def __init__(self, env: dict[str, str]):
        import app

        self.env = env
        self._saved_environment: dict[str, str] = {}
        self._saved_logging: list[tuple[logging.Logger, list[logging.Handler], bool, int]] = []
        self._saved_request_log: tuple[list, list] = ([], [])
        self._saved_lifecycle: db.PoolLifecycle | None = None
        self._log_buffer = io.StringIO()
        # A fresh TodoApp: its middleware stack (CORS_ORIGINS) is built from this environment.
        super().__init__(
            app.TodoApp(routes=app.routes, lifespan=app.lifespan),
            base_url="http://127.0.0.1:8000",
            raise_server_exceptions=False,
        )

    def __enter__(self) -> InProcess:
        import app
        import db

        self._saved_lifecycle = db.lifecycle
        db.lifecycle = db.PoolLifecycle()
        self._saved_environment = dict(os.environ)
        os.environ.clear()
        os.environ.update(self.env)
        self._saved_logging = [
            (logger, logger.handlers[:], logger.propagate, logger.level)
            for logger in map(logging.getLogger, (*app.JSON_LOGGERS, *app.UVICORN_LOGGERS))
        ]
        self._saved_request_log = (app.request_log.stream_handlers, app.request_log.record_handlers)
        try:
            super().__enter__()
        except BaseException:
            self._restore()
            raise
        # The lifespan's configure_logging() made one stderr handler: keep its lines here.
        for handler in app.request_log.stream_handlers:
            handler.setStream(self._log_buffer)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._restore()

    def _restore(self) -> None:
        import app
        import db

        if self._saved_lifecycle is not None:
            db.lifecycle = self._saved_lifecycle
        app.request_log.stream_handlers, app.request_log.record_handlers = self._saved_request_log
        os.environ.clear()
        os.environ.update(self._saved_environment)
        for logger, handlers, propagate, level in self._saved_logging:
            logger.handlers[:], logger.propagate = handlers, propagate
            logger.setLevel(level)
        logging.captureWarnings(False)

    def logs_text(self) -> str:
        return self._log_buffer.getvalue()

    def logs(self) -> list[dict]:
        """Every log line, parsed; a line that is not one JSON object fails the test."""
        return [json.loads(line) for line in self.logs_text().splitlines() if line.strip()]


# `python app.py` with some module-level timing constants of app.py and db.py set first (the
# JSON object in argv[1], {"db.OPERATION_DEADLINE": 2.0, …}): the same code on a shorter clock.
SHORTENED_MAIN = """
import json, sys
import app, db
for name, value in json.loads(sys.argv[1]).items():
    module, _, constant = name.partition(".")
    assert hasattr(sys.modules[module], constant), name
    setattr(sys.modules[module], constant, value)
app.main()
"""


class LiveServer:
    """`python app.py` (or `uvicorn app:app`) in a subprocess; `url`, `env`, `logs()`, `stop()`.

    `shortened` sets timing constants before the app starts, e.g. {"db.OPERATION_DEADLINE": 2.0}:
    a test of a wait's mechanism need not wait as long as production does (the constants are
    read where they are used, so the code under test is unchanged).
    """

    def __init__(
        self,
        env: dict[str, str],
        *,
        ready_timeout: float = 30.0,
        uvicorn_cli: bool = False,
        shortened: dict[str, float] | None = None,
    ):
        self.env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # The child writes its own copy of the descriptor; this process reads the file by name.
        with tempfile.NamedTemporaryFile("w", prefix="aurora-todo-", suffix=".log", delete=False) as log_file:
            self.log_path = Path(log_file.name)
        full_env = {**env, "PORT": str(self.port), "PYTHONUNBUFFERED": "1"}
        # `uvicorn app:app` instead of `python app.py`: uvicorn's own logging setup runs first
        if uvicorn_cli:
            assert not shortened, "shortened constants need python app.py's main()"
            argv = [sys.executable, "-m", "uvicorn", "app:app", "--port", str(self.port)]
        elif shortened:
            argv = [sys.executable, "-c", SHORTENED_MAIN, json.dumps(shortened)]
        else:
            argv = [sys.executable, str(ROOT / "app.py")]
        with open(self.log_path, "w") as log_file:
            self.process = subprocess.Popen(
                argv, cwd=ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.logs_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start:\n{self.logs_text()}")
            time.sleep(0.05)

    def logs_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def logs(self) -> list[dict]:
        """Every log line, parsed; a line that is not one JSON object fails the test."""
        entries = []
        for line in self.logs_text().splitlines():
            if line.strip():
                entries.append(json.loads(line))
        return entries

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> LiveServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def unhandled(server: LiveServer | InProcess) -> list[dict]:
    """The log entries of errors: any error or critical line, and every "unhandled error"."""
    return [
        e for e in server.logs() if e["level"] in ("error", "critical") or e["message"] == "unhandled error"
    ]


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
    return run_sql(
        url,
        f"""SELECT count(*) FROM pg_stat_activity
                            WHERE datname = '{database}' AND wait_event_type = 'Lock'""",
    )[0][0]
