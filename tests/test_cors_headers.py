"""CORS, opt-in through CORS_ORIGINS: the headers, in process (a real browser: test_cors_in_a_browser).

Each test builds a fresh app, because the middleware stack is built (and CORS_ORIGINS read) on
its first request. Two extra routes under /todos raise what the database layer and a bug
raise, so that the 503 and the 500 travel the same path as in production without a database.
"""

from __future__ import annotations

from typing import Any

import pytest
from starlette.requests import Request
from starlette.routing import Route
from starlette.testclient import TestClient

import app
import db
from support import InProcess, clean_environment

PAGE = "http://localhost:3000"
TOKEN = "cors-test-token"
EXPOSED = {"link", "location", "x-request-id", "retry-after"}
PREFLIGHT_HEADERS = "content-type, authorization, idempotency-key, x-request-id"


async def unavailable(request: Request) -> None:
    raise db.Unavailable("the database did not answer")


async def broken(request: Request) -> None:
    raise RuntimeError("a bug")


@pytest.fixture
def client_with(monkeypatch: pytest.MonkeyPatch):
    """client_with(**env): a client of a fresh app under exactly these CORS_ORIGINS / API_TOKEN."""

    def make(**env: str) -> TestClient:
        for name in ("CORS_ORIGINS", "API_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        routes = [Route("/todos/unavailable", unavailable), Route("/todos/broken", broken), *app.routes]
        return TestClient(app.TodoApp(routes=routes), base_url="http://127.0.0.1:8000")

    return make


def preflight(client: TestClient, origin: str, method: str = "POST", headers: str = PREFLIGHT_HEADERS):
    return client.options(
        "/todos",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": headers,
        },
    )


def cors_headers(response) -> dict[str, str]:
    return {name: value for name, value in response.headers.items() if name.startswith("access-control-")}


def test_without_cors_origins_there_is_no_cors_layer_and_no_cors_header(client_with):
    """Unset (or empty), the stack is the request middleware alone: responses and per-request cost
    are what they were before CORS existed, whatever Origin a request carries."""
    for env in ({}, {"CORS_ORIGINS": ""}, {"CORS_ORIGINS": " "}):
        client = client_with(**env)
        response = client.get("/healthz", headers={"Origin": PAGE})
        assert response.status_code == 200 and cors_headers(response) == {} and "vary" not in response.headers
        assert type(client.app.middleware_stack) is app.RequestContext
        assert client.app.middleware_stack.app is client.app.router
        # A preflight is just an OPTIONS request then: 405, as before.
        assert preflight(client, PAGE).status_code == 405


def test_a_preflight_from_an_allowed_origin_needs_no_token_and_allows_the_api(client_with):
    """Browsers send no Authorization with a preflight: it is answered before the token check,
    with the API's methods, the headers clients send, and a max-age; never credentials."""
    client = client_with(CORS_ORIGINS=f"https://app.example.com, {PAGE}", API_TOKEN=TOKEN)
    for method in ("GET", "POST", "PATCH", "DELETE"):
        response = preflight(client, PAGE, method)
        assert response.status_code == 200, response.text
        headers = cors_headers(response)
        assert headers["access-control-allow-origin"] == PAGE
        assert {"GET", "POST", "PATCH", "DELETE"} <= set(headers["access-control-allow-methods"].split(", "))
        allowed = {name.lower() for name in headers["access-control-allow-headers"].split(", ")}
        assert {"content-type", "authorization", "idempotency-key", "x-request-id"} <= allowed
        assert int(headers["access-control-max-age"]) >= 60
        assert "access-control-allow-credentials" not in headers
        assert "Origin" in response.headers["vary"]
    # ...while the request itself still needs the token.
    assert client.get("/todos", headers={"Origin": PAGE}).status_code == 401


def test_a_preflight_from_another_origin_or_for_another_header_is_refused(client_with):
    """With a 400 problem, like every error, saying what was refused."""
    client = client_with(CORS_ORIGINS=PAGE)
    for response in (
        preflight(client, "http://localhost:3001"),
        preflight(client, "https://evil.example"),
        preflight(client, PAGE, headers="content-type, x-custom"),
        preflight(client, PAGE, "PUT"),
    ):
        assert response.status_code == 400 and response.headers["content-type"] == app.PROBLEM_JSON
        assert response.json()["detail"].startswith("Disallowed CORS ")
        assert response.headers.get("access-control-allow-origin") != "http://localhost:3001"
    assert "access-control-allow-origin" not in preflight(client, "https://evil.example").headers


def test_a_preflight_carries_the_callers_request_id_and_writes_its_request_line():
    """CORS sits inside the request middleware: a preflight it answers, allowed or refused,
    has an X-Request-ID (the caller's, when sane) and its line in the log, like any request."""
    env = clean_environment(CORS_ORIGINS=PAGE, API_TOKEN=TOKEN, LOG_LEVEL="info")
    with InProcess(env) as client:
        allowed = client.options(
            "/todos",
            headers={
                "Origin": PAGE,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": PREFLIGHT_HEADERS,
                "X-Request-ID": "preflight-1",
            },
        )
        refused = client.options(
            "/todos",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        lines = [entry for entry in client.logs() if entry["message"] == "request"]
    assert allowed.status_code == 200 and allowed.headers["x-request-id"] == "preflight-1"
    assert refused.status_code == 400 and refused.headers["x-request-id"]
    assert [(line["request_id"], line["method"], line["path"], line["status"]) for line in lines] == [
        ("preflight-1", "OPTIONS", "/todos", 200),
        (refused.headers["x-request-id"], "OPTIONS", "/todos", 400),
    ]


def test_each_layer_is_there_only_when_its_setting_is(client_with):
    """The request middleware outermost; CORS (rendering errors inside it) only with
    CORS_ORIGINS; the bearer token only with API_TOKEN; then the router."""

    def layers(client: TestClient) -> list[type]:
        client.get("/healthz")  # the stack is built on the first request
        service = client.app
        assert isinstance(service, app.TodoApp)
        found: list[type] = []
        layer: Any = service.middleware_stack
        while layer is not service.router:
            found.append(type(layer))
            layer = layer.app
        return found

    assert layers(client_with()) == [app.RequestContext]
    assert layers(client_with(API_TOKEN=TOKEN)) == [app.RequestContext, app.BearerToken]
    assert layers(client_with(CORS_ORIGINS=PAGE)) == [app.RequestContext, app.Cors, app.Problems]
    assert layers(client_with(CORS_ORIGINS=PAGE, API_TOKEN=TOKEN)) == [
        app.RequestContext,
        app.Cors,
        app.Problems,
        app.BearerToken,
    ]


def test_errors_from_an_allowed_origin_carry_the_cors_headers_and_the_request_id(client_with):
    """401, 404, 422, 503 and 500 pass through CORS like any answer, so a page can read the
    problem's detail, the X-Request-ID it points to, and Retry-After."""
    client = client_with(CORS_ORIGINS=PAGE, API_TOKEN=TOKEN)
    token = {"Authorization": f"Bearer {TOKEN}"}
    cases = [
        (401, client.get("/todos", headers={"Origin": PAGE})),
        (404, client.get("/todos/not-a-uuid", headers={"Origin": PAGE, **token})),
        (422, client.get("/todos?limit=0", headers={"Origin": PAGE, **token})),
        (503, client.get("/todos/unavailable", headers={"Origin": PAGE, **token})),
        (500, client.get("/todos/broken", headers={"Origin": PAGE, **token})),
    ]
    for status, response in cases:
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == app.PROBLEM_JSON and response.json()["detail"]
        assert response.headers["access-control-allow-origin"] == PAGE
        exposed = {
            name.strip().lower() for name in response.headers["access-control-expose-headers"].split(",")
        }
        assert exposed == EXPOSED
        assert response.headers["x-request-id"]
        assert "access-control-allow-credentials" not in response.headers
    assert int(cases[3][1].headers["retry-after"]) >= 1
    assert cases[4][1].headers["x-request-id"] in cases[4][1].json()["detail"]


def test_another_origin_gets_no_allow_origin_so_its_browser_blocks_the_answer(client_with):
    client = client_with(CORS_ORIGINS=PAGE)
    response = client.get("/healthz", headers={"Origin": "http://localhost:3001"})
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
    assert "Origin" in response.headers["vary"]  # a cache must not hand it to the allowed origin
    # A request with no Origin (curl, a server) is served as before.
    assert cors_headers(client.get("/healthz")) == {}


def test_a_star_allows_every_origin_without_credentials(client_with):
    client = client_with(CORS_ORIGINS="*")
    response = client.get("/healthz", headers={"Origin": "https://anywhere.example"})
    assert response.headers["access-control-allow-origin"] == "*"
    assert preflight(client, "https://anywhere.example").headers["access-control-allow-origin"] == "*"


@pytest.mark.parametrize(
    "value, origins",
    [
        ("http://localhost:3000", ["http://localhost:3000"]),
        (
            " http://localhost:3000 , https://app.example.com,",
            ["http://localhost:3000", "https://app.example.com"],
        ),
        ("http://127.0.0.1:5173,http://[::1]:5173", ["http://127.0.0.1:5173", "http://[::1]:5173"]),
        ("*", ["*"]),
        ("", None),
    ],
)
def test_cors_origins_lists_origins_or_a_star(value: str, origins):
    assert app.cors_origins({"CORS_ORIGINS": value}) == origins
    assert app.cors_origins({}) is None


@pytest.mark.parametrize(
    "value",
    [
        "http://localhost:3000/",  # a browser's Origin never ends in a slash
        "localhost:3000",  # no scheme
        "https://app.example.com/path",
        "HTTP://LOCALHOST:3000",  # browsers send origins in lower case
        "https://app.example.com:443",  # ... and leave out the default port
        "*, http://localhost:3000",
        "null",
    ],
)
def test_a_cors_origins_entry_no_browser_would_send_is_a_503_naming_the_variable(client_with, value: str):
    """Such an entry would match nothing and fail only in a browser's console; instead every
    request but /healthz says what to fix."""
    with pytest.raises(db.ConfigError, match="CORS_ORIGINS"):
        app.cors_origins({"CORS_ORIGINS": value})
    client = client_with(CORS_ORIGINS=value)
    for path in ("/todos", "/readyz", "/openapi.json"):
        response = client.get(path, headers={"Origin": "http://localhost:3000"})
        assert response.status_code == 503 and response.headers["content-type"] == app.PROBLEM_JSON
        assert response.json()["detail"].startswith("configuration error: CORS_ORIGINS: ")
    assert client.get("/healthz").status_code == 200
