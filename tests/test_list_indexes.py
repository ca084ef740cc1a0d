"""Every list query stays on an index at any size and under any plan; indexes reach old tables.

- On a table of 200,000 todos, 100 of them open, each shape of list (unfiltered,
  completed=true, completed=false; a first page and the page after its cursor) runs as the
  service runs it (its statement and arguments, an asyncpg prepared statement) under custom
  and generic plans, and its plan (EXPLAIN of the prepared statement) is an index scan that
  reads one page and little else: no sequential scan, no sort.
- A table made before an index existed gets it on the service's first use and from
  `python db.py migrate`, once; on Aurora DSQL (the stand-in) as `CREATE INDEX ASYNC`, and
  every list answers through it.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import datetime
from typing import Any

import asyncpg
import httpx
import pytest

import db
from dsql_support import dsql_environment, dsql_stand_in
from standins.sts import Sts
from support import (
    Client,
    InProcess,
    LiveServer,
    clean_environment,
    create_database,
    drop_database,
    migrate,
    run_sql,
)

TOTAL, OPEN = 200_000, 100
PAGE = 50  # the service asks for one row more than it shows: that row tells a next page exists
INDEXES = ("todos_newest_first", "todos_by_completed")
PLAN_MODES = ("force_custom_plan", "force_generic_plan")


def seed(total: int) -> str:
    """`total` todos a second apart; of the newest 1,000, every tenth is open (100 open). Ids
    ascend with the row, so that the primary key's index is appended to: seconds, not tens."""
    return f"""
    INSERT INTO todos (id, title, completed, created_at, updated_at)
    SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, 'todo number ' || i,
           NOT (i > {total} - 1000 AND i % 10 = 0), t, t
    FROM generate_series(1, {total}) AS i,
         LATERAL (SELECT timestamptz '2026-01-01' + i * interval '1 second') AS s(t)
    """


def literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, datetime):
        return f"'{value.isoformat()}'::timestamptz"
    if isinstance(value, uuid.UUID):
        return f"'{value}'::uuid"
    raise TypeError(value)


async def explain_prepared(connection: asyncpg.Connection, statement: str, *args: Any) -> dict:
    """EXPLAIN ANALYZE of `statement` prepared as a named statement, executed with `args`.

    PREPARE and EXECUTE go through the same plan cache as asyncpg's protocol-level prepared
    statements (parameter types inferred the same way), so plan_cache_mode decides the same.
    """
    await connection.execute(f"PREPARE list_plan AS {statement}")
    try:
        arguments = ", ".join(literal(a) for a in args)
        text = await connection.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE list_plan({arguments})")
    finally:
        await connection.execute("DEALLOCATE list_plan")
    return json.loads(text)[0]["Plan"]


def nodes(plan: dict) -> list[dict]:
    return [plan, *(node for child in plan.get("Plans", []) for node in nodes(child))]


def plan_problems(plan: dict, *, generic: bool, filtered: bool) -> list[str]:
    """What is wrong with a list's plan: empty when it reads one page from one of our indexes."""
    problems = []
    kinds = [node["Node Type"] for node in nodes(plan)]
    if {"Seq Scan", "Sort", "Incremental Sort", "Bitmap Heap Scan"} & set(kinds):
        problems.append(f"plan has {kinds}")
    scans = [node for node in nodes(plan) if node["Node Type"] in ("Index Scan", "Index Only Scan")]
    if len(scans) != 1 or scans[0]["Index Name"] not in INDEXES:
        return [*problems, f"no scan of {INDEXES}: {kinds}"]
    scan = scans[0]
    # Read: the rows returned plus the rows the scan threw away. Bounded by one page and the
    # open todos between, whatever the table's size.
    read = scan["Actual Rows"] + scan.get("Rows Removed by Filter", 0)
    if read > PAGE + 1 + OPEN:
        problems.append(f"{scan['Index Name']} read {read} rows")
    if generic and filtered and "$2" not in scan.get("Index Cond", ""):
        # A generic plan filtered by a parameter: the index must seek to it, not filter after.
        problems.append(f"generic plan does not seek by completed: {scan}")
    return problems


def page_problems(
    rows: list[asyncpg.Record],
    completed: bool | None,
    after: tuple[datetime, uuid.UUID] | None,
    expected: int,
) -> list[str]:
    keys = [(row["created_at"], row["id"]) for row in rows]
    problems = []
    if len(rows) != expected:
        problems.append(f"{len(rows)} rows, not {expected}")
    if keys != sorted(keys, reverse=True) or len(set(keys)) != len(keys):
        problems.append("not newest first")
    if completed is not None and any(row["completed"] is not completed for row in rows):
        problems.append(f"a row with completed != {completed}")
    if after is not None and any(key >= after for key in keys):
        problems.append("a row at or before the cursor")
    return problems


async def check_every_list(url: str) -> list[str]:
    connection = await asyncpg.connect(url)
    try:
        # A table that grew before its indexes existed, then the service's own schema step.
        await connection.execute(db.CREATE_TABLE)
        await connection.execute(seed(TOTAL))
        assert await db.apply_schema(connection, db.Settings.from_env({"DATABASE_URL": url}))
        await connection.execute("ANALYZE todos")  # as autovacuum does after a bulk insert
        failures = []
        for mode in PLAN_MODES:
            await connection.execute(f"SET plan_cache_mode = {mode}")
            for completed in (None, True, False):
                matching = {None: TOTAL, True: TOTAL - OPEN, False: OPEN}[completed]
                # As the service runs it: its statement and arguments, on asyncpg's cache.
                first = await connection.fetch(*db.list_query(PAGE + 1, completed, None))
                last = first[PAGE - 1]
                after = (last["created_at"], last["id"])
                second = await connection.fetch(*db.list_query(PAGE + 1, completed, after))
                for rows, cursor, expected in (
                    (first, None, PAGE + 1),
                    (second, after, min(PAGE + 1, matching - PAGE)),
                ):
                    shape = f"{mode} completed={completed} {'next page' if cursor else 'first page'}"
                    failures += [f"{shape}: {p}" for p in page_problems(rows, completed, cursor, expected)]
                    plan = await explain_prepared(connection, *db.list_query(PAGE + 1, completed, cursor))
                    failures += [
                        f"{shape}: {p}"
                        for p in plan_problems(
                            plan, generic=mode == "force_generic_plan", filtered=completed is not None
                        )
                    ]
        if connection.get_server_version().major >= 14:
            # asyncpg's own prepared statements did run generic plans (PostgreSQL 14+ counts them).
            generic = await connection.fetch(
                "SELECT statement FROM pg_prepared_statements WHERE generic_plans > 0 AND NOT from_sql"
            )
            used = {row["statement"] for row in generic}
            for statement in (
                db.LIST_FIRST_PAGE,
                db.LIST_NEXT_PAGE,
                db.LIST_FIRST_PAGE_BY_COMPLETED,
                db.LIST_NEXT_PAGE_BY_COMPLETED,
            ):
                if statement not in used:
                    failures.append(f"never ran with a generic plan: {statement.strip()[:80]}")
        return failures
    finally:
        await connection.close()


def test_every_list_query_reads_one_page_from_an_index_under_custom_and_generic_plans(postgres_url: str):
    url = create_database(postgres_url)
    try:
        assert asyncio.run(check_every_list(url)) == []
    finally:
        drop_database(postgres_url, url)


# --- an existing deployment gets the new index ------------------------------------------


def old_schema(url: str, total: int) -> None:
    """The table as an earlier version made it: one index, no todos_by_completed; rows in it."""
    run_sql(url, db.CREATE_TABLE, db.CREATE_INDEXES[0], seed(total))


def indexes_of(url: str, schema: str = "public") -> set[str]:
    rows = run_sql(
        url, f"SELECT indexname FROM pg_indexes WHERE schemaname = '{schema}' AND tablename = 'todos'"
    )
    return {row[0] for row in rows} - {"todos_pkey"}


def list_every_shape(client: Client) -> None:
    """Each filter, and the page after each first page, through the service."""
    for query in ("", "&completed=true", "&completed=false"):
        first = client.get(f"/todos?limit={PAGE}{query}")
        assert first.status_code == 200, first.text
        assert len(first.json()) == PAGE and "next" in first.headers["link"]
        link = first.headers["link"].split(";")[0].strip("<>")
        second = client.get(link)
        assert second.status_code == 200, second.text
        assert second.json() and second.json()[0]["created_at"] <= first.json()[-1]["created_at"]


def test_an_existing_table_gets_the_new_index_on_first_use_once(postgres_url: str):
    url = create_database(postgres_url)
    try:
        old_schema(url, 2_000)
        assert indexes_of(url) == {"todos_newest_first"}
        env = clean_environment(DATABASE_URL=url)
        with InProcess(env) as client:
            list_every_shape(client)
            assert [e["message"] for e in client.logs()].count("schema applied") == 1
        assert indexes_of(url) == set(INDEXES)
        # The next process's one check finds everything: it creates nothing.
        with InProcess(env) as client:
            assert client.get("/todos?completed=false").status_code == 200
            assert "schema applied" not in [e["message"] for e in client.logs()]
    finally:
        drop_database(postgres_url, url)


def test_migrate_adds_the_new_index_to_an_existing_table_once(postgres_url: str):
    url = create_database(postgres_url)
    try:
        old_schema(url, 2_000)
        runs = [migrate(clean_environment(DATABASE_URL=url)) for _ in range(2)]
        assert [r.returncode for r in runs] == [0, 0], [r.stderr for r in runs]
        assert "schema applied" in runs[0].stdout and "already up to date" in runs[1].stdout
        assert indexes_of(url) == set(INDEXES)
        assert run_sql(url, "SELECT count(*) FROM todos")[0][0] == 2_000
    finally:
        drop_database(postgres_url, url)


@pytest.mark.slow  # the DSQL stand-in and a service
def test_on_dsql_an_existing_table_gets_the_new_index_by_create_index_async(
    fresh_sts: Sts, embedded_postgres: str
):
    """As far as the stand-in shows DSQL: each DDL alone, as CREATE INDEX ASYNC, accepted; the
    index present; every list answers through DSQL's SQL surface."""
    url = create_database(embedded_postgres)
    try:
        old_schema(url, 2_000)
        with dsql_stand_in(url, conflict_rate=0.0) as gateway:
            env = dsql_environment(gateway, fresh_sts, url, user="admin")
            with LiveServer(env) as live, httpx.Client(base_url=live.url, timeout=15) as client:
                list_every_shape(client)
                assert [e["message"] for e in live.logs()].count("schema applied") == 1
            assert gateway.index_jobs == len(INDEXES)  # each IF NOT EXISTS; one was there already
        # dsql_stand_in asserted on the way out that it refused nothing.
        assert indexes_of(url) == set(INDEXES)
    finally:
        drop_database(embedded_postgres, url)
