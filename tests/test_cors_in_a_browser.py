"""CORS as a browser enforces it: headless Chromium loads a page from one origin that uses the
service on another, and writes what it saw into the page, which the test reads (--dump-dom).

The page (tests/cors_page.html) is served from http://localhost:<p>; the service runs at
http://127.0.0.1:<q> with CORS_ORIGINS naming that origin and API_TOKEN set. The same page
loaded from http://127.0.0.1:<p> is another origin, which the service does not name.
"""

from __future__ import annotations

import html
import json
import re
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest

from support import LiveServer, clean_environment, free_port

pytestmark = pytest.mark.slow  # two services, one browser start per scenario

PAGE = (Path(__file__).parent / "cors_page.html").read_bytes()
TOKEN = "browser-test-token"
STEPS = [
    "create",
    "create_another",
    "list",
    "next_page",
    "patch",
    "invalid",
    "no_token",
    "unavailable",
    "delete",
]


class PageHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def page_port() -> Iterator[int]:
    """A plain web server for the page, on loopback: http://localhost:<port>/."""
    page_server = ThreadingHTTPServer(("127.0.0.1", 0), PageHandler)
    thread = threading.Thread(target=page_server.serve_forever, daemon=True)
    thread.start()
    yield page_server.server_address[1]
    page_server.shutdown()
    page_server.server_close()


@pytest.fixture(scope="module")
def services(embedded_database: str, page_port: int) -> Iterator[tuple[LiveServer, LiveServer]]:
    """The service for the page's origin, and a second one whose database does not answer (503)."""
    cors = {"CORS_ORIGINS": f"http://localhost:{page_port}", "API_TOKEN": TOKEN}
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    with (
        LiveServer(clean_environment(DATABASE_URL=embedded_database, **cors)) as service,
        LiveServer(clean_environment(DATABASE_URL=closed, **cors)) as down,
    ):
        yield service, down


def page_in_chromium(
    chromium: str, page_origin: str, services: tuple[LiveServer, LiveServer], profile: Path
) -> dict:
    """Load the page in one headless Chromium and return what it wrote into #seen."""
    service, down = services
    url = f"{page_origin}/?" + urlencode({"api": service.url, "down": down.url, "token": TOKEN})
    # The virtual-time budget holds the DOM dump until the page's fetches have settled.
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=20000",
        "--dump-dom",
        url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=90)
    found = re.search(r'<pre id="seen">(.*?)</pre>', result.stdout, re.DOTALL)
    assert found, f"no page in Chromium's output:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert found.group(1) != "running", "the page had not finished when Chromium dumped it"
    return json.loads(html.unescape(found.group(1)))


def test_a_page_on_an_allowed_origin_uses_every_route_and_reads_every_exposed_header(
    chromium: str, services: tuple[LiveServer, LiveServer], page_port: int, tmp_path: Path
):
    """Create (Location, the caller's X-Request-ID), a list whose Link the page follows, PATCH,
    a 422 and a 401 whose detail it reads, a 503 with Retry-After, and DELETE: all from a page
    on http://localhost:<p>, with the token on each request but never on a preflight."""
    seen = page_in_chromium(chromium, f"http://localhost:{page_port}", services, tmp_path)
    assert seen["origin"] == f"http://localhost:{page_port}" and "failed" not in seen, seen
    blocked = {step: seen[step]["blocked"] for step in STEPS if "blocked" in seen[step]}
    assert not blocked, blocked

    created = seen["create"]
    assert created["status"] == 201 and created["body"]["title"] == "from the page"
    assert created["headers"]["location"] == f"/todos/{created['body']['id']}"
    assert created["headers"]["x-request-id"] == "page-create-request"
    assert seen["create_another"]["status"] == 201

    first, second = seen["list"], seen["next_page"]
    assert first["status"] == 200 and len(first["body"]) == 1
    assert re.fullmatch(r'</todos\?limit=1&cursor=[0-9a-f]{46}>; rel="next"', first["headers"]["link"])
    assert second["status"] == 200 and len(second["body"]) == 1
    assert {first["body"][0]["id"], second["body"][0]["id"]} == {
        created["body"]["id"],
        seen["create_another"]["body"]["id"],
    }

    assert seen["patch"]["status"] == 200 and seen["patch"]["body"]["completed"] is True
    for step, status in (("invalid", 422), ("no_token", 401), ("unavailable", 503)):
        answer = seen[step]
        assert answer["status"] == status and answer["headers"]["content-type"] == "application/problem+json"
        assert answer["body"]["status"] == status and answer["body"]["detail"], answer
        assert answer["headers"]["x-request-id"], answer
    assert "title" in seen["invalid"]["body"]["detail"]
    assert int(seen["unavailable"]["headers"]["retry-after"]) >= 1
    assert seen["delete"]["status"] == 204

    service, _ = services
    token = {"Authorization": f"Bearer {TOKEN}"}
    assert httpx.get(f"{service.url}{created['headers']['location']}", headers=token).status_code == 404


def test_a_page_on_another_origin_is_blocked_at_every_step_and_changes_nothing(
    chromium: str, services: tuple[LiveServer, LiveServer], page_port: int, tmp_path: Path
):
    """The same page from http://127.0.0.1:<p>, an origin CORS_ORIGINS does not name: every call
    fails in the browser, and no create, change or delete reaches the database (their
    preflights are refused)."""
    service, _ = services
    token = {"Authorization": f"Bearer {TOKEN}"}
    before = httpx.get(f"{service.url}/todos", headers=token).json()
    seen = page_in_chromium(chromium, f"http://127.0.0.1:{page_port}", services, tmp_path)
    assert seen["origin"] == f"http://127.0.0.1:{page_port}" and "failed" not in seen, seen
    assert {step: "blocked" in seen[step] for step in STEPS} == dict.fromkeys(STEPS, True), seen
    assert httpx.get(f"{service.url}/todos", headers=token).json() == before
