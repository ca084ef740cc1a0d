"""A connection the server closes while it idles in the pool costs no request an error.

A server ends a session with a goodbye: an ErrorResponse (FATAL), then the close. Aurora DSQL
does so when a connection reaches its maximum age, PostgreSQL on a shutdown or an idle
session timeout. asyncpg reads the goodbye on an idle connection as an error in its protocol
and refuses every statement on it ("another operation is in progress") until the close
arrives; on a busy machine a request can take the connection from the pool in between.

In process, against the embedded PostgreSQL through a loopback relay that delivers the
goodbye and holds the close back: the request that meets it must be answered, on a fresh
connection.
"""

from __future__ import annotations

import asyncio
import os
import struct
from urllib.parse import urlsplit

import pytest

import db
from standins.aurora_gateway import parse_upstream_url
from support import clean_environment

GOODBYE_FIELDS = (
    (b"S", "FATAL"),
    (b"V", "FATAL"),
    (b"C", "08006"),
    (b"M", "connection exceeded its maximum age"),
)


def goodbye() -> bytes:
    """The ErrorResponse a server sends before it closes a session."""
    fields = b"".join(tag + value.encode() + b"\0" for tag, value in GOODBYE_FIELDS) + b"\0"
    return b"E" + struct.pack("!I", len(fields) + 4) + fields


class GoodbyeRelay:
    """Relays loopback connections to a PostgreSQL; `say_goodbye` sends every client a
    server's goodbye and keeps the connection open (the close has not arrived yet)."""

    def __init__(self, upstream_url: str):
        self.upstream = parse_upstream_url(upstream_url)
        self.sessions: list[asyncio.StreamWriter] = []
        self.opened = 0
        self._said_goodbye: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.opened += 1
        host, port = self.upstream
        if host.startswith("/"):
            up_reader, up_writer = await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        else:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        self.sessions.append(writer)
        for source, target in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, target))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                if target in self._said_goodbye:
                    continue  # the server has ended this session: nothing more reaches the client
                target.write(data)
                await target.drain()
        except ConnectionError:
            pass
        finally:
            target.close()

    async def say_goodbye(self) -> None:
        for writer in self.sessions:
            if writer not in self._said_goodbye:
                writer.write(goodbye())
                await writer.drain()
                self._said_goodbye.add(writer)

    async def stop(self) -> None:
        for writer in self.sessions:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.server.close()
        await self.server.wait_closed()


async def request_after_a_goodbye(relay: GoodbyeRelay) -> None:
    ready, report = await db.readiness()
    assert ready, report
    assert await db.list_todos(10, None, None) == []  # prepared: the pool's one connection idles
    assert relay.opened == 1
    await relay.say_goodbye()
    await asyncio.sleep(0.1)  # asyncpg has read the goodbye; the close is still to come
    rows = await db.list_todos(10, None, None)
    assert rows == []
    assert relay.opened == 2  # answered on a fresh connection


def test_a_goodbye_read_while_idle_costs_the_next_request_no_error(
    embedded_database: str, monkeypatch: pytest.MonkeyPatch
):
    async def run() -> None:
        relay = GoodbyeRelay(embedded_database)
        port = await relay.start()
        database = urlsplit(embedded_database).path.lstrip("/")
        for key in list(os.environ):
            monkeypatch.delenv(key)
        env = clean_environment(
            DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/{database}",
            PGSSLMODE="disable",
            DB_POOL_MIN="1",
            DB_POOL_MAX="1",  # the request can only have the connection that heard the goodbye
        )
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        try:
            await request_after_a_goodbye(relay)
        finally:
            await db.lifecycle.close()
            await relay.stop()

    monkeypatch.setattr(db, "lifecycle", db.PoolLifecycle())
    asyncio.run(run())
