"""401, 503 and 500: the service refusing, each case with the settings that cause it.

Each test serves the app in this process (`InProcess`) with exactly its own environment: a
bearer token, a database nobody listens on, a configuration that cannot work, a schema that
vanishes under a running service.
"""

from __future__ import annotations

import uuid

import pytest

from support import (
    InProcess,
    assert_problem,
    clean_environment,
    create_database,
    drop_database,
    free_port,
    run_sql,
)


def test_bearer_token_guards_todos_only(embedded_database: str):
    env = clean_environment(DATABASE_URL=embedded_database, API_TOKEN="s3cret-token-value")
    with InProcess(env) as client:
        for request in (
            client.get("/todos"),
            client.post("/todos", json={"title": "x"}),
            client.get("/todos", headers={"Authorization": "Bearer wrong"}),
            client.get("/todos", headers={"Authorization": "Basic s3cret-token-value"}),
            client.delete(f"/todos/{uuid.uuid4()}"),
        ):
            assert_problem(request, 401)
            assert request.headers["www-authenticate"].startswith("Bearer")
        auth = {"Authorization": "Bearer s3cret-token-value"}
        assert client.get("/todos", headers=auth).status_code == 200
        assert client.post("/todos", json={"title": "x"}, headers=auth).status_code == 201
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 200 and "s3cret-token-value" not in ready.text
        assert "s3cret-token-value" not in client.logs_text()


def test_unreachable_database_is_503_with_retry_after_quickly():
    closed_port = free_port()
    env = clean_environment(
        DATABASE_URL=f"postgresql://postgres:hunter2-password@127.0.0.1:{closed_port}/postgres"
    )
    with InProcess(env) as client:
        assert client.get("/healthz").status_code == 200  # never touches the database
        for response in (
            client.get("/todos"),
            client.post("/todos", json={"title": "x"}),
            client.get("/readyz"),
        ):
            assert response.status_code == 503, response.text
            assert int(response.headers["retry-after"]) > 0
            assert response.elapsed.total_seconds() < 10
        assert_problem(client.get("/todos"), 503)
        assert client.get("/readyz").json()["database"] == "unreachable"
        assert "hunter2-password" not in client.logs_text()


@pytest.mark.parametrize(
    "variable, value",
    [
        ("DB_AUTH", "kerberos"),
        ("DB_TOKEN_TTL", "3600"),
        ("DB_POOL_MAX", "lots"),
    ],
)
def test_configuration_that_cannot_work_is_503_naming_the_variable(embedded_database: str, variable, value):
    env = clean_environment(DATABASE_URL=embedded_database, **{variable: value})
    with InProcess(env) as client:
        body = assert_problem(client.get("/todos"), 503, variable)
        assert "configuration" in body["detail"]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and variable in ready.json()["detail"]


def test_iam_without_host_is_503_naming_pghost():
    env = clean_environment(DATABASE_URL="postgresql://u@/db", DB_AUTH="iam")
    with InProcess(env) as client:
        assert_problem(client.get("/todos"), 503, "PGHOST")


def test_unexpected_error_is_500_with_request_id_and_no_traceback(embedded_postgres: str):
    url = create_database(embedded_postgres)
    try:
        with InProcess(clean_environment(DATABASE_URL=url)) as client:
            assert client.get("/todos").status_code == 200
            run_sql(url, "DROP TABLE todos")  # the schema vanishes under a running service
            response = client.get("/todos", headers={"X-Request-ID": "req-500-check"})
            body = assert_problem(response, 500)
            assert "req-500-check" in body["detail"] and response.headers["x-request-id"] == "req-500-check"
            errors = [e for e in client.logs() if e["level"] == "error"]
            assert errors and errors[0]["error_type"] == "UndefinedTableError"
            assert errors[0]["request_id"] == "req-500-check"
    finally:
        drop_database(embedded_postgres, url)
