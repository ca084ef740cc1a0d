"""Under a route prefix, end to end: the URLs the service hands out lead back to it.

Two real servers, each with the prefix /api:
- Vercel's runtime (`vercel_runtime.vc_init`, as Vercel Services runs a backend beside a
  Next.js frontend) with VERCEL_SERVICE_ROUTE_PREFIX=/api and VERCEL_SERVICE_ROUTE_PREFIX_STRIP=1:
  the runtime strips /api from the path and puts it in root_path. On the builder's runtime and
  the newest, on Hive's mode too (standins/vercel_harness.py: RUNTIME_VARIANTS).
- `uvicorn app:app --root-path /api` behind a proxy that strips /api (standins/prefix_proxy.py):
  uvicorn puts the prefix back into the path and root_path.

Through each: POST /api/todos answers Location /api/todos/{id} and a GET on exactly that is the
todo; the next-page Link is /api/todos?… and following it gives the next page; /api/openapi.json
names /api as its server and schemathesis, reading it, finds nothing wrong; problem responses
and X-Request-ID are what they are without a prefix; and a request without the prefix is
answered as it always was. The URL logic itself, in process: test_route_prefix.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from standins.prefix_proxy import StrippingProxy
from standins.vercel_harness import RUNTIME_VARIANTS, VercelRuntime
from support import LiveServer, clean_environment

pytestmark = pytest.mark.slow  # real servers, and schemathesis against each

PREFIX = "/api"
TOKEN = "prefix-token-0123456789"
PROBLEM = "application/problem+json"
AUTHORIZED = {"Authorization": f"Bearer {TOKEN}"}


def urls_lead_back(client: httpx.Client, prefix: str) -> None:
    """Every URL handed out carries `prefix` once and leads where it says."""
    created = []
    for title in ("one", "two", "three"):
        response = client.post(f"{prefix}/todos", json={"title": title})
        assert response.status_code == 201, response.text
        todo = response.json()
        assert response.headers["location"] == f"{prefix}/todos/{todo['id']}"
        again = client.get(response.headers["location"])
        assert again.status_code == 200 and again.json() == todo
        created.append(todo)

    first = client.get(f"{prefix}/todos", params={"limit": 2})
    assert first.status_code == 200 and first.json() == created[:0:-1]
    link = first.headers["link"]
    assert re.fullmatch(rf'<{prefix}/todos\?limit=2&cursor=[^>]+>; rel="next"', link), link
    second = client.get(link[1 : link.index(">")])
    assert second.status_code == 200 and second.json()[0] == created[0]

    document = client.get(f"{prefix}/openapi.json").json()
    if prefix:
        assert document["servers"] == [{"url": prefix}]
    else:
        assert "servers" not in document
    assert "/todos" in document["paths"] and f"{PREFIX}/todos" not in document["paths"]  # relative to servers

    missing = uuid.uuid4()
    absent = client.get(f"{prefix}/todos/{missing}", headers={"X-Request-ID": "prefix-e2e-1"})
    assert absent.status_code == 404 and absent.headers["content-type"] == PROBLEM
    assert absent.headers["x-request-id"] == "prefix-e2e-1"
    assert absent.json() == {
        "type": "about:blank",
        "title": "Not Found",
        "status": 404,
        "detail": f"no todo with id {missing}",
    }
    refused = client.get(f"{prefix}/todos", headers={"Authorization": "Bearer wrong"})
    assert refused.status_code == 401 and refused.headers["content-type"] == PROBLEM


def schemathesis_passes(document_url: str, tmp_path: Path) -> None:
    """schemathesis reads the document at `document_url` (its `servers` says where the API is)
    and finds no 5xx and no response off the document."""
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", document_url,
        "--checks", "all", "--header", f"Authorization: Bearer {TOKEN}",
        "--max-examples", "5", "--generation-deterministic", "--workers", "1",
        "--request-timeout", "15", "--no-color", "--suppress-health-check", "all",
        # Generated requests sent through the prefix, and stateful runs that follow the Location
        # each create hands out; the coverage phase's edge cases vary nothing a prefix changes
        # (test_generated_requests.py runs them without one).
        "--phases", "fuzzing,stateful",
    ]  # fmt: skip
    tests = Path(__file__).parent
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
        "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-20000:]
    assert re.search(r"Tested:\s+7\b", output), output[-3000:]  # every operation, under the prefix


@pytest.mark.parametrize("vercel_runtime", RUNTIME_VARIANTS, indirect=True, ids=str)
def test_through_vercel_runtime_with_a_stripped_route_prefix(
    vercel_runtime, function_python, database_url: str, tmp_path: Path
) -> None:
    env = {
        "DATABASE_URL": database_url,
        "API_TOKEN": TOKEN,
        "LOG_LEVEL": "warning",
        "VERCEL_SERVICE_ROUTE_PREFIX": PREFIX,
        "VERCEL_SERVICE_ROUTE_PREFIX_STRIP": "1",
    }
    with VercelRuntime("app.py", python=str(function_python), env=env, hive=vercel_runtime.hive) as runtime:
        base = f"http://127.0.0.1:{runtime.port}"
        with httpx.Client(base_url=base, headers=AUTHORIZED, timeout=15) as client:
            urls_lead_back(client, PREFIX)
            urls_lead_back(client, "")  # not under the prefix: the runtime leaves it alone
        schemathesis_passes(f"{base}{PREFIX}/openapi.json", tmp_path)
        errors = [log.text for log in runtime.logs if log.level in ("error", "fatal")]
    assert errors == []


def test_under_uvicorn_root_path_behind_a_proxy_that_strips_the_prefix(
    database_url: str, tmp_path: Path
) -> None:
    env = clean_environment(
        DATABASE_URL=database_url, API_TOKEN=TOKEN, LOG_LEVEL="warning", UVICORN_ROOT_PATH=PREFIX
    )
    with (
        LiveServer(env, uvicorn_cli=True) as server,
        StrippingProxy(server.port, PREFIX) as proxy,
        httpx.Client(base_url=proxy.url, headers=AUTHORIZED, timeout=15) as client,
    ):
        urls_lead_back(client, PREFIX)
        assert ("POST", "/todos") in proxy.forwarded  # the backend was sent the stripped path
        schemathesis_passes(f"{proxy.url}{PREFIX}/openapi.json", tmp_path)
        errors = [entry for entry in server.logs() if entry["level"] in ("error", "critical")]
    assert errors == []
