"""Generated requests: nothing answers 5xx or off the document.

- schemathesis (against the service as a real process: its command line needs a URL) reads
  the live /openapi.json and sends a few hundred generated requests to
  every operation (valid and invalid ones, plus stateful create → get → patch → delete
  sequences), checking that nothing answers 5xx and every response matches the documented
  status codes, content types, headers and schemas.
- hypothesis (against the service in this process) drives single parameters harder than a
  schema can say: a cursor is a page
  exactly when it has the documented shape, else a 422 (never a 500), any title the database can store
  round-trips exactly, `limit` accepts exactly 1–100, any non-UUID id is a 404, and any body
  that is not JSON is a 415.

Both are deterministic (schemathesis' deterministic mode, hypothesis' `derandomize`), so CI
sees the same cases on every run. The service runs with API_TOKEN set, so schemathesis also
checks that every /todos operation refuses a request without the token.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

from support import InProcess, LiveServer, clean_environment

API_TOKEN = "property-test-token-0123456789"
PROBLEM = "application/problem+json"

# Hypothesis caches Unicode tables on disk: in the temp dir, not as .hypothesis/ in the work tree.
set_hypothesis_home_dir(str(Path(tempfile.gettempdir()) / "aurora-todo-hypothesis"))


def deterministic(examples: int) -> settings:
    """The same cases on every run, nothing written to .hypothesis/, no per-case deadline."""
    return settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


@pytest.fixture(scope="module")
def guarded_server(database_url: str):
    """The service on a fresh database, with API_TOKEN set."""
    env = clean_environment(DATABASE_URL=database_url, API_TOKEN=API_TOKEN, LOG_LEVEL="warning")
    with LiveServer(env) as live:
        yield live


@pytest.fixture(scope="module")
def client(embedded_database: str):
    """The service in this process on a fresh database, with API_TOKEN set and sent."""
    env = clean_environment(DATABASE_URL=embedded_database, API_TOKEN=API_TOKEN, LOG_LEVEL="warning")
    with InProcess(env) as http:
        http.headers["Authorization"] = f"Bearer {API_TOKEN}"
        yield http


def no_server_errors(live: LiveServer | InProcess) -> None:
    errors = [entry for entry in live.logs() if entry["level"] in ("error", "critical")]
    assert errors == [], errors


# --- schemathesis ------------------------------------------------------------------------


@pytest.mark.slow  # a few hundred requests over HTTP to a process
def test_schemathesis_finds_no_5xx_and_no_undocumented_response(guarded_server: LiveServer, tmp_path):
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{guarded_server.url}/openapi.json",
        # Every check, positive_data_acceptance included: the document is as strict as the
        # API (the title's rule, the cursor's shape, PATCH's one field, the body required).
        "--checks",
        "all",
        "--header",
        f"Authorization: Bearer {API_TOKEN}",
        "--max-examples",
        "50",
        "--generation-deterministic",
        "--workers",
        "1",
        "--request-timeout",
        "15",
        "--no-color",
        "--suppress-health-check",
        "all",
    ]
    # The hooks make each generated Idempotency-Key unique: reusing one for another todo is a 422.
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-20000:]
    generated = re.search(r"(\d+) generated", output)
    assert generated and int(generated.group(1)) >= 300, output[-3000:]
    assert re.search(r"Tested:\s+7\b", output), output[-3000:]  # every operation
    no_server_errors(guarded_server)


# --- hypothesis: cursor --------------------------------------------------------------------


def handed_out_shape(text: str) -> bool:
    """Could `text` be a cursor this API handed out? (14 hex digits of micros, 32 of the id)"""
    return re.fullmatch(r"[0-9a-f]{46}", text) is not None


hex_digits = st.text("0123456789abcdef", min_size=46, max_size=46)
near_cursors = st.one_of(
    hex_digits,  # any position: a page (possibly empty), never an error
    hex_digits.map(str.upper),
    hex_digits.map(lambda text: text[:-1]),
    hex_digits.map(lambda text: text + "0"),
    st.tuples(hex_digits, st.integers(0, 45), st.sampled_from(list("gG-. \n\x00é="))).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + 1 :]
    ),
    st.uuids().map(lambda u: f"{u.hex[:14]}{u}"),  # the id with dashes
)


@deterministic(250)
@given(cursor=st.text(max_size=150))
def test_any_cursor_the_api_did_not_hand_out_is_422(client: InProcess, cursor: str):
    assume(not handed_out_shape(cursor))
    response = client.get("/todos", params={"cursor": cursor})
    assert response.status_code == 422, (cursor, response.text)
    assert response.headers["content-type"] == PROBLEM
    assert "cursor" in response.json()["detail"]


@deterministic(250)
@given(cursor=near_cursors)
def test_a_cursor_is_a_page_exactly_when_it_has_the_documented_shape(client: InProcess, cursor: str):
    response = client.get("/todos", params={"cursor": cursor, "limit": 2})
    if handed_out_shape(cursor):  # the OpenAPI pattern: any such position is a page
        assert response.status_code == 200 and isinstance(response.json(), list), (cursor, response.text)
    else:
        assert response.status_code == 422 and "cursor" in response.json()["detail"], (cursor, response.text)


def test_real_cursors_still_page(client: InProcess):
    """The properties above would also hold for an API that refused every cursor."""
    for i in range(3):
        assert client.post("/todos", json={"title": f"page {i}"}).status_code == 201
    first = client.get("/todos", params={"limit": 1})
    link = first.headers["link"]
    second = client.get(link[link.index("<") + 1 : link.index(">")])
    assert second.status_code == 200 and second.json()[0]["id"] != first.json()[0]["id"]


# --- hypothesis: titles ---------------------------------------------------------------------

# Every code point: control characters, combining marks, private use, noncharacters, astral
# planes, and now and then a NUL or a lone surrogate, which PostgreSQL text cannot store.
any_character = st.one_of(
    st.characters(codec=None, exclude_categories=["Cs"]),
    st.sampled_from(["\x00", "\ud800", "\udfff", " ", "\u3000", "\u2028", "\ufeff", "\U0010ffff"]),
)
titles = st.one_of(
    st.text(any_character, max_size=40),
    st.text(any_character, min_size=495, max_size=505),  # around the 500-character limit
)


def storable(title: str) -> bool:
    return "\x00" not in title and not any(0xD800 <= ord(c) <= 0xDFFF for c in title)


@deterministic(400)
@given(title=titles)
def test_any_title_the_database_can_store_round_trips_exactly(client: InProcess, title: str):
    # json.dumps escapes a lone surrogate as \udXXX; httpx's encoder would refuse it.
    body = json.dumps({"title": title}).encode()
    created = client.post("/todos", content=body, headers={"content-type": "application/json"})
    valid = storable(title) and 1 <= len(title.strip()) <= 500  # the length counts once trimmed
    if not valid:
        # Lone surrogates are malformed JSON text (400); the rest names the field (422).
        assert created.status_code in (400, 422), (title, created.text)
        assert created.status_code == 400 or "title" in created.json()["detail"]
        return
    assert created.status_code == 201, (title, created.text)
    todo = created.json()
    assert todo["title"] == title.strip()
    fetched = client.get(f"/todos/{todo['id']}")
    assert fetched.status_code == 200 and fetched.json()["title"] == title.strip()
    # and through PATCH, which takes the same titles
    renamed = client.patch(f"/todos/{todo['id']}", content=body, headers={"content-type": "application/json"})
    assert renamed.status_code == 200 and renamed.json()["title"] == title.strip()
    assert client.delete(f"/todos/{todo['id']}").status_code == 204


# --- hypothesis: limit, ids, content types ---------------------------------------------------

limits = st.one_of(
    st.integers(min_value=-5, max_value=120).map(str),
    st.text(st.characters(categories=["Nd", "No", "Nl"]), min_size=1, max_size=3),  # ٣, ², Ⅻ, １０
    st.text(max_size=6),
)


@deterministic(200)
@given(limit=limits)
def test_limit_is_a_whole_number_from_1_to_100(client: InProcess, limit: str):
    response = client.get("/todos", params={"limit": limit})
    if re.fullmatch(r"[0-9]+", limit) and 1 <= int(limit) <= 100:
        assert response.status_code == 200, (limit, response.text)
        assert len(response.json()) <= int(limit)
    else:
        assert response.status_code == 422, (limit, response.text)
        assert "limit" in response.json()["detail"]


@deterministic(150)
@given(
    todo_id=st.one_of(
        st.text(min_size=1, max_size=60),
        st.uuids().map(str),
        st.uuids().map(lambda u: u.hex.upper()),
        st.uuids().map(lambda u: f"{{{u}}}"),
    )
)
def test_any_id_that_names_no_todo_is_404(client: InProcess, todo_id: str):
    assume(todo_id not in (".", "..") and todo_id.strip())
    path = "/todos/" + quote(todo_id, safe="")
    for response in (client.get(path), client.delete(path), client.patch(path, json={"completed": True})):
        assert response.status_code == 404, (todo_id, response.request.method, response.text)
        assert response.headers["content-type"] == PROBLEM


media_types = st.one_of(
    st.from_regex(r"[a-z]{1,11}/[a-z0-9.+-]{1,20}", fullmatch=True),
    st.sampled_from(
        [
            "application/json",
            "APPLICATION/JSON; charset=utf-8",
            "application/merge-patch+json",
            "text/json",
            "application/jsonp",
            "application/json-seq",
            "text/plain",
            "",
            "multipart/form-data; boundary=x",
            "application/x-www-form-urlencoded",
        ]
    ),
)


@deterministic(120)
@given(media_type=media_types)
def test_only_json_bodies_are_read(client: InProcess, media_type: str):
    headers = {"content-type": media_type} if media_type else {}
    response = client.post("/todos", content=b'{"title": "typed"}', headers=headers)
    base = media_type.split(";", 1)[0].strip().lower()
    if base == "application/json" or (base.startswith("application/") and base.endswith("+json")):
        assert response.status_code == 201, (media_type, response.text)
    else:
        assert response.status_code == 415, (media_type, response.text)
        assert response.headers["content-type"] == PROBLEM


def test_no_generated_request_made_the_service_log_an_error(client: InProcess):
    no_server_errors(client)
