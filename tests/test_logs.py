"""Logs under plain uvicorn: one JSON object per line, uvicorn's own lines included.

`uvicorn app:app` configures uvicorn's loggers (plain-text handlers) before it imports the
app, and `python app.py` runs uvicorn with log_config=None; either way every line the
process writes, uvicorn's startup lines and its "Invalid HTTP request received" warning
included, must be one JSON object. (Under Vercel's runtime: tests/test_vercel_serving.py.)
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from support import LiveServer, clean_environment


@pytest.mark.parametrize("uvicorn_cli", [True, False], ids=["uvicorn app:app", "python app.py"])
def test_every_line_is_json_uvicorns_own_included(database_url: str, uvicorn_cli: bool) -> None:
    with LiveServer(clean_environment(DATABASE_URL=database_url, LOG_LEVEL="info"), uvicorn_cli=uvicorn_cli) as live:
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
    startup = [m for m in messages if m.startswith(("Started server process", "Application startup complete"))]
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
