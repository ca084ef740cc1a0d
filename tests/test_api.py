"""The SPEC's HTTP API and error tables, row by row, against the service as a real process."""

from __future__ import annotations

import concurrent.futures
import re
import uuid
from datetime import datetime

import httpx
import pytest

from dsql_support import BACKENDS
from support import LiveServer, clean_environment, free_port, run_sql

# Every test of the module's server runs on PostgreSQL, then on DSQL (the stand-in) as admin
# and as a role in its own schema, with optimistic-concurrency failures injected.
pytestmark = pytest.mark.parametrize("backend", BACKENDS, indirect=True, scope="module")

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def http(server: LiveServer):
    with httpx.Client(base_url=server.url, timeout=15) as client:
        yield client


@pytest.fixture
def empty(http: httpx.Client, database_url: str) -> httpx.Client:
    """The client, on a database with no todos."""
    http.get("/healthz")
    run_sql(database_url, "DELETE FROM todos") if _table_exists(database_url) else None
    return http


def _table_exists(url: str) -> bool:
    return bool(run_sql(url, "SELECT to_regclass('todos') IS NOT NULL")[0][0])


def create(http: httpx.Client, title: str, **fields) -> dict:
    response = http.post("/todos", json={"title": title, **fields})
    assert response.status_code == 201, response.text
    return response.json()


def assert_problem(response: httpx.Response, status: int, field: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["type"] == "about:blank" and body["title"]
    if field is not None:
        assert field in body["detail"], body
    assert "Traceback" not in response.text
    return body


# --- routes ------------------------------------------------------------------------------

def test_create_returns_the_todo_with_location(http: httpx.Client):
    response = http.post("/todos", json={"title": "  buy milk \n"})
    assert response.status_code == 201
    todo = response.json()
    assert set(todo) == {"id", "title", "completed", "created_at", "updated_at"}
    assert todo["title"] == "buy milk" and todo["completed"] is False
    assert response.headers["location"] == f"/todos/{todo['id']}"
    uuid.UUID(todo["id"])
    assert todo["created_at"].endswith("Z") and todo["created_at"] == todo["updated_at"]
    assert http.get(response.headers["location"]).json() == todo


def test_create_completed(http: httpx.Client):
    assert create(http, "done already", completed=True)["completed"] is True


def test_get_patch_delete(http: httpx.Client):
    todo = create(http, "walk the dog")
    got = http.get(f"/todos/{todo['id']}")
    assert got.status_code == 200 and got.json() == todo

    patched = http.patch(f"/todos/{todo['id']}", json={"completed": True})
    assert patched.status_code == 200
    body = patched.json()
    assert body["completed"] is True and body["title"] == "walk the dog"
    assert datetime.fromisoformat(body["updated_at"]) > datetime.fromisoformat(todo["updated_at"])
    assert body["created_at"] == todo["created_at"]

    renamed = http.patch(f"/todos/{todo['id']}", json={"title": " walk the cat "}).json()
    assert renamed["title"] == "walk the cat" and renamed["completed"] is True

    deleted = http.delete(f"/todos/{todo['id']}")
    assert deleted.status_code == 204 and deleted.content == b""
    assert_problem(http.get(f"/todos/{todo['id']}"), 404)
    assert_problem(http.delete(f"/todos/{todo['id']}"), 404)
    assert_problem(http.patch(f"/todos/{todo['id']}", json={"completed": False}), 404)


def test_list_newest_first_with_limit_and_filter(empty: httpx.Client):
    made = [create(empty, f"todo {i}", completed=i % 3 == 0) for i in range(7)]
    listed = empty.get("/todos")
    assert listed.status_code == 200 and listed.headers["content-type"] == "application/json"
    assert [t["id"] for t in listed.json()] == [t["id"] for t in reversed(made)]
    assert "link" not in listed.headers

    assert [t["title"] for t in empty.get("/todos", params={"limit": 2}).json()] == ["todo 6", "todo 5"]
    done = empty.get("/todos", params={"completed": "true"}).json()
    assert [t["title"] for t in done] == ["todo 6", "todo 3", "todo 0"]
    assert all(not t["completed"] for t in empty.get("/todos", params={"completed": "false"}).json())


def test_default_limit_is_50(empty: httpx.Client, database_url: str):
    run_sql(database_url, """
        INSERT INTO todos (id, title, completed, created_at, updated_at)
        SELECT gen_random_uuid(), 'bulk ' || i, false, now() - i * interval '1 second', now()
        FROM generate_series(1, 60) AS i""")
    page = empty.get("/todos")
    assert len(page.json()) == 50 and 'rel="next"' in page.headers["link"]
    assert len(empty.get("/todos", params={"limit": 100}).json()) == 60


def test_pagination_across_250_todos_has_no_duplicate_and_no_gap(empty: httpx.Client, database_url: str):
    # Some share a created_at, so the cursor must break ties on id.
    run_sql(database_url, """
        INSERT INTO todos (id, title, completed, created_at, updated_at)
        SELECT gen_random_uuid(), 'page ' || i, i % 2 = 0,
               timestamptz '2026-01-01' + (i / 3) * interval '1 millisecond', now()
        FROM generate_series(1, 250) AS i""")
    expected = [str(r[0]) for r in run_sql(database_url, "SELECT id FROM todos ORDER BY created_at DESC, id DESC")]
    for completed in (None, "true"):
        seen: list[str] = []
        path, pages = "/todos?limit=17" + (f"&completed={completed}" if completed else ""), 0
        while path:
            response = empty.get(path)
            assert response.status_code == 200
            seen += [t["id"] for t in response.json()]
            if completed:
                assert all(t["completed"] for t in response.json())
            link = response.headers.get("link")
            path = link[link.index("<") + 1:link.index(">")] if link else None
            if link:
                assert link.endswith('; rel="next"') and path.startswith("/todos?")
            pages += 1
        want = expected if completed is None else [
            str(r[0]) for r in run_sql(database_url, "SELECT id FROM todos WHERE completed ORDER BY created_at DESC, id DESC")]
        assert seen == want
        assert len(set(seen)) == len(seen)
        assert pages == -(-len(want) // 17)


def test_legacy_query_string_forms(http: httpx.Client):
    created = http.post("/todos", params={"title": "from the old client"})
    assert created.status_code == 201
    todo = created.json()
    assert todo["title"] == "from the old client" and todo["completed"] is False
    updated = http.patch(f"/todos/{todo['id']}", params={"completed": "true"})
    assert updated.status_code == 200 and updated.json()["completed"] is True
    assert_problem(http.post("/todos"), 422, "title")
    assert_problem(http.post("/todos", params={"title": "   "}), 422, "title")
    assert_problem(http.patch(f"/todos/{todo['id']}", params={"completed": "maybe"}), 422, "completed")


def test_titles_are_stored_verbatim(http: httpx.Client):
    titles = [
        "Robert'); DROP TABLE todos;--",
        "' OR '1'='1",
        "$1 $2 \\x00 %s %(name)s",
        "naïve café — 日本語のタイトル 🦄👩‍💻",
        "right-to-left: עברית",
        "a" * 500,
    ]
    for title in titles:
        todo = create(http, title)
        assert todo["title"] == title
        assert http.get(f"/todos/{todo['id']}").json()["title"] == title
    assert http.get("/todos").status_code == 200


def test_concurrent_creates_and_updates(http: httpx.Client, server: LiveServer):
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        made = list(pool.map(lambda i: create(http, f"parallel {i}"), range(60)))
    assert len({t["id"] for t in made}) == 60
    target = made[0]["id"]
    statuses = list(pool_map(lambda i: http.patch(f"/todos/{target}", json={"title": f"v{i}"}).status_code, range(40)))
    assert statuses == [200] * 40
    final = http.get(f"/todos/{target}").json()
    assert final["title"] in {f"v{i}" for i in range(40)}
    for todo in made:
        assert http.get(f"/todos/{todo['id']}").status_code == 200


def pool_map(function, items):
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        return list(pool.map(function, items))


def test_health_ready_and_openapi(http: httpx.Client, backend: str):
    health = http.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ok" and body["database"] == "reachable"
    assert body["auth"] == ("password" if backend == "postgres" else "dsql")
    assert body["pool"]["max"] >= body["pool"]["size"] >= body["pool"]["idle"] >= 0
    spec = http.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.1")
    assert set(spec["paths"]) == {"/todos", "/todos/{todo_id}", "/healthz", "/readyz", "/openapi.json"}
    assert set(spec["paths"]["/todos"]) == {"get", "post"}
    assert set(spec["paths"]["/todos/{todo_id}"]) == {"get", "patch", "delete"}
    params = {p["name"] for p in spec["paths"]["/todos"]["get"]["parameters"]}
    assert params == {"limit", "completed", "cursor"}
    schemas = spec["components"]["schemas"]
    assert {"Todo", "NewTodo", "TodoChanges", "Problem", "Readiness"} <= set(schemas)
    assert "{0,498}" in schemas["NewTodo"]["properties"]["title"]["pattern"]  # 500 once trimmed
    assert schemas["NewTodo"]["additionalProperties"] is False
    for status in ("400", "413", "415", "422", "503"):
        assert status in spec["paths"]["/todos"]["post"]["responses"]


def test_openapi_document_is_valid_openapi_3_1(http: httpx.Client):
    from openapi_spec_validator import validate

    validate(http.get("/openapi.json").json())


def test_request_id_is_echoed_or_made(http: httpx.Client, server: LiveServer):
    mine = http.get("/healthz", headers={"X-Request-ID": "abc-123.def"})
    assert mine.headers["x-request-id"] == "abc-123.def"
    insane = http.get("/healthz", headers={"X-Request-ID": "no spaces <allowed>"})
    made = insane.headers["x-request-id"]
    assert made != "no spaces <allowed>" and re.fullmatch(r"[A-Za-z0-9._:-]{8,128}", made)
    assert http.get("/healthz").headers["x-request-id"] != made
    assert http.get("/todos/not-a-uuid").headers["x-request-id"]
    lines = server.logs()
    request_lines = [e for e in lines if e.get("message") == "request"]
    assert any(e["request_id"] == "abc-123.def" and e["path"] == "/healthz" and e["status"] == 200
               and e["method"] == "GET" and e["duration_ms"] >= 0 for e in request_lines)


# --- errors ------------------------------------------------------------------------------

def test_malformed_json_is_400(http: httpx.Client):
    response = http.post("/todos", content=b'{"title": "x"', headers={"content-type": "application/json"})
    assert_problem(response, 400)
    todo = create(http, "patch me")
    assert_problem(http.patch(f"/todos/{todo['id']}", content=b"{nope", headers={"content-type": "application/json"}), 400)


@pytest.mark.parametrize("body, field", [
    ({"title": 5}, "title"),
    ({"title": None}, "title"),
    ({"title": "ok", "completed": "yes"}, "completed"),
    ({"title": "ok", "colour": "red"}, "colour"),
    ({"completed": False}, "title"),
    ({"title": ""}, "title"),
    ({"title": "   \t "}, "title"),
    ({"title": "x" * 501}, "title"),
    ({"title": "nul \x00 inside"}, "title"),
    (["title"], "body"),
])
def test_bad_create_bodies_are_422_naming_the_field(http: httpx.Client, body, field):
    assert_problem(http.post("/todos", json=body), 422, field)


@pytest.mark.parametrize("body, field", [
    ({}, "title"),
    ({"title": None}, "title"),
    ({"completed": "true"}, "completed"),
    ({"title": ""}, "title"),
    ({"done": True}, "done"),
])
def test_bad_patch_bodies_are_422_naming_the_field(http: httpx.Client, body, field):
    todo = create(http, "unchanged")
    assert_problem(http.patch(f"/todos/{todo['id']}", json=body), 422, field)
    assert http.get(f"/todos/{todo['id']}").json() == todo


@pytest.mark.parametrize("params, field", [
    ({"limit": "0"}, "limit"), ({"limit": "101"}, "limit"), ({"limit": "ten"}, "limit"),
    ({"limit": "-1"}, "limit"), ({"completed": "perhaps"}, "completed"),
    ({"cursor": "garbage!"}, "cursor"), ({"cursor": "MTIz"}, "cursor"), ({"cursor": "x" * 500}, "cursor"),
])
def test_bad_list_parameters_are_422_naming_the_field(http: httpx.Client, params, field):
    assert_problem(http.get("/todos", params=params), 422, field)


def test_oversized_body_is_413(http: httpx.Client):
    big = b'{"title": "' + b"x" * (70 * 1024) + b'"}'
    assert_problem(http.post("/todos", content=big, headers={"content-type": "application/json"}), 413)

    def chunks():  # no Content-Length: the limit holds while streaming too
        for _ in range(70):
            yield b"x" * 1024
    assert_problem(http.post("/todos", content=chunks(), headers={"content-type": "application/json"}), 413)


def test_non_json_body_is_415(http: httpx.Client):
    assert_problem(http.post("/todos", content=b"title=x", headers={"content-type": "application/x-www-form-urlencoded"}), 415)
    assert_problem(http.post("/todos", content=b'{"title": "x"}', headers={"content-type": "text/plain"}), 415)
    todo = create(http, "x")
    assert_problem(http.patch(f"/todos/{todo['id']}", content=b'{"completed": true}'), 415)


def test_unknown_and_malformed_ids_are_404(http: httpx.Client):
    assert_problem(http.get(f"/todos/{uuid.uuid4()}"), 404)
    for bad in ("42", "not-a-uuid", "5b0c-xyz"):
        assert_problem(http.get(f"/todos/{bad}"), 404)
        assert_problem(http.delete(f"/todos/{bad}"), 404)
        assert_problem(http.patch(f"/todos/{bad}", json={"completed": True}), 404)
    assert_problem(http.get("/no-such-route"), 404)


def test_wrong_method_is_405_with_allow(http: httpx.Client):
    body = assert_problem(http.put("/todos"), 405)
    response = http.put("/todos")
    assert set(response.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "POST"}
    assert "PUT" in body["detail"]
    item = http.post(f"/todos/{uuid.uuid4()}")
    assert_problem(item, 405)
    assert {"GET", "PATCH", "DELETE"} <= set(item.headers["allow"].replace(" ", "").split(","))
    assert_problem(http.post("/healthz"), 405)


def test_bearer_token_guards_todos_only(database_url: str):
    env = clean_environment(DATABASE_URL=database_url, API_TOKEN="s3cret-token-value")
    with LiveServer(env) as live, httpx.Client(base_url=live.url) as client:
        for request in (client.get("/todos"), client.post("/todos", json={"title": "x"}),
                        client.get("/todos", headers={"Authorization": "Bearer wrong"}),
                        client.get("/todos", headers={"Authorization": "Basic s3cret-token-value"}),
                        client.delete(f"/todos/{uuid.uuid4()}")):
            assert_problem(request, 401)
            assert request.headers["www-authenticate"].startswith("Bearer")
        auth = {"Authorization": "Bearer s3cret-token-value"}
        assert client.get("/todos", headers=auth).status_code == 200
        assert client.post("/todos", json={"title": "x"}, headers=auth).status_code == 201
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 200 and "s3cret-token-value" not in ready.text
        assert "s3cret-token-value" not in live.logs_text()


def test_unreachable_database_is_503_with_retry_after_quickly():
    closed_port = free_port()
    env = clean_environment(DATABASE_URL=f"postgresql://postgres:hunter2-password@127.0.0.1:{closed_port}/postgres")
    with LiveServer(env) as live, httpx.Client(base_url=live.url, timeout=15) as client:
        assert client.get("/healthz").status_code == 200  # never touches the database
        for response in (client.get("/todos"), client.post("/todos", json={"title": "x"}), client.get("/readyz")):
            assert response.status_code == 503, response.text
            assert int(response.headers["retry-after"]) > 0
            assert response.elapsed.total_seconds() < 10
        assert_problem(client.get("/todos"), 503)
        assert client.get("/readyz").json()["database"] == "unreachable"
        assert "hunter2-password" not in live.logs_text()


@pytest.mark.parametrize("variable, value", [
    ("DB_AUTH", "kerberos"), ("DB_TOKEN_TTL", "3600"), ("DB_POOL_MAX", "lots"),
])
def test_configuration_that_cannot_work_is_503_naming_the_variable(database_url: str, variable, value):
    env = clean_environment(DATABASE_URL=database_url, **{variable: value})
    with LiveServer(env) as live, httpx.Client(base_url=live.url) as client:
        body = assert_problem(client.get("/todos"), 503, variable)
        assert "configuration" in body["detail"]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and variable in ready.json()["detail"]


def test_iam_without_host_is_503_naming_pghost():
    env = clean_environment(DATABASE_URL="postgresql://u@/db", DB_AUTH="iam")
    with LiveServer(env) as live, httpx.Client(base_url=live.url) as client:
        assert_problem(client.get("/todos"), 503, "PGHOST")


def test_unexpected_error_is_500_with_request_id_and_no_traceback(postgres_url: str):
    from support import create_database, drop_database

    url = create_database(postgres_url)
    try:
        with LiveServer(clean_environment(DATABASE_URL=url)) as live, httpx.Client(base_url=live.url) as client:
            assert client.get("/todos").status_code == 200
            run_sql(url, "DROP TABLE todos")  # the schema vanishes under a running service
            response = client.get("/todos", headers={"X-Request-ID": "req-500-check"})
            body = assert_problem(response, 500)
            assert "req-500-check" in body["detail"] and response.headers["x-request-id"] == "req-500-check"
            errors = [e for e in live.logs() if e["level"] == "error"]
            assert errors and errors[0]["error_type"] == "UndefinedTableError"
            assert errors[0]["request_id"] == "req-500-check"
    finally:
        drop_database(postgres_url, url)
