"""Which requests write their own log line: every one outside Vercel; on Vercel, where the
platform already records every request, errors, slow requests, and every one at debug.

Each case runs the app in a process of its own (configure_logging changes process-wide
logging), calls it as an ASGI server would, and reads the JSON lines it writes to stderr.
"""

from __future__ import annotations

import json

import pytest

from support import clean_environment, run_python

CALLS = """
import asyncio
import app

app.configure_logging()


async def call(method, path, request_id):
    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        pass

    headers = [(b"x-request-id", request_id.encode()), (b"x-vercel-id", b"fra1::" + request_id.encode())]
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "https", "path": path, "raw_path": path.encode(), "root_path": "",
             "query_string": b"", "headers": headers, "server": ("127.0.0.1", 443),
             "client": ("203.0.113.7", 50000)}
    await app.app(scope, receive, send)


async def main():
    await call("GET", "/healthz", "quick-success")
    await call("GET", "/no-such-route", "not-found")
    await call("POST", "/healthz", "wrong-method")
    app.SLOW_REQUEST = 0.0  # every request is slow now
    await call("GET", "/healthz", "slow-success")


asyncio.run(main())
"""
EVERY = ["quick-success", "not-found", "wrong-method", "slow-success"]


@pytest.mark.parametrize(
    ("environment", "logged"),
    [
        ({"LOG_LEVEL": "info"}, EVERY),
        ({"LOG_LEVEL": "info", "VERCEL": "1"}, ["not-found", "wrong-method", "slow-success"]),
        ({"LOG_LEVEL": "debug", "VERCEL": "1"}, EVERY),
        ({"LOG_LEVEL": "warning"}, []),
    ],
    ids=[
        "elsewhere: every request",
        "on Vercel: errors and slow ones",
        "on Vercel at debug: every request",
        "at warning: none",
    ],
)
def test_requests_that_write_their_own_line(environment: dict[str, str], logged: list[str]) -> None:
    done = run_python("-c", CALLS, env=clean_environment(**environment))
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]  # every line one JSON object
    requests = [line for line in lines if line["message"] == "request"]
    assert [line["request_id"] for line in requests] == logged, lines
    for line in requests:
        assert line["level"] == "info" and line["status"] in (200, 404, 405)
        # Beside the request id, the platform's id of the same request (its own record of it).
        assert line["vercel_id"] == f"fra1::{line['request_id']}"
