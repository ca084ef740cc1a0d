"""The same Idempotency-Key and the same todo store one todo, on every server.

Repeated, sent 20 times at once, spelled otherwise, after a PATCH or a DELETE: on each of
dsql_support.SERVERS (the embedded PostgreSQL and the machine's, then DSQL's stand-in as
`admin` and as a role, with optimistic-concurrency conflicts injected into writes), because
what makes a keyed create safe is the database's `ON CONFLICT (id) DO NOTHING` under
concurrency. Every test counts rows in the database, not just statuses. The header's rules
and retries after a lost reply are in test_idempotency.py.
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any

import pytest

from dsql_support import SERVERS
from idempotency_support import assert_key_problem, count, key, rows_titled
from support import Client, Response

pytestmark = pytest.mark.parametrize("backend", SERVERS, indirect=True, scope="module")


@pytest.fixture(scope="module")
def http(api: Client) -> Client:
    return api


# --- the same key, the same todo ----------------------------------------------------------


def test_repeated_creates_with_one_key_store_one_todo(http, database_url):
    headers = {"Idempotency-Key": key()}
    first = http.post("/todos", json={"title": "pay rent"}, headers=headers)
    assert first.status_code == 201, first.text
    todo = first.json()
    for _ in range(4):
        again = http.post("/todos", json={"title": "pay rent"}, headers=headers)
        assert again.status_code == 201
        assert again.json() == todo and again.headers["location"] == f"/todos/{todo['id']}"
    assert rows_titled(database_url, "pay rent") == 1
    # Without a key, the same body is a new todo each time.
    for _ in range(2):
        assert http.post("/todos", json={"title": "pay rent"}).status_code == 201
    assert rows_titled(database_url, "pay rent") == 3


def test_the_same_fields_in_another_spelling_are_the_same_request(http, database_url):
    """Sameness is judged on the todo the request asks for: trimmed title, completed."""
    headers = {"Idempotency-Key": key()}
    todo = http.post("/todos", json={"title": "water plants"}, headers=headers).json()
    same: list[dict[str, Any]] = [
        dict(json={"title": "  water plants\n"}),
        dict(json={"completed": False, "title": "water plants"}),
        dict(params={"title": "water plants"}),
        dict(params={"title": "water plants", "completed": "false"}),
    ]
    for spelling in same:
        response = http.post("/todos", headers=headers, **spelling)
        assert response.status_code == 201 and response.json() == todo, (spelling, response.text)
    assert rows_titled(database_url, "water plants") == 1


def test_twenty_concurrent_creates_with_one_key_store_one_todo(http, database_url):
    headers = {"Idempotency-Key": key()}
    barrier = threading.Barrier(20)

    def create(_: int) -> Response:
        barrier.wait(10)
        return http.post("/todos", json={"title": "concurrent once"}, headers=headers)

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(create, range(20)))
    assert [r.status_code for r in responses] == [201] * 20, [
        r.text for r in responses if r.status_code != 201
    ]
    assert len({r.text for r in responses}) == 1  # the very same todo, timestamps included
    assert rows_titled(database_url, "concurrent once") == 1


# --- the same key, another todo; malformed keys ---------------------------------------------


def test_one_key_with_different_fields_is_422_and_changes_nothing(http, database_url):
    headers = {"Idempotency-Key": key()}
    todo = http.post("/todos", json={"title": "feed cat"}, headers=headers).json()
    for other in ({"title": "feed dog"}, {"title": "feed cat", "completed": True}):
        assert_key_problem(http.post("/todos", json=other, headers=headers))
    assert_key_problem(http.post("/todos", params={"title": "feed dog"}, headers=headers))
    assert http.get(f"/todos/{todo['id']}").json() == todo
    assert rows_titled(database_url, "feed cat") == 1 and rows_titled(database_url, "feed dog") == 0


def test_keys_at_the_limits_are_accepted_and_a_repeated_header_is_refused(http, database_url):
    for good in ("k", "~" * 255, "with inner spaces", '"a-quoted-sf-string"', key()):
        response = http.post(
            "/todos", json={"title": f"limit {len(good)}"}, headers={"Idempotency-Key": good}
        )
        assert response.status_code == 201, (good, response.text)
    before = count(database_url)
    twice = http.post(
        "/todos", json={"title": "twice"}, headers=[("Idempotency-Key", "one"), ("Idempotency-Key", "two")]
    )
    assert_key_problem(twice)
    assert count(database_url) == before


# --- what deriving the id from the key implies ------------------------------------------------


def test_after_a_patch_a_retry_answers_the_todo_as_it_is_now(http, database_url):
    headers = {"Idempotency-Key": key()}
    todo = http.post("/todos", json={"title": "draft"}, headers=headers).json()
    patched = http.patch(f"/todos/{todo['id']}", json={"completed": True}).json()
    retry = http.post("/todos", json={"title": "draft"}, headers=headers)
    assert retry.status_code == 201 and retry.json() == patched
    assert rows_titled(database_url, "draft") == 1


def test_after_a_delete_the_same_key_creates_the_todo_again(http, database_url):
    headers = {"Idempotency-Key": key()}
    todo = http.post("/todos", json={"title": "phoenix"}, headers=headers).json()
    assert http.delete(f"/todos/{todo['id']}").status_code == 204
    again = http.post("/todos", json={"title": "phoenix"}, headers=headers)
    assert again.status_code == 201 and again.json()["id"] == todo["id"]
    assert rows_titled(database_url, "phoenix") == 1
