"""Hostile input (issue 12): whatever a client sends, no 5xx, a problem+json error, nothing stored.

The service runs as a real process (`LiveServer`) on the embedded PostgreSQL. Each test
counts the rows before and after, so a refused request that wrote anyway is caught, and the
server's log is checked for unhandled errors at the end.

- invalid UTF-8: in a JSON body (400), in a query value (422 naming the field), and titles
  trimmed before their length is checked;
- malformed framing over raw sockets, odd encodings, huge and deeply nested bodies,
  duplicate keys, odd ids and query values, header floods.

What uvicorn's HTTP parser refuses never reaches the app: those answers are uvicorn's own
(a plain-text 400, or a closed connection), which the tests accept only for that reason.
"""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from support import LiveServer, clean_environment, create_database, drop_database, run_sql
from test_hardening import assert_raw_problem, connect, read_response, request_head

JSON = "application/json"
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def hostile_database(embedded_postgres: str):
    url = create_database(embedded_postgres)
    yield url
    drop_database(embedded_postgres, url)


@pytest.fixture(scope="module")
def live(hostile_database: str):
    with LiveServer(clean_environment(DATABASE_URL=hostile_database)) as server:
        yield server


@pytest.fixture(scope="module")
def http(live: LiveServer):
    with httpx.Client(base_url=live.url, timeout=15) as client:
        assert client.get("/todos").status_code == 200  # pool and schema ready
        yield client


@pytest.fixture
def target(http: httpx.Client) -> dict:
    """A todo for PATCH and DELETE to aim at; the test checks it is unchanged."""
    response = http.post("/todos", json={"title": "target"})
    assert response.status_code == 201
    return response.json()


def rows(url: str) -> list[tuple]:
    return [tuple(row) for row in run_sql(url, "SELECT id, title, completed, updated_at FROM todos ORDER BY id")]


def assert_problem(response: httpx.Response, status: int, field: str | None = None) -> dict:
    assert response.status_code == status, (response.request.method, response.request.url, response.text)
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["type"] == "about:blank" and body["title"]
    if field is not None:
        assert body["detail"].startswith(f"{field}:"), body
    return body


def unhandled(server: LiveServer) -> list[dict]:
    return [e for e in server.logs() if e["level"] in ("error", "critical")]


# --- UTF-8 ------------------------------------------------------------------------------------

NOT_UTF8 = {
    "invalid bytes": b"\xff\xfe",
    "overlong slash": b"\xc0\xaf",
    "CESU-8 surrogate": b"\xed\xa0\x80",
    "truncated sequence": b"\xe2\x82",
    "beyond U+10FFFF": b"\xf4\x90\x80\x80",
    "lone continuation": b"\x80",
}


@pytest.mark.parametrize("name", NOT_UTF8)
def test_a_body_that_is_not_utf8_is_400_and_stores_nothing(http, hostile_database, target, name):
    before = rows(hostile_database)
    bad = NOT_UTF8[name]
    bodies = [b'{"title": "' + bad + b'"}', b'{"title": "ok ' + bad + b' ok"}', b'{"ti' + bad + b'tle": "x"}',
              b'{"title": "x", "completed": true, "' + bad + b'": 1}', bad + b'{"title": "x"}']
    for body in bodies:
        headers = {"content-type": JSON}
        assert_problem(http.post("/todos", content=body, headers=headers), 400)
        assert_problem(http.patch(f"/todos/{target['id']}", content=body, headers=headers), 400)
    assert rows(hostile_database) == before


@pytest.mark.parametrize("encoded", ["%ED%A0%80", "%FF", "%C0%AF", "ok%E2%82", "%F4%90%80%80"])
def test_a_query_value_that_is_not_utf8_is_422_naming_the_field(http, hostile_database, target, encoded):
    before = rows(hostile_database)
    item = f"/todos/{target['id']}"
    assert_problem(http.post(f"/todos?title={encoded}"), 422, "title")
    assert_problem(http.post(f"/todos?title=fine&completed={encoded}"), 422, "completed")
    assert_problem(http.post(f"/todos?title={encoded}", json={"title": "fine"}), 422, "title")
    assert_problem(http.patch(f"{item}?title={encoded}"), 422, "title")
    assert_problem(http.patch(f"{item}?completed={encoded}"), 422, "completed")
    assert_problem(http.get(f"/todos?cursor={encoded}"), 422, "cursor")
    assert_problem(http.get(f"/todos?limit={encoded}"), 422, "limit")
    # A field the route ignores is still no excuse for bytes that are not text.
    assert_problem(http.get(f"/todos?colour={encoded}"), 422, "colour")
    assert_problem(http.get(f"/todos?{encoded}=1"), 422, "query")
    assert rows(hostile_database) == before


def test_percent_encoded_utf8_in_the_query_is_stored_exactly(http):
    created = http.post("/todos?title=%E2%82%AC+%F0%9F%90%8D%20caf%C3%A9&completed=true")
    assert created.status_code == 201, created.text
    assert created.json()["title"] == "€ 🐍 café" and created.json()["completed"] is True


def test_titles_are_trimmed_before_their_length_is_checked(http, hostile_database, target):
    longest = "  " + "é" * 500 + " \n"
    created = http.post("/todos", json={"title": longest})
    assert created.status_code == 201, created.text
    assert created.json()["title"] == "é" * 500
    renamed = http.patch(f"/todos/{target['id']}", json={"title": "\t" + "x" * 500 + "  "})
    assert renamed.status_code == 200 and renamed.json()["title"] == "x" * 500
    by_query = http.post("/todos", params={"title": "  " + "q" * 500 + "  "})
    assert by_query.status_code == 201 and by_query.json()["title"] == "q" * 500
    before = rows(hostile_database)
    for title in (" " + "x" * 501 + " ", "x" * 501, "", "  \u3000\n ", "a\x00b"):
        assert_problem(http.post("/todos", json={"title": title}), 422, "title")
        assert_problem(http.patch(f"/todos/{target['id']}", json={"title": title}), 422, "title")
        assert_problem(http.post("/todos", params={"title": title}), 422, "title")
        assert_problem(http.post("/todos", params={"title": title}, json={"title": "fine"}), 422, "title")
    assert rows(hostile_database) == before


def test_the_documented_title_pattern_is_exactly_the_rule():
    """OpenAPI's title pattern accepts exactly what clean_title() accepts."""
    import re
    import sys

    import app

    # Its white space is str.strip's, code point for code point (not \s, whose meaning
    # differs between Python and the ECMAScript that JSON Schema patterns are written in).
    white = re.compile(f"[{app.WHITE_SPACE}]")
    assert all(bool(white.match(chr(c))) == chr(c).isspace() for c in range(sys.maxunicode + 1))
    pattern = re.compile(app.TITLE_PATTERN)
    samples = ["a", " a ", "ab", "a b", "\u3000a\u3000", "x" * 500, " " + "x" * 500 + "\n", "x" * 501,
               "", " ", "\t\n", "a\x00", "\x00", " \x00 ", "é" * 499 + " é", "\x1f" + "y" * 500, "\x85z\x85"]
    for title in samples:
        try:
            app.clean_title(title)
            accepted = True
        except Exception:
            accepted = False
        assert bool(pattern.search(title)) == accepted, repr(title)


def test_no_request_here_made_the_server_log_an_error(live: LiveServer, http):
    assert unhandled(live) == []
