"""A full IAM session (moto STS, the Aurora stand-in), every error the API has included: each
request logs exactly one line, and no log line or response holds any secret the session
handled (OIDC token, API token, database tokens, STS keys).
"""

from __future__ import annotations

import json
import time
import uuid

import httpx
import pytest

from support import LiveServer, create_database, drop_database, run_sql

pytestmark = pytest.mark.slow  # a whole IAM session through STS and the Aurora stand-in

JSON = "application/json"
PROBLEM = "application/problem+json"
SUCCESS = {200, 201, 204}


def test_iam_session_logs_every_request_and_leaks_no_secret(fresh_sts, embedded_postgres: str, monkeypatch):
    from iam_support import aurora, iam_environment
    from standins import aurora_gateway

    presented: list[str] = []  # every database token the service presented to "Aurora"
    real_check = aurora_gateway.check_token

    def recording_check(token: str, **kwargs):
        presented.append(token)
        return real_check(token, **kwargs)

    monkeypatch.setattr(aurora_gateway, "check_token", recording_check)
    api_token = "session-" + uuid.uuid4().hex
    url = create_database(embedded_postgres)
    sent: list[tuple[str, str, str, httpx.Response]] = []  # (request id, method, path, response)
    try:
        with aurora(url, 900) as gateway:
            env = iam_environment(gateway, fresh_sts, url, 900, API_TOKEN=api_token)
            with LiveServer(env) as live, httpx.Client(base_url=live.url, timeout=15) as client:
                auth = {"Authorization": f"Bearer {api_token}"}

                def call(method: str, path: str, expected: int, *, headers=None, **kwargs) -> httpx.Response:
                    request_id = f"session-{len(sent)}"
                    response = client.request(
                        method,
                        path,
                        headers={"X-Request-ID": request_id, **auth, **(headers or {})},
                        **kwargs,
                    )
                    assert response.status_code == expected, (method, path, response.text)
                    sent.append((request_id, method, path.split("?")[0], response))
                    return response

                # CRUD
                call("GET", "/readyz", 200)
                todo = call("POST", "/todos", 201, json={"title": "session"}).json()
                item = f"/todos/{todo['id']}"
                call("GET", item, 200)
                call("PATCH", item, 200, json={"completed": True})
                call("GET", "/todos?limit=5", 200)
                call("DELETE", item, 204)
                # every error the API has
                call("GET", "/todos", 401, headers={"Authorization": f"Bearer {env['VERCEL_OIDC_TOKEN']}"})
                call("POST", "/todos", 400, content=b"{oops", headers={"Content-Type": JSON})
                call("POST", "/todos", 422, json={"title": ""})
                call("GET", "/todos?cursor=nope", 422)
                call("GET", item, 404)
                call("PUT", "/todos", 405)
                call("POST", "/todos", 413, content=b"x" * (70 * 1024), headers={"Content-Type": JSON})
                call("POST", "/todos", 415, content=b"title=x", headers={"Content-Type": "text/plain"})
                # the database gone (503), /readyz saying so, and back
                gateway.pause()
                call("GET", "/todos", 503)
                call("POST", "/todos", 503, json={"title": "lost"})
                call("GET", "/readyz", 503)
                gateway.resume()
                deadline = time.monotonic() + 20
                while client.get("/todos", headers=auth).status_code != 200:
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
                call("GET", "/readyz", 200)
                # and an unexpected error (500)
                run_sql(url, "DROP TABLE todos")
                call("GET", "/todos", 500)
            logs_text = live.logs_text()
            entries = live.logs()  # every line parses as one JSON object

        # Each request: exactly one log line with its id, method, path, status and duration.
        for request_id, method, path, response in sent:
            assert response.headers["x-request-id"] == request_id
            lines = [e for e in entries if e.get("request_id") == request_id and e["message"] == "request"]
            assert len(lines) == 1, (request_id, lines)
            line = lines[0]
            assert (line["method"], line["path"], line["status"]) == (method, path, response.status_code)
            assert isinstance(line["duration_ms"], (int, float)) and line["duration_ms"] >= 0
        # Errors carry the exception type.
        problems = [
            e
            for e in entries
            if e["level"] in ("warning", "error") and e.get("request_id", "").startswith("session-")
        ]
        assert any(e["level"] == "error" and e["error_type"] == "UndefinedTableError" for e in problems), (
            problems
        )
        assert all(e.get("error_type") for e in problems if e["message"] == "database unavailable")
        assert any(e["message"] == "database unavailable" for e in problems)

        secrets = {
            "OIDC token": [env["VERCEL_OIDC_TOKEN"]],
            "API token": [api_token],
            "database token": presented,
            "STS secret key or session token": fresh_sts.secrets(),
        }
        assert len(presented) >= 2 and len(fresh_sts.secrets()) >= 2, "the session handled no secret"
        texts = [logs_text] + [response.text + json.dumps(dict(response.headers)) for *_, response in sent]
        for text in texts:
            for kind, values in secrets.items():
                for value in values:
                    assert value not in text, f"{kind} leaked"
            for shape in ("X-Amz-Signature", "X-Amz-Security-Token", "Amz-Credential", "Action=connect"):
                assert shape not in text
    finally:
        drop_database(embedded_postgres, url)
