"""The todo routes on every server: create, read, update, delete, list newest first, pages.

What the server changes (the SQL, its plans and ties, concurrent writes, DSQL's optimistic
concurrency) runs here on each of dsql_support.SERVERS: the embedded PostgreSQL and the
machine's with the service in this process, then the service as a process behind the DSQL
stand-in, as `admin` and as a role in its own schema, with conflicts injected into writes
(every one met by exactly one retry, counted when the stand-in stops).
"""

from __future__ import annotations

import concurrent.futures
import uuid
from datetime import datetime

import pytest

from dsql_support import SERVERS
from support import Client, assert_problem, create_todo, run_sql

pytestmark = pytest.mark.parametrize("backend", SERVERS, indirect=True, scope="module")


@pytest.fixture
def empty(api: Client, database_url: str) -> Client:
    """The client, on a database with no todos."""
    run_sql(database_url, "DELETE FROM todos")
    return api


# --- routes ------------------------------------------------------------------------------


def test_create_returns_the_todo_with_location(api: Client):
    response = api.post("/todos", json={"title": "  buy milk \n"})
    assert response.status_code == 201
    todo = response.json()
    assert set(todo) == {"id", "title", "completed", "created_at", "updated_at"}
    assert todo["title"] == "buy milk" and todo["completed"] is False
    assert response.headers["location"] == f"/todos/{todo['id']}"
    uuid.UUID(todo["id"])
    assert todo["created_at"].endswith("Z") and todo["created_at"] == todo["updated_at"]
    assert api.get(response.headers["location"]).json() == todo


def test_create_completed(api: Client):
    assert create_todo(api, "done already", completed=True)["completed"] is True


def test_get_patch_delete(api: Client):
    todo = create_todo(api, "walk the dog")
    got = api.get(f"/todos/{todo['id']}")
    assert got.status_code == 200 and got.json() == todo

    patched = api.patch(f"/todos/{todo['id']}", json={"completed": True})
    assert patched.status_code == 200
    body = patched.json()
    assert body["completed"] is True and body["title"] == "walk the dog"
    assert datetime.fromisoformat(body["updated_at"]) > datetime.fromisoformat(todo["updated_at"])
    assert body["created_at"] == todo["created_at"]

    renamed = api.patch(f"/todos/{todo['id']}", json={"title": " walk the cat "}).json()
    assert renamed["title"] == "walk the cat" and renamed["completed"] is True

    deleted = api.delete(f"/todos/{todo['id']}")
    assert deleted.status_code == 204 and deleted.content == b""
    assert_problem(api.get(f"/todos/{todo['id']}"), 404)
    assert_problem(api.delete(f"/todos/{todo['id']}"), 404)
    assert_problem(api.patch(f"/todos/{todo['id']}", json={"completed": False}), 404)


def test_list_newest_first_with_limit_and_filter(empty: Client):
    made = [create_todo(empty, f"todo {i}", completed=i % 3 == 0) for i in range(7)]
    listed = empty.get("/todos")
    assert listed.status_code == 200 and listed.headers["content-type"] == "application/json"
    assert [t["id"] for t in listed.json()] == [t["id"] for t in reversed(made)]
    assert "link" not in listed.headers

    assert [t["title"] for t in empty.get("/todos", params={"limit": 2}).json()] == ["todo 6", "todo 5"]
    done = empty.get("/todos", params={"completed": "true"}).json()
    assert [t["title"] for t in done] == ["todo 6", "todo 3", "todo 0"]
    assert all(not t["completed"] for t in empty.get("/todos", params={"completed": "false"}).json())


def test_default_limit_is_50(empty: Client, database_url: str):
    run_sql(
        database_url,
        """
        INSERT INTO todos (id, title, completed, created_at, updated_at)
        SELECT gen_random_uuid(), 'bulk ' || i, false, now() - i * interval '1 second', now()
        FROM generate_series(1, 60) AS i""",
    )
    page = empty.get("/todos")
    assert len(page.json()) == 50 and 'rel="next"' in page.headers["link"]
    assert len(empty.get("/todos", params={"limit": 100}).json()) == 60


def test_pagination_across_250_todos_has_no_duplicate_and_no_gap(empty: Client, database_url: str):
    # Some share a created_at, so the cursor must break ties on id.
    run_sql(
        database_url,
        """
        INSERT INTO todos (id, title, completed, created_at, updated_at)
        SELECT gen_random_uuid(), 'page ' || i, i % 2 = 0,
               timestamptz '2026-01-01' + (i / 3) * interval '1 millisecond', now()
        FROM generate_series(1, 250) AS i""",
    )
    expected = [
        str(r[0]) for r in run_sql(database_url, "SELECT id FROM todos ORDER BY created_at DESC, id DESC")
    ]
    for completed in (None, "true"):
        seen: list[str] = []
        path: str | None = "/todos?limit=17" + (f"&completed={completed}" if completed else "")
        pages = 0
        while path:
            response = empty.get(path)
            assert response.status_code == 200
            seen += [t["id"] for t in response.json()]
            if completed:
                assert all(t["completed"] for t in response.json())
            link = response.headers.get("link")
            path = None
            if link:
                path = link[link.index("<") + 1 : link.index(">")]
                assert link.endswith('; rel="next"') and path.startswith("/todos?")
            pages += 1
        want = (
            expected
            if completed is None
            else [
                str(r[0])
                for r in run_sql(
                    database_url, "SELECT id FROM todos WHERE completed ORDER BY created_at DESC, id DESC"
                )
            ]
        )
        assert seen == want
        assert len(set(seen)) == len(seen)
        assert pages == -(-len(want) // 17)


def test_titles_are_stored_verbatim(api: Client):
    titles = [
        "Robert'); DROP TABLE todos;--",
        "' OR '1'='1",
        "$1 $2 \\x00 %s %(name)s",
        "naïve café — 日本語のタイトル 🦄👩‍💻",
        "right-to-left: עברית",
        "a" * 500,
    ]
    for title in titles:
        todo = create_todo(api, title)
        assert todo["title"] == title
        assert api.get(f"/todos/{todo['id']}").json()["title"] == title
    assert api.get("/todos").status_code == 200


def test_concurrent_creates_and_updates(api: Client):
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        made = list(pool.map(lambda i: create_todo(api, f"parallel {i}"), range(60)))
    assert len({t["id"] for t in made}) == 60
    target = made[0]["id"]
    statuses = list(
        pool_map(lambda i: api.patch(f"/todos/{target}", json={"title": f"v{i}"}).status_code, range(40))
    )
    assert statuses == [200] * 40
    final = api.get(f"/todos/{target}").json()
    assert final["title"] in {f"v{i}" for i in range(40)}
    for todo in made:
        assert api.get(f"/todos/{todo['id']}").status_code == 200


def test_readyz_reports_the_database_the_auth_mode_and_the_pool(api: Client, backend: str):
    ready = api.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ok" and body["database"] == "reachable"
    assert body["auth"] == ("dsql" if backend.startswith("dsql") else "password")
    assert body["pool"]["max"] >= body["pool"]["size"] >= body["pool"]["idle"] >= 0


def pool_map(function, items):
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        return list(pool.map(function, items))
