#!/usr/bin/env python3
"""This process's CPU per GET /todos, layer by layer: the project against the ceiling.

    .venv/bin/python bench/layers.py              # about a minute; --dsn as bench/run.py's

No server and no load generator: each ASGI app (app.app, bench/ceiling_app.py) is called in
this process, one request after another, and CPU is `time.process_time()` over thousands of
calls (the fastest of several rounds, variants in turns). So a figure here is CPU only: a
sampling profiler under load (bench/profile.py) also counts the time a process spends
preempted inside a system call, which on a loaded 2-core machine is most of what separates
two runs of the same statement. Measured, on a schema of its own with 20 todos:

- the pool: acquire and release, then acquire and the list statement, on a plain asyncpg
  pool and on one made as the project makes it (`PooledConnection`, its `init` and `reset`,
  `plan_cache_mode`): what the project's connection class and hooks add per statement;
- the database call: `db._run` around an operation that sends nothing, against a bare
  acquire: the deadline timer, the lifecycle's and the per-connection checks;
- the apps with the database answered from memory (the same rows): routing, request id,
  parsing, the Structs and the response, with nothing else in the figure;
- the apps with the real database; and the project's app once more with its statement sent
  on a bare acquire (no `db._run`: no deadline, no checks), to see what those cost between
  two round trips rather than in a tight loop.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
SCHEMA = "bench_layers"
TODOS = 20


def request_scope() -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/todos",
        "raw_path": b"/todos",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"localhost"), (b"user-agent", b"wrk"), (b"accept", b"*/*")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 3000),
        "state": {},
    }


async def receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: dict[str, Any]) -> None:
    pass


def serve(asgi: Any) -> Callable[[], Awaitable[None]]:
    return lambda: asgi(request_scope(), receive, send)


async def cpu_per_call(call: Callable[[], Awaitable[Any]], calls: int) -> float:
    """µs of this process's CPU per call, over `calls` calls in a row."""
    started = time.process_time()
    for _ in range(calls):
        await call()
    return (time.process_time() - started) / calls * 1e6


async def main(dsn: str, calls: int, rounds: int) -> None:
    admin = await asyncpg.connect(dsn)
    await admin.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    os.environ.update(DATABASE_URL=dsn, DB_SCHEMA=SCHEMA, LOG_LEVEL="warning", CEILING_PAGE="50")
    # After the environment: the ceiling reads CEILING_PAGE at import.
    import ceiling_app  # noqa: PLC0415

    import app  # noqa: PLC0415
    import db  # noqa: PLC0415

    app.configure_logging()
    await db.list_todos(1, None, None)  # the project's pool, and its schema
    missing = TODOS - await admin.fetchval(f"SELECT count(*) FROM {SCHEMA}.todos")
    for number in range(missing):
        await admin.execute(
            f"INSERT INTO {SCHEMA}.todos (id, title, completed, created_at, updated_at) "
            "VALUES ($1, $2, false, now(), now())",
            uuid.uuid4(),
            f"todo {number}",
        )
    await admin.close()

    settings = db.Settings.from_env()
    search_path = {"search_path": SCHEMA}

    async def no_reset(connection: asyncpg.Connection) -> None:
        pass

    plain = await asyncpg.create_pool(
        dsn, min_size=2, max_size=10, reset=no_reset, server_settings=search_path
    )
    as_project = await asyncpg.create_pool(
        **settings.connect_arguments(),
        min_size=2,
        max_size=10,
        reset=db._reset_session,
        connection_class=db.PooledConnection,
        init=functools.partial(db.prepare_connection, settings),
    )
    ceiling_app.pool = plain
    rows = await plain.fetch(db.LIST_FIRST_PAGE, 51)

    async def acquire(pool: asyncpg.Pool) -> None:
        async with pool.acquire():
            pass

    async def fetch(pool: asyncpg.Pool) -> None:
        async with pool.acquire() as connection:
            await connection.fetch(db.LIST_FIRST_PAGE, 51)

    async def nothing(connection: asyncpg.Connection) -> None:
        pass

    async def rows_from_memory(*args: Any) -> list[asyncpg.Record]:
        return rows

    class MemoryConnection:
        async def fetch(self, *args: Any) -> list[asyncpg.Record]:
            return rows

        async def fetchrow(self, *args: Any) -> asyncpg.Record:
            return rows[0]

    class MemoryPool:
        def acquire(self) -> Any:
            return self

        async def __aenter__(self) -> MemoryConnection:
            return MemoryConnection()

        async def __aexit__(self, *exc_info: object) -> None:
            pass

    async def list_on_bare_acquire(limit: int, *filters: Any) -> list[asyncpg.Record]:
        async with as_project.acquire() as connection:
            return await connection.fetch(db.LIST_FIRST_PAGE, limit)

    in_memory = {"ceiling": MemoryPool(), "project": rows_from_memory}
    real = {"ceiling": plain, "project": db.list_todos}
    bare = {"ceiling": plain, "project": list_on_bare_acquire}

    def answered_from(source: dict[str, Any]) -> None:
        ceiling_app.pool, db.list_todos = source["ceiling"], source["project"]

    variants: list[tuple[str, Callable[[], Awaitable[Any]], dict[str, Any]]] = [
        ("pool: acquire + release, plain asyncpg pool", functools.partial(acquire, plain), real),
        ("pool: acquire + release, made as the project's", functools.partial(acquire, as_project), real),
        ("pool: acquire + list statement, plain", functools.partial(fetch, plain), real),
        ("pool: acquire + list statement, as the project's", functools.partial(fetch, as_project), real),
        ("db._run around an operation that sends nothing", functools.partial(db._run, nothing), real),
        ("app, database from memory: ceiling", serve(ceiling_app.app), in_memory),
        ("app, database from memory: project", serve(app.app), in_memory),
        ("app, real database: ceiling", serve(ceiling_app.app), real),
        ("app, real database: project", serve(app.app), real),
        ("app, real database: project, statement on a bare acquire", serve(app.app), bare),
    ]
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, call, source in variants:
            answered_from(source)
            for _ in range(calls // 10):  # warm-up
                await call()
            best[name] = min(best.get(name, float("inf")), await cpu_per_call(call, calls))
    answered_from(real)
    width = max(map(len, best))
    print(f"CPU µs per call, fastest of {rounds} rounds of {calls} calls:")
    for name, micros in best.items():
        print(f"  {name:<{width}}  {micros:7.1f}")
    await asyncio.gather(plain.close(), as_project.close(), db.close())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dsn", default=os.environ.get("BENCH_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
    )
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    arguments = parser.parse_args()
    uvloop.run(main(arguments.dsn, arguments.calls, arguments.rounds))
