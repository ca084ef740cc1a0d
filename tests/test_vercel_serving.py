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
   JSON object per line carrying the request id; a request's own line is written for an
   error (with the platform's `x-vercel-id` beside the request id), not for a quick success;
4. from vercel-runtime 0.23.3 the runtime sets TCP_NODELAY itself (it hands uvicorn its socket
   with sockets=, not fd=), and RuntimeNoDelay is harmless there: it can go once the builder
   installs 0.23.3 or later;
5. on Hive (0.24's mode with the IPC socket at /opt/vercel/ipc.sock), `server-started` waits
   for lifespan startup and a failed startup is fatal: the app's startup does no I/O, so even
   a configuration that cannot work starts, and answers with its 503.

Each runs on the builder's pin (0.23.2) and on the newest release, in both of its modes where
they differ (standins/vercel_harness.py: RUNTIME_VARIANTS).
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from standins.vercel_harness import NO_VERCEL_RUNTIME

if NO_VERCEL_RUNTIME:  # named on the command line; a whole run leaves the module out (conftest)
    pytest.skip(NO_VERCEL_RUNTIME, allow_module_level=True)

from standins.function_env import REPO_ROOT, installed, requirement_lines  # noqa: E402
from standins.vercel_harness import (  # noqa: E402
    BUILDER_RUNTIME,
    RUNTIME_VARIANTS,
    RuntimeVariant,
    VercelRuntime,
)

pytestmark = pytest.mark.slow  # a function environment and Vercel's runtime per test

PROBE = {"SERVING_PROBE_TARGET": "app.py:app"}
EVERY_RUNTIME = pytest.mark.parametrize("vercel_runtime", RUNTIME_VARIANTS, indirect=True, ids=str)
# Where Hive's mode changes nothing the test looks at (the accept path, the socket options).
EVERY_VERSION = pytest.mark.parametrize(
    "vercel_runtime", [v for v in RUNTIME_VARIANTS if not v.hive], indirect=True, ids=str
)


def serve(vercel_runtime: RuntimeVariant, function_python, entrypoint: str, **env: str) -> VercelRuntime:
    return VercelRuntime(entrypoint, python=str(function_python), env=env, hive=vercel_runtime.hive)


@contextmanager
def started_in_a_thread(runtime: VercelRuntime, announce_within: float) -> Iterator[threading.Thread]:
    """`runtime` starting in a thread of its own (which ends when start() returns), entered as
    soon as the runtime has announced its port, while the app's startup may still be running;
    on the way out the start is awaited and the runtime stopped."""
    starting = threading.Thread(target=runtime.start)
    starting.start()
    try:
        deadline = time.monotonic() + announce_within
        while runtime.port is None:
            assert time.monotonic() < deadline and starting.is_alive(), "the runtime never announced its port"
            time.sleep(0.002)
        yield starting
    finally:
        starting.join(60)
        runtime.stop()


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
    unpinned = {
        name: v
        for name, v in have.items()
        if name not in wanted and name not in ("vercel-runtime", "pip", "setuptools")
    }
    assert not unpinned, f"installed but not pinned in requirements.txt: {unpinned}"
    wrong = {name: (have[name], v) for name, v in wanted.items() if name in have and have[name] != v}
    assert not wrong, f"installed version differs from the pin: {wrong}"


@EVERY_RUNTIME
def test_app_served_by_the_runtime_runs_uvloop_and_httptools(
    vercel_runtime, function_python, database_url
) -> None:
    with serve(
        vercel_runtime, function_python, "tests/serving_probe.py", **PROBE, DATABASE_URL=database_url
    ) as runtime:
        serving = runtime.request("GET", "/_probe/serving").json()
        assert (serving["loop"], serving["http"]) == ("uvloop", "httptools"), serving
        # and it is the app, complete: every runtime dependency it needs is in the environment
        created = runtime.request("POST", "/todos", json={"title": "served by vc_init"})
        assert created.status == 201, created.text
        assert runtime.request("GET", created.location).json()["title"] == "served by vc_init"


# --- 2. no Nagle stall ---------------------------------------------------------------------


def keep_alive_latencies(
    runtime: VercelRuntime, connection: http.client.HTTPConnection, count: int
) -> list[float]:
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        response = runtime.request("GET", "/healthz", connection=connection)
        latencies.append((time.perf_counter() - started) * 1000)
        assert response.status == 200, response.text
    return latencies


@EVERY_VERSION
def test_keep_alive_requests_are_not_stalled_by_nagle(vercel_runtime, function_python) -> None:
    """~44 ms per request without TCP_NODELAY (Nagle + delayed ACK); well under 20 ms with it.

    Two connections: one opened as soon as the runtime announced its port, while the app's
    lifespan startup is held back (its handshake completes before the app can touch the
    listening socket, as the platform's first connection does), and one opened after. Where the
    runtime sets TCP_NODELAY itself, RuntimeNoDelay sets it again: no stall, no warning.
    """
    runtime = VercelRuntime(
        "tests/serving_probe.py",
        python=str(function_python),
        env={**PROBE, "SERVING_PROBE_STARTUP_DELAY": "1.0"},
    )
    with started_in_a_thread(runtime, 30) as starting:
        early = runtime.connect()
        starting.join(60)
        assert runtime.returncode is None and not starting.is_alive()
        late = runtime.connect()
        for name, connection in (("early", early), ("late", late)):
            latencies = keep_alive_latencies(runtime, connection, 30)
            assert statistics.median(latencies[1:]) < 20, (
                f"{name} connection: keep-alive median {statistics.median(latencies[1:]):.1f} ms "
                f"(Nagle stall?): {[round(x, 1) for x in latencies]}"
            )
            assert runtime.request("GET", "/_probe/serving", connection=connection).json()["nodelay"] is True
            connection.close()
        assert "listening socket was not found" not in runtime.output()


# --- 3. logs through the runtime's logging, with their level ------------------------------


@EVERY_RUNTIME
def test_logs_reach_the_platform_as_json_lines_with_level_and_request_id(
    vercel_runtime, function_python, database_url
) -> None:
    with serve(
        vercel_runtime, function_python, "app.py", DATABASE_URL=database_url, LOG_LEVEL="info"
    ) as runtime:
        created = runtime.request("POST", "/todos", {"X-Request-ID": "log-check-1"}, json={"title": "logged"})
        assert created.status == 201, created.text
        missing = runtime.request(
            "GET",
            "/todos/not-a-todo",
            {"X-Request-ID": "log-check-2", "x-vercel-id": "fra1::log-check-edge-id"},
        )
        assert missing.status == 404, missing.text
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

    # The platform records every request itself: a success that was quick adds no line of ours;
    # an error does, with the request id beside the platform's own (x-vercel-id).
    def request_lines(request_id: str) -> list:
        return [
            (log, e) for log, e in entries if e["message"] == "request" and e.get("request_id") == request_id
        ]

    assert request_lines("log-check-1") == [], entries
    assert len(request_lines("log-check-2")) == 1, entries
    log, line = request_lines("log-check-2")[0]
    assert (log.level, line["method"], line["path"], line["status"]) == (
        "info",
        "GET",
        "/todos/not-a-todo",
        404,
    )
    assert line["vercel_id"] == "fra1::log-check-edge-id"
    assert log.invocation_id == missing.invocation_id  # attributed to its invocation
    invalid = [(log, e) for log, e in entries if e["message"].startswith("Invalid HTTP request")]
    assert invalid and invalid[0][0].level == "warn" and invalid[0][1]["logger"] == "uvicorn.error", entries


# --- 4. TCP_NODELAY: set by the runtime itself from 0.23.3 -------------------------------------


@EVERY_VERSION
def test_the_runtime_sets_tcp_nodelay_itself_from_0_23_3(vercel_runtime, function_python) -> None:
    """With no app behind the probe (so RuntimeNoDelay plays no part), a keep-alive connection
    has TCP_NODELAY exactly when the runtime is 0.23.3 or later; before, only RuntimeNoDelay
    sets it (test 2 proves the stall it prevents)."""
    with serve(vercel_runtime, function_python, "tests/serving_probe.py") as runtime:
        connection = runtime.connect()
        nodelay = runtime.request("GET", "/_probe/serving", connection=connection).json()["nodelay"]
        connection.close()
    version = tuple(int(part) for part in vercel_runtime.version.split("."))
    assert nodelay is (version >= (0, 23, 3)), (vercel_runtime, nodelay)


# --- 5. Hive: server-started after lifespan startup, and a startup that cannot fail ------------


@pytest.mark.parametrize(
    "vercel_runtime",
    [v for v in RUNTIME_VARIANTS if v.version != BUILDER_RUNTIME.version],
    indirect=True,
    ids=str,
)
def test_on_hive_the_port_is_announced_after_lifespan_startup(vercel_runtime, function_python) -> None:
    """The app's startup held back by two seconds: on Hive, the app answers as soon as the runtime
    announced its port; elsewhere the port is announced first and the app answers only after."""
    runtime = serve(
        vercel_runtime, function_python, "tests/serving_probe.py", **PROBE, SERVING_PROBE_STARTUP_DELAY="2.0"
    )
    with started_in_a_thread(runtime, 60) as starting:
        announced = time.monotonic()
        starting.join(60)
        answered = time.monotonic() - announced  # start() returns once a ping is answered
        assert runtime.returncode is None and runtime.request("GET", "/healthz").status == 200
    if vercel_runtime.hive:
        assert answered < 1.0, answered
    else:
        assert answered > 1.5, answered


@EVERY_RUNTIME
def test_a_configuration_that_cannot_work_still_starts_and_answers_503(
    vercel_runtime, function_python
) -> None:
    """On Hive a failed lifespan startup kills the instance: the app's startup reads no
    configuration and does no I/O, so a broken one is a 503 naming the variable, and /healthz
    is 200, on every runtime."""
    with serve(vercel_runtime, function_python, "app.py", CORS_ORIGINS="https://a.example/") as runtime:
        assert runtime.request("GET", "/healthz").status == 200
        todos = runtime.request("GET", "/todos")
        assert runtime.returncode is None
    assert todos.status == 503 and todos.header("content-type") == "application/problem+json", todos.text
    assert "CORS_ORIGINS" in todos.json()["detail"]
