"""The statement margin (db.STATEMENT_MARGIN): no statement starts without time to finish.

In process, on the embedded PostgreSQL, with a pool of one connection that the test holds
and hands back at a chosen moment of a waiting request's deadline. Whether a statement was
sent is read from PostgreSQL itself: `pg_stat_activity` shows, for that connection's
backend, the last statement it received and when (`query_start`), live, with no statistics
delay. Both sides of the margin are checked: a connection handed back with time to spare
runs the insert; one handed back inside the margin is a 503 (`Unavailable`) with nothing
sent, so nothing can be stored later.
"""

from __future__ import annotations

import asyncio
import os
import uuid

import asyncpg
import pytest

import db
from support import clean_environment, create_database, drop_database

DEADLINE = 2.0


@pytest.fixture
def margin_database(embedded_postgres: str, monkeypatch: pytest.MonkeyPatch):
    url = create_database(embedded_postgres)
    for key in list(os.environ):
        monkeypatch.delenv(key)
    for key, value in clean_environment(DATABASE_URL=url, DB_POOL_MIN="1", DB_POOL_MAX="1").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(db, "lifecycle", db.PoolLifecycle())
    monkeypatch.setattr(db, "OPERATION_DEADLINE", DEADLINE)
    yield url
    drop_database(embedded_postgres, url)


async def last_statement(observer: asyncpg.Connection, pid: int) -> tuple[str, object]:
    row = await observer.fetchrow("SELECT query, query_start FROM pg_stat_activity WHERE pid = $1", pid)
    return row["query"], row["query_start"]


async def insert_with_connection_back_at(url: str, left: float) -> tuple[BaseException | None, bool, bool]:
    """Hold the pool's only connection while a create waits for it; hand it back when `left`
    seconds of the create's deadline remain. (error raised, statement sent?, row stored?)"""
    observer = await asyncpg.connect(url)
    try:
        await db.list_todos(1, None, None)  # the pool and the schema
        pool = db.lifecycle.current
        assert pool is not None
        held = await pool.acquire()
        pid = held.get_server_pid()
        await held.execute("SELECT 'held by the test'")
        before = await last_statement(observer, pid)
        assert before[0] == "SELECT 'held by the test'"

        todo_id = uuid.uuid4()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE  # the create's own deadline starts a moment later
        create = asyncio.create_task(db.create_todo(todo_id, "late", False))
        await asyncio.sleep(deadline - left - loop.time())
        assert not create.done()
        await pool.release(held)
        try:
            await create
            error = None
        except db.Unavailable as raised:
            error = raised
        sent = await last_statement(observer, pid) != before
        stored = await observer.fetchval("SELECT count(*) FROM todos WHERE id = $1", todo_id) == 1
        return error, sent, stored
    finally:
        await observer.close()
        await db.lifecycle.close()


def test_a_statement_with_time_to_finish_is_run(margin_database: str):
    """The control: handed back with 1 s left (twice the margin), the insert runs."""
    error, sent, stored = asyncio.run(
        insert_with_connection_back_at(margin_database, 2 * db.STATEMENT_MARGIN)
    )
    assert error is None and sent and stored


def test_a_statement_inside_the_margin_is_not_sent(margin_database: str):
    """Handed back with half the margin left: 503 at once, and PostgreSQL received nothing."""
    error, sent, stored = asyncio.run(
        insert_with_connection_back_at(margin_database, db.STATEMENT_MARGIN / 2)
    )
    assert isinstance(error, db.Unavailable) and "not started" in str(error), error
    assert not sent, "the statement reached PostgreSQL with less than the margin left"
    assert not stored


def test_the_production_waits_add_up_inside_the_specs_10_s():
    """The outage tests run the service on a shorter deadline (tests/test_database_outages.py):
    they prove the mechanism; this proves the figures. Every wait of a database call fits in
    OPERATION_DEADLINE, and with the cancel's grace it leaves a second of the SPEC's 10 s for
    the answer (the table at the top of db.py)."""
    defaults = db.Settings.from_env({"DATABASE_URL": "postgresql://u@localhost/d"})
    for wait in (
        db.REPLACEMENT_WAIT,
        db.RETRY_WAIT,
        defaults.connect_timeout,
        defaults.tcp_user_timeout,
        db.THAW_CHECK_TIMEOUT,
        db.STATEMENT_MARGIN,
        db.READY_CHECK_TIMEOUT,
    ):
        assert 0 < wait < db.OPERATION_DEADLINE
    assert db.OPERATION_DEADLINE + db.CANCEL_GRACE <= 10 - 1
