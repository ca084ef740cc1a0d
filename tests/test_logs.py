"""Logs under plain uvicorn: one JSON object per line, uvicorn's own lines included.

`uvicorn app:app` configures uvicorn's loggers (plain-text handlers) before it imports the
app, and `python app.py` runs uvicorn with log_config=None; either way every line the
process writes, uvicorn's startup lines and its "Invalid HTTP request received" warning
included, must be one JSON object. (Under Vercel's runtime: tests/test_vercel_serving.py.)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support import ROOT, LiveServer, clean_environment, free_port, run_python


@pytest.mark.parametrize("uvicorn_cli", [True, False], ids=["uvicorn app:app", "python app.py"])
def test_every_line_is_json_uvicorns_own_included(database_url: str, uvicorn_cli: bool) -> None:
    with LiveServer(
        clean_environment(DATABASE_URL=database_url, LOG_LEVEL="info"), uvicorn_cli=uvicorn_cli
    ) as live:
        assert httpx.get(live.url + "/todos", headers={"X-Request-ID": "plain-1"}).status_code == 200
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as raw:
            raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            raw.recv(1024)
        deadline = time.monotonic() + 10
        while "Invalid HTTP request" not in live.logs_text():
            assert time.monotonic() < deadline, live.logs_text()
            time.sleep(0.05)
        entries = live.logs()  # fails on any line that is not one JSON object

    messages = {e["message"]: e for e in entries}
    startup = [
        m for m in messages if m.startswith(("Started server process", "Application startup complete"))
    ]
    assert len(startup) == 2, entries
    assert all(messages[m]["logger"] == "uvicorn.error" and messages[m]["level"] == "info" for m in startup)
    invalid = next(e for e in entries if e["message"].startswith("Invalid HTTP request"))
    assert (invalid["level"], invalid["logger"]) == ("warning", "uvicorn.error")
    request = next(e for e in entries if e["message"] == "request" and e.get("request_id") == "plain-1")
    assert (request["method"], request["path"], request["status"]) == ("GET", "/todos", 200)


def test_request_line_is_redacted_like_every_other_line(database_url: str) -> None:
    """The request line takes a short path (app.RequestLog), but auth.redact still scrubs it:
    a token-shaped path or request id never reaches the log."""
    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzb21lb25lIn0.c2lnbmF0dXJlc2lnbmF0dXJl"
    with LiveServer(clean_environment(DATABASE_URL=database_url, LOG_LEVEL="info")) as live:
        assert httpx.get(f"{live.url}/todos/{token}", headers={"X-Request-ID": token}).status_code == 404
        deadline = time.monotonic() + 10
        while '"status":404' not in live.logs_text():
            assert time.monotonic() < deadline, live.logs_text()
            time.sleep(0.05)
        text = live.logs_text()
    assert token not in text and "eyJhbGci" not in text
    line = next(json.loads(x) for x in text.splitlines() if '"status":404' in x)
    assert line["path"] == "/todos/[redacted]" and line["request_id"] == "[redacted]"


SNAPSHOT = """
import json, logging, warnings
def snapshot():
    names = ["", "aurora_todo", "asyncpg", "asyncio", "py.warnings", "uvicorn", "uvicorn.error",
             "uvicorn.access", "botocore"]
    loggers = {n: [repr(logging.getLogger(n).handlers), logging.getLogger(n).level,
                   logging.getLogger(n).propagate] for n in names}
    return [loggers, repr(warnings.showwarning), logging.logThreads, repr(logging._srcfile)]
before = snapshot()
import app
print(json.dumps([before, snapshot()]))
"""


def test_importing_the_app_changes_no_logging() -> None:
    """Logging is set up by one call (app.configure_logging), made by whatever starts serving;
    `import app` alone leaves every logger, Python's warnings and logging's switches as they were."""
    done = run_python("-c", SNAPSHOT, env=clean_environment())
    assert done.returncode == 0, done.stderr
    before, after = json.loads(done.stdout)
    assert after == before
    assert not done.stderr


WARN = """
import warnings
import app
app.configure_logging()
warnings.warn("a warning at run time", RuntimeWarning)
"""


def test_a_python_warning_is_a_json_line() -> None:
    done = run_python("-c", WARN, env=clean_environment(LOG_LEVEL="info"))
    assert done.returncode == 0, done.stderr
    entries = [json.loads(line) for line in done.stderr.splitlines() if line.strip()]  # plain text fails
    assert len(entries) == 1, done.stderr
    assert (entries[0]["logger"], entries[0]["level"]) == ("py.warnings", "warning")
    assert "RuntimeWarning: a warning at run time" in entries[0]["message"]


@pytest.mark.slow
def test_python_app_py_on_the_embedded_database_logs_json_from_its_first_line() -> None:
    """`python app.py` with no database configured first starts the embedded PostgreSQL (under
    ./.data), on the way to which platformdirs warns when XDG_RUNTIME_DIR is unset
    (RuntimeDirWarning); that warning is a JSON line too, like every line up to "Uvicorn running"."""
    env = clean_environment(LOG_LEVEL="info")
    env.pop("XDG_RUNTIME_DIR", None)
    with serving([str(ROOT / "app.py")], env) as (log_path, _):
        entries = json_lines(log_path)
    started = next(i for i, entry in enumerate(entries) if entry["message"].startswith("Started server"))
    assert "using the embedded PostgreSQL under .data/postgres" in [e["message"] for e in entries[:started]]


@pytest.mark.slow
def test_uvicorn_no_access_log_leaves_the_apps_request_line_alone(database_url: str) -> None:
    """`uvicorn app:app --no-access-log`: uvicorn writes no access line, the app its request line."""
    argv = ["-m", "uvicorn", "--app-dir", str(ROOT), "app:app", "--no-access-log"]
    with serving(argv, clean_environment(DATABASE_URL=database_url, LOG_LEVEL="info")) as (log_path, url):
        assert httpx.get(url + "/healthz", headers={"X-Request-ID": "no-access-1"}).status_code == 200
        deadline = time.monotonic() + 10
        while '"message":"request"' not in log_path.read_text():  # written after the response;
            assert time.monotonic() < deadline, log_path.read_text()  # an access line, before it
            time.sleep(0.05)
        entries = [e for e in json_lines(log_path) if e.get("request_id") == "no-access-1"]
    assert [(e["logger"], e["message"]) for e in entries] == [("aurora_todo", "request")], entries


@contextlib.contextmanager
def serving(argv: list[str], env: dict[str, str]) -> Iterator[tuple[Path, str]]:
    """Run `python ARGV` on a free port (PORT, and UVICORN_PORT for uvicorn's command line) in a
    fresh directory until it logs "Uvicorn running"; yield its output file and URL; then stop it
    as Ctrl-C would, with the embedded PostgreSQL it may have started there."""
    # Not under pytest's tmp_path: a concurrent pytest run deletes older session folders.
    workdir = Path(tempfile.mkdtemp(prefix="aurora-todo-serving-"))
    log_path, port = workdir / "server.log", free_port()
    env = {**env, "PORT": str(port), "UVICORN_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            [sys.executable, *argv],
            cwd=workdir,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "Uvicorn running" not in log_path.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.1)
        yield log_path, f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGINT)  # as Ctrl-C: an embedded PostgreSQL stops at exit
        process.wait(30)
        pid_file = workdir / ".data" / "postgres" / "postmaster.pid"
        if pid_file.exists():  # it outlived the server: stop it
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
        shutil.rmtree(workdir, ignore_errors=True)


def json_lines(path: Path) -> list[dict]:
    """Every line of the file, parsed; a line that is not one JSON object fails the test."""
    text, entries = path.read_text(), []
    for line in filter(str.strip, text.splitlines()):
        try:
            entries.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r} in\n{text}")
    return entries
