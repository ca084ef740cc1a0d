"""API_TOKEN: every /todos route and method refuses a missing or wrong bearer token with 401,
the health and OpenAPI routes stay open, no response or log line holds the token, and the
token is compared in constant time.
"""

from __future__ import annotations

import json
import uuid
from urllib.parse import urlsplit

from support import InProcess, clean_environment


def test_api_token_guards_every_todos_route_and_method(embedded_database: str):
    token = "guard-" + uuid.uuid4().hex
    database_password = "db-pass-" + uuid.uuid4().hex
    # A password PostgreSQL (trust auth) never asks for, but that the service holds.
    parts = urlsplit(embedded_database)
    url = parts._replace(netloc=f"postgres:{database_password}@{parts.netloc.split('@')[-1]}").geturl()
    env = clean_environment(DATABASE_URL=url, API_TOKEN=token)
    with InProcess(env) as client:
        good = {"Authorization": f"Bearer {token}"}
        todo = client.post("/todos", json={"title": "guarded"}, headers=good).json()
        paths = [
            "/todos",
            "/todos/",
            f"/todos/{todo['id']}",
            f"/todos/{uuid.uuid4()}",
            "/todos/not-a-uuid",
            "/todos?limit=1",
        ]
        wrong = [
            {},
            {"Authorization": "Bearer"},
            {"Authorization": f"Bearer {token[:-1]}"},
            {"Authorization": f"Bearer {token}x"},
            {"Authorization": f"Bearer {token.upper()}"},
            {"Authorization": f"Basic {token}"},
            {"Authorization": token},
            {"Authorization": f"Token {token}"},
        ]
        methods = ("GET", "HEAD", "POST", "PATCH", "DELETE", "PUT", "OPTIONS")
        texts = []
        for path in paths:
            for method in methods:
                for headers in wrong:
                    response = client.request(method, path, headers=headers, json={"title": "x"})
                    assert response.status_code == 401, (method, path, headers, response.status_code)
                    assert response.headers["www-authenticate"].startswith("Bearer")
                    texts.append(response.text)
        # None of the refused DELETEs and PATCHes touched the todo; with the token, no 401.
        assert client.get(f"/todos/{todo['id']}", headers=good).json() == todo
        for path in paths:
            for method in methods:
                allowed = client.request(method, path, headers=good, json={"title": "x"})
                assert allowed.status_code != 401, (method, path)
        # The scheme is case-insensitive (RFC 9110); the token is not.
        assert client.get("/todos", headers={"Authorization": f"bearer {token}"}).status_code == 200
        # /healthz, /readyz and /openapi.json stay open and tell no secret.
        for path in ("/healthz", "/readyz", "/openapi.json"):
            response = client.get(path)
            assert response.status_code == 200, path
            texts.append(response.text + json.dumps(dict(response.headers)))
        texts.append(client.logs_text())
        for text in texts:
            assert token not in text and database_password not in text


def test_bearer_token_is_compared_in_constant_time(monkeypatch):
    import app

    compared = []

    def spy(given, expected):
        compared.append((given, expected))
        return given == expected

    monkeypatch.setattr(app.hmac, "compare_digest", spy)
    assert app.bearer_token_ok(b"Bearer constant-time-token", b"constant-time-token")
    assert not app.bearer_token_ok(b"Bearer constant-time-tokem", b"constant-time-token")
    assert len(compared) == 2 and all(expected == b"constant-time-token" for _, expected in compared)
