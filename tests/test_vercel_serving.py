"""How the app is served by Vercel's runtime, in a function environment built from requirements.txt.

Vercel installs only `requirements.txt` next to the code and bundles `vercel-runtime`; its
vendored uvicorn then picks uvloop and httptools only if they are importable. So these tests
build that environment (tests/standins/function_env.py: requirements.txt + vercel-runtime, nothing
else, cached under .cache/) and serve app.py from it through `vercel_runtime.vc_init`
(tests/standins/vercel_harness.py plays the platform). What is proved:

1. requirements.txt pins every package of the environment exactly, and the app served from
   it runs on uvloop with httptools (asked of the running server: tests/serving_probe.py);
2. keep-alive requests are not stalled by Nagle's algorithm (uvicorn #3149, worked around
   in app.py): a run of requests on one connection has a median far below the ~40 ms a
   stall costs;
3. log records reach the platform through the runtime's logging with their level, as one
   JSON object per line carrying the request id.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import statistics
import sys
import threading
import time

import pytest

if sys.version_info < (3, 12):
    pytest.skip("vercel-runtime needs Python >= 3.12", allow_module_level=True)

from standins.function_env import REPO_ROOT, function_env, installed, requirement_lines  # noqa: E402
from standins.vercel_harness import VercelRuntime  # noqa: E402

PROBE = {"SERVING_PROBE_TARGET": "app.py:app"}


@pytest.fixture(scope="module")
def function_python():
    """The interpreter of requirements.txt + vercel-runtime (built once, then cached)."""
    return function_env(requirement_lines(REPO_ROOT / "requirements.txt"))


def pins() -> dict[str, str]:
    found = {}
    for line in requirement_lines(REPO_ROOT / "requirements.txt"):
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)(\s*;.*)?", line)
        assert match, f"requirements.txt: not an exact pin: {line!r}"
        found[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return found


def test_requirements_pin_every_package_of_the_function_environment(function_python) -> None:
    have = {re.sub(r"[-_.]+", "-", name): version for name, version in installed(function_python).items()}
    wanted = pins()
    for direct in ("starlette", "uvicorn", "asyncpg", "boto3", "vercel", "msgspec", "uvloop", "httptools"):
        assert direct in wanted, f"{direct} is not pinned in requirements.txt"
    # Everything installed is pinned, at that version (pip/setuptools are the venv's own).
    unpinned = {name: v for name, v in have.items()
                if name not in wanted and name not in ("vercel-runtime", "pip", "setuptools")}
    assert not unpinned, f"installed but not pinned in requirements.txt: {unpinned}"
    wrong = {name: (have[name], v) for name, v in wanted.items() if name in have and have[name] != v}
    assert not wrong, f"installed version differs from the pin: {wrong}"


def test_app_served_by_the_runtime_runs_uvloop_and_httptools(function_python, database_url) -> None:
    with VercelRuntime("tests/serving_probe.py", python=str(function_python),
                       env={**PROBE, "DATABASE_URL": database_url}) as runtime:
        serving = runtime.request("GET", "/_probe/serving").json()
        assert (serving["loop"], serving["http"]) == ("uvloop", "httptools"), serving
        # and it is the app, complete: every runtime dependency it needs is in the environment
        created = runtime.request("POST", "/todos", json={"title": "served by vc_init"})
        assert created.status == 201, created.text
        assert runtime.request("GET", created.header("location")).json()["title"] == "served by vc_init"


# --- 2. no Nagle stall ---------------------------------------------------------------------

def keep_alive_latencies(runtime: VercelRuntime, connection: http.client.HTTPConnection, count: int) -> list[float]:
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        response = runtime.request("GET", "/healthz", connection=connection)
        latencies.append((time.perf_counter() - started) * 1000)
        assert response.status == 200, response.text
    return latencies


def test_keep_alive_requests_are_not_stalled_by_nagle(function_python) -> None:
    """~44 ms per request without TCP_NODELAY (Nagle + delayed ACK); well under 20 ms with it.

    Two connections: one opened as soon as the runtime announced its port, while the app's
    lifespan startup is held back (its handshake completes before the app can touch the
    listening socket, as the platform's first connection does), and one opened after.
    """
    runtime = VercelRuntime("tests/serving_probe.py", python=str(function_python),
                            env={**PROBE, "SERVING_PROBE_STARTUP_DELAY": "1.0"})
    starting = threading.Thread(target=runtime.start)
    starting.start()
    try:
        deadline = time.monotonic() + 30
        while runtime.port is None:
            assert time.monotonic() < deadline and starting.is_alive(), "the runtime never announced its port"
            time.sleep(0.002)
        early = runtime.connect()
        starting.join(60)
        assert runtime.returncode is None and not starting.is_alive()
        late = runtime.connect()
        for name, connection in (("early", early), ("late", late)):
            latencies = keep_alive_latencies(runtime, connection, 30)
            assert statistics.median(latencies[1:]) < 20, (
                f"{name} connection: keep-alive median {statistics.median(latencies[1:]):.1f} ms "
                f"(Nagle stall?): {[round(x, 1) for x in latencies]}")
            connection.close()
    finally:
        starting.join(60)
        runtime.stop()


# --- 3. logs through the runtime's logging, with their level ------------------------------

def test_logs_reach_the_platform_as_json_lines_with_level_and_request_id(function_python, database_url) -> None:
    with VercelRuntime("app.py", python=str(function_python),
                       env={"DATABASE_URL": database_url, "LOG_LEVEL": "info"}) as runtime:
        created = runtime.request("POST", "/todos", {"X-Request-ID": "log-check-1"}, json={"title": "logged"})
        assert created.status == 201, created.text
        # uvicorn's own warning for a request it cannot parse, on a raw connection
        with socket.create_connection(("127.0.0.1", runtime.port), timeout=10) as raw:
            raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            raw.recv(1024)
        runtime.wait_idle()
        deadline = time.monotonic() + 10
        while not any("Invalid HTTP request" in log.text for log in runtime.logs):
            assert time.monotonic() < deadline, runtime.output()
            time.sleep(0.05)
        logs = runtime.logs

    assert logs, "nothing was logged over IPC"
    bypassed = [log for log in logs if log.level is None]
    assert not bypassed, f"written to stdout/stderr instead of through logging: {bypassed}"
    entries = []
    for log in logs:
        assert log.text.count("\n") == 0, f"not one line: {log.text!r}"
        entry = json.loads(log.text)
        assert isinstance(entry, dict) and entry["level"] in ("debug", "info", "warning", "error", "critical")
        # the platform's level is the record's
        assert log.level == {"warning": "warn", "critical": "fatal"}.get(entry["level"], entry["level"]), log
        entries.append((log, entry))

    request_lines = [(log, e) for log, e in entries if e["message"] == "request" and e.get("request_id") == "log-check-1"]
    assert len(request_lines) == 1, entries
    log, line = request_lines[0]
    assert (log.level, line["method"], line["path"], line["status"]) == ("info", "POST", "/todos", 201)
    assert log.invocation_id == created.invocation_id  # attributed to its invocation
    invalid = [(log, e) for log, e in entries if e["message"].startswith("Invalid HTTP request")]
    assert invalid and invalid[0][0].level == "warn" and invalid[0][1]["logger"] == "uvicorn.error", entries
