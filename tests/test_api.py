"""The SPEC's HTTP API and error tables, row by row, with the service in this process.

On the embedded PostgreSQL, through httpx into the ASGI app (`app_client`): what these rows
check does not depend on the server. The todo routes run on every server in
test_todo_routes.py; 401, 503 and 500, each under its own settings, in test_api_refusals.py.
"""

from __future__ import annotations

import re
import uuid

import pytest

from support import InProcess, assert_problem, create_todo


@pytest.fixture(scope="module")
def http(app_client: InProcess) -> InProcess:
    return app_client


# --- routes ------------------------------------------------------------------------------


def test_legacy_query_string_forms(http: InProcess):
    created = http.post("/todos", params={"title": "from the old client"})
    assert created.status_code == 201
    todo = created.json()
    assert todo["title"] == "from the old client" and todo["completed"] is False
    updated = http.patch(f"/todos/{todo['id']}", params={"completed": "true"})
    assert updated.status_code == 200 and updated.json()["completed"] is True
    assert_problem(http.post("/todos"), 422, "title")
    assert_problem(http.post("/todos", params={"title": "   "}), 422, "title")
    assert_problem(http.patch(f"/todos/{todo['id']}", params={"completed": "maybe"}), 422, "completed")


def test_health_ready_and_openapi(http: InProcess):
    health = http.get("/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    ready = http.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ok" and body["database"] == "reachable"
    assert body["auth"] == "password"
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


def test_openapi_document_is_valid_openapi_3_1(http: InProcess):
    from openapi_spec_validator import validate

    validate(http.get("/openapi.json").json())


def test_request_id_is_echoed_or_made(http: InProcess):
    mine = http.get("/healthz", headers={"X-Request-ID": "abc-123.def"})
    assert mine.headers["x-request-id"] == "abc-123.def"
    insane = http.get("/healthz", headers={"X-Request-ID": "no spaces <allowed>"})
    made = insane.headers["x-request-id"]
    assert made != "no spaces <allowed>" and re.fullmatch(r"[A-Za-z0-9._:-]{8,128}", made)
    assert http.get("/healthz").headers["x-request-id"] != made
    assert http.get("/todos/not-a-uuid").headers["x-request-id"]
    lines = http.logs()
    request_lines = [e for e in lines if e.get("message") == "request"]
    assert any(
        e["request_id"] == "abc-123.def"
        and e["path"] == "/healthz"
        and e["status"] == 200
        and e["method"] == "GET"
        and e["duration_ms"] >= 0
        for e in request_lines
    )


# --- errors ------------------------------------------------------------------------------


def test_malformed_json_is_400(http: InProcess):
    response = http.post("/todos", content=b'{"title": "x"', headers={"content-type": "application/json"})
    assert_problem(response, 400)
    todo = create_todo(http, "patch me")
    assert_problem(
        http.patch(f"/todos/{todo['id']}", content=b"{nope", headers={"content-type": "application/json"}),
        400,
    )


@pytest.mark.parametrize(
    "body, field",
    [
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
    ],
)
def test_bad_create_bodies_are_422_naming_the_field(http: InProcess, body, field):
    assert_problem(http.post("/todos", json=body), 422, field)


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "title"),
        ({"title": None}, "title"),
        ({"completed": "true"}, "completed"),
        ({"title": ""}, "title"),
        ({"done": True}, "done"),
    ],
)
def test_bad_patch_bodies_are_422_naming_the_field(http: InProcess, body, field):
    todo = create_todo(http, "unchanged")
    assert_problem(http.patch(f"/todos/{todo['id']}", json=body), 422, field)
    assert http.get(f"/todos/{todo['id']}").json() == todo


@pytest.mark.parametrize(
    "params, field",
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"completed": "perhaps"}, "completed"),
        ({"cursor": "garbage!"}, "cursor"),
        ({"cursor": "MTIz"}, "cursor"),
        ({"cursor": "x" * 500}, "cursor"),
    ],
)
def test_bad_list_parameters_are_422_naming_the_field(http: InProcess, params, field):
    assert_problem(http.get("/todos", params=params), 422, field)


def test_oversized_body_is_413(http: InProcess):
    big = b'{"title": "' + b"x" * (70 * 1024) + b'"}'
    assert_problem(http.post("/todos", content=big, headers={"content-type": "application/json"}), 413)

    def chunks():  # no Content-Length: the limit holds while streaming too
        for _ in range(70):
            yield b"x" * 1024

    assert_problem(http.post("/todos", content=chunks(), headers={"content-type": "application/json"}), 413)


def test_non_json_body_is_415(http: InProcess):
    assert_problem(
        http.post(
            "/todos", content=b"title=x", headers={"content-type": "application/x-www-form-urlencoded"}
        ),
        415,
    )
    assert_problem(
        http.post("/todos", content=b'{"title": "x"}', headers={"content-type": "text/plain"}), 415
    )
    todo = create_todo(http, "x")
    assert_problem(http.patch(f"/todos/{todo['id']}", content=b'{"completed": true}'), 415)


def test_unknown_and_malformed_ids_are_404(http: InProcess):
    assert_problem(http.get(f"/todos/{uuid.uuid4()}"), 404)
    for bad in ("42", "not-a-uuid", "5b0c-xyz"):
        assert_problem(http.get(f"/todos/{bad}"), 404)
        assert_problem(http.delete(f"/todos/{bad}"), 404)
        assert_problem(http.patch(f"/todos/{bad}", json={"completed": True}), 404)
    assert_problem(http.get("/no-such-route"), 404)


def test_wrong_method_is_405_with_allow(http: InProcess):
    body = assert_problem(http.put("/todos"), 405)
    response = http.put("/todos")
    assert set(response.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "POST"}
    assert "PUT" in body["detail"]
    item = http.post(f"/todos/{uuid.uuid4()}")
    assert_problem(item, 405)
    assert {"GET", "PATCH", "DELETE"} <= set(item.headers["allow"].replace(" ", "").split(","))
    assert_problem(http.post("/healthz"), 405)
