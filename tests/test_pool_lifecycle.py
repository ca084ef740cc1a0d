"""The pool's lifecycle, as /readyz reports it (`state`).

A failed attempt backs off: until the backoff is over, requests get a 503 at once and no new
attempt starts; the next one is a retry. close() empties the lifecycle and forgets the
settings, so the next request reads the environment again and serves.

In process. The database that fails is a loopback listener that accepts each connection and
closes it at once: a real asyncpg connect that fails, counted where it arrives.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

import db
from support import clean_environment


def use_environment(monkeypatch: pytest.MonkeyPatch, **variables: str) -> None:
    for key in list(os.environ):
        monkeypatch.delenv(key)
    for key, value in clean_environment(**variables).items():
        monkeypatch.setenv(key, value)


async def lifecycle_through_a_failure_and_a_close(monkeypatch: pytest.MonkeyPatch, working_url: str) -> None:
    connections = 0

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    listener = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    use_environment(
        monkeypatch, DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/todos", PGSSLMODE="disable"
    )
    try:
        ready, report = await db.readiness()
        assert not ready and report["state"] == "backing off"
        assert report["replacement"]["failures"] == 1 and connections == 1

        # While backing off: a 503 at once, and no new attempt.
        started = time.monotonic()
        ready, report = await db.readiness()
        assert not ready and "retrying in" in report["detail"]
        assert time.monotonic() - started < 0.2
        assert report["replacement"]["failures"] == 1 and connections == 1

        # Once the backoff is over, the next request starts a retry, which fails in turn.
        await asyncio.sleep(report["replacement"]["retry_in_seconds"] + 0.05)
        retry = asyncio.create_task(db.readiness())
        await asyncio.sleep(0)  # the request has started the retry and waits for it
        assert db.lifecycle.status()["state"] == "retrying"
        ready, report = await retry
        assert not ready and report["state"] == "backing off"
        assert report["replacement"]["failures"] == 2 and connections == 2

        await db.lifecycle.close()
        assert db.lifecycle.status() == {"auth": None, "state": "empty"}
    finally:
        listener.close()
        await listener.wait_closed()

    use_environment(monkeypatch, DATABASE_URL=working_url)
    try:
        ready, report = await db.readiness()
        assert ready and (report["status"], report["state"]) == ("ok", "serving")
        assert "replacement" not in report
    finally:
        await db.lifecycle.close()


def test_a_failed_attempt_backs_off_then_retries_and_close_forgets_the_settings(
    embedded_database: str, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(db, "lifecycle", db.PoolLifecycle())
    asyncio.run(lifecycle_through_a_failure_and_a_close(monkeypatch, embedded_database))
