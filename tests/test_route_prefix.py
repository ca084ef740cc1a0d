"""Under a path prefix (the ASGI root_path), every URL the service hands out carries it once.

In process (httpx's ASGITransport with `root_path`), against a real PostgreSQL, in both ASGI
conventions: the prefix kept in `path` as well (Starlette's own, `uvicorn --root-path`) and
taken out of `path` and `raw_path` (Vercel's runtime with VERCEL_SERVICE_ROUTE_PREFIX_STRIP=1,
played here by `stripped`, which does to the scope what the runtime does). The client only
ever uses the public URLs: the ones it sent first and the ones the service answered with.
The same through the real runtime and a real uvicorn: test_route_prefix_served.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import app
import db

PREFIX = "/api"
PROBLEM = "application/problem+json"
Scenario = Callable[[httpx.AsyncClient], Awaitable[Any]]


def stripped(inner: ASGIApp, prefix: str) -> ASGIApp:
    """The scope as Vercel's runtime hands it over: the prefix moved from path/raw_path to root_path."""

    async def strip(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == prefix or path.startswith(f"{prefix}/")):
            scope = {
                **scope,
                "path": path[len(prefix) :] or "/",
                "raw_path": scope["raw_path"][len(prefix) :] or b"/",
                "root_path": prefix,
            }
        await inner(scope, receive, send)

    return strip


CONVENTIONS = {
    # uvicorn --root-path /api: root_path set, path as requested (prefix included)
    "path keeps the prefix": lambda service: (service, PREFIX),
    # vercel-runtime stripping: the transport's root_path is empty; the runtime sets it
    "prefix stripped from path": lambda service: (stripped(service, PREFIX), ""),
}


def serve(database_url: str, scenario: Scenario, *, convention: str | None, **env: str) -> Any:
    """Run `scenario` with a client of a fresh app on that database, served the given way
    (None: no prefix at all); every database connection is closed afterwards."""

    async def run() -> Any:
        service: ASGIApp = app.TodoApp(routes=app.routes)
        root_path = ""
        if convention is not None:
            service, root_path = CONVENTIONS[convention](service)
        transport = httpx.ASGITransport(app=service, root_path=root_path)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://todo.test") as client:
                return await scenario(client)
        finally:
            await db.close()

    with pytest.MonkeyPatch.context() as patch:
        for name in ("API_TOKEN", "CORS_ORIGINS"):
            patch.delenv(name, raising=False)
        patch.setenv("DATABASE_URL", database_url)
        for name, value in env.items():
            patch.setenv(name, value)
        return asyncio.run(run())


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_location_and_link_carry_the_prefix_once_and_lead_where_they_say(
    embedded_database: str, convention: str
):
    """POST /api/todos answers Location /api/todos/{id}, and a GET on exactly that is the todo;
    the next-page Link is /api/todos?… and following it gives the next page, to the end."""

    async def scenario(client: httpx.AsyncClient) -> None:
        created = []
        for title in ("first", "second", "third"):
            response = await client.post(f"{PREFIX}/todos", json={"title": title})
            assert response.status_code == 201, response.text
            todo = response.json()
            assert response.headers["location"] == f"{PREFIX}/todos/{todo['id']}"
            fetched = await client.get(response.headers["location"])
            assert fetched.status_code == 200 and fetched.json() == todo
            created.append(todo)

        seen: list[dict] = []
        url: str | None = f"{PREFIX}/todos?limit=2"
        while url:
            page = await client.get(url)
            assert page.status_code == 200, page.text
            seen += page.json()
            link = page.headers.get("link")
            url = None
            if link:
                assert link.startswith(f"<{PREFIX}/todos?limit=2&cursor=") and link.endswith('>; rel="next"')
                url = link[1 : link.index(">")]
        assert seen[:3] == created[::-1]  # newest first: the module's earlier todos follow

        # The filter travels in the next link too.
        page = await client.get(f"{PREFIX}/todos", params={"limit": 1, "completed": "false"})
        assert page.headers["link"].startswith(f"<{PREFIX}/todos?limit=1&cursor=")
        assert "&completed=false>" in page.headers["link"]

    serve(embedded_database, scenario, convention=convention)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_openapi_names_the_prefix_as_its_server_and_nothing_else_changes(
    embedded_database: str, convention: str
):
    """/api/openapi.json is the unprefixed document plus `servers: [{"url": "/api"}]` (and the
    Location it describes); its paths stay relative to that server, so the prefix is applied once."""

    async def scenario(client: httpx.AsyncClient) -> bytes:
        response = await client.get(f"{PREFIX}/openapi.json")
        assert response.status_code == 200 and response.headers["content-type"] == "application/json"
        return response.content

    prefixed = json.loads(serve(embedded_database, scenario, convention=convention))
    plain = json.loads(app.openapi_document())
    assert prefixed["servers"] == [{"url": PREFIX}]
    assert list(prefixed)[:3] == ["openapi", "info", "servers"]
    assert (
        set(prefixed["paths"])
        == set(plain["paths"])
        == {
            "/todos",
            "/todos/{todo_id}",
            "/healthz",
            "/readyz",
            "/openapi.json",
        }
    )
    location = prefixed["paths"]["/todos"]["post"]["responses"]["201"]["headers"]["Location"]
    assert location["description"] == f"{PREFIX}/todos/{{id}}"
    del prefixed["servers"]
    location["description"] = "/todos/{id}"
    assert prefixed == plain


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_under_the_prefix_errors_request_ids_and_redirects_are_as_without_it(
    embedded_database: str, convention: str
):
    """Problem responses and X-Request-ID are the same under the prefix; the bearer token guards
    /api/todos; and Starlette's trailing-slash redirect points under the prefix too."""
    missing = "00000000-0000-4000-8000-000000000000"

    def requests(prefix: str) -> Scenario:
        async def scenario(client: httpx.AsyncClient) -> list[httpx.Response]:
            headers = {"X-Request-ID": "prefix-check-1"}
            return [
                await client.get(f"{prefix}/todos/{missing}", headers=headers),
                await client.post(f"{prefix}/todos", json={"title": ""}, headers=headers),
                await client.put(f"{prefix}/todos", headers=headers),
                await client.get(f"{prefix}/todos", headers=headers),
                await client.get(f"{prefix}/healthz", headers=headers),
            ]

        return scenario

    token = {"API_TOKEN": "prefix-token"}
    under = serve(embedded_database, requests(PREFIX), convention=convention, **token)
    plain = serve(embedded_database, requests(""), convention=None, **token)
    for prefixed, unprefixed in zip(under, plain, strict=True):
        assert prefixed.status_code == unprefixed.status_code
        assert prefixed.content == unprefixed.content
        assert prefixed.headers == unprefixed.headers
        assert prefixed.headers["x-request-id"] == "prefix-check-1"
    assert [r.status_code for r in under] == [401, 401, 401, 401, 200]
    assert under[0].headers["content-type"] == PROBLEM

    async def open_scenario(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [
            await client.get(f"{PREFIX}/todos/{missing}"),
            await client.put(f"{PREFIX}/todos"),
            await client.get(f"{PREFIX}/todos/"),
        ]

    not_found, wrong_method, slash = serve(embedded_database, open_scenario, convention=convention)
    assert not_found.status_code == 404 and not_found.headers["content-type"] == PROBLEM
    assert not_found.json() == {
        "type": "about:blank",
        "title": "Not Found",
        "status": 404,
        "detail": f"no todo with id {missing}",
    }
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"]
    assert slash.status_code == 307 and slash.headers["location"] == f"http://todo.test{PREFIX}/todos"


def test_a_trailing_slash_on_the_prefix_is_not_doubled(embedded_database: str):
    """`--root-path /api/` is read as /api: Location is /api/todos/{id}, not /api//todos/…"""

    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app.TodoApp(routes=app.routes), root_path=f"{PREFIX}/")
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://todo.test") as client:
                return await client.post(f"{PREFIX}/todos", json={"title": "slash"})
        finally:
            await db.close()

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DATABASE_URL", embedded_database)
        response = asyncio.run(run())
    assert response.status_code == 201
    assert response.headers["location"] == f"{PREFIX}/todos/{response.json()['id']}"


def test_without_a_prefix_urls_and_the_document_are_what_they_always_were(embedded_database: str):
    """No root_path: Location /todos/{id}, Link </todos?…>, an OpenAPI document with no
    `servers`; and the router is handed the very scope the server passed (no copy)."""
    seen: list[Scope] = []

    async def recording(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def scenario(client: httpx.AsyncClient) -> tuple[httpx.Response, ...]:
        first = await client.post("/todos", json={"title": "one"})
        await client.post("/todos", json={"title": "two"})
        return first, await client.get("/todos?limit=1"), await client.get("/openapi.json")

    created, page, document = serve(embedded_database, scenario, convention=None)
    assert created.headers["location"] == f"/todos/{created.json()['id']}"
    assert page.headers["link"].startswith("</todos?limit=1&cursor=")
    assert document.content == app.openapi_document() and b'"servers"' not in document.content

    stack = app.RequestContext(recording)
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/healthz",
        "root_path": "",
        "headers": [],
        "query_string": b"",
    }

    async def call() -> None:
        async def receive() -> Message:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Message) -> None:
            pass

        await stack(scope, receive, send)

    asyncio.run(call())
    assert seen == [scope] and seen[0] is scope


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_under_the_prefix_a_configuration_that_cannot_work_leaves_healthz_open(
    embedded_database: str, convention: str
):
    """/api/healthz answers 200 (the process is alive) and /api/todos the 503 naming the
    variable, as /healthz and /todos do without a prefix."""

    async def scenario(client: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response]:
        return await client.get(f"{PREFIX}/healthz"), await client.get(f"{PREFIX}/todos")

    health, todos = serve(
        embedded_database, scenario, convention=convention, CORS_ORIGINS="https://a.example/"
    )
    assert health.status_code == 200
    assert todos.status_code == 503 and todos.headers["content-type"] == PROBLEM
    assert "CORS_ORIGINS" in todos.json()["detail"]
