"""The benchmark's ceiling: a bare ASGI callable over the project's own `todos` table.

No framework, no routing table, no middleware, no validation beyond what the bytes need:
one asyncpg pool (same size as the others), each query run as a prepared statement
(asyncpg's per-connection statement cache: one prepared statement per query), rows put
into a msgspec Struct and encoded with msgspec. The list query is the project's
first-page query, text for text (db.LIST_FIRST_PAGE). The pool skips asyncpg's per-release
reset round trip, as the project does, and under Vercel's runtime its listening socket gets
TCP_NODELAY, as the project's does. Nothing here is meant to be a service: it is the
floor of the work one request needs, so that project/ceiling says how much of the
remaining cost is the project's own.

Answers:  GET /todos (newest first, the project's default page), GET /todos/{uuid},
          POST /todos {"title": ...}, PATCH /todos/{uuid} {"completed": ...}.
Config:   DATABASE_URL, DB_POOL_MIN, DB_POOL_MAX.
Run:      uvicorn ceiling_app:app --app-dir bench
"""

import os
import socket
import sys
import uuid
from datetime import datetime

import asyncpg
import msgspec

# Identical to db.LIST_FIRST_PAGE (kept as a copy: the ceiling imports nothing of the project).
LIST = "SELECT id, title, completed, created_at, updated_at FROM todos ORDER BY created_at DESC, id DESC LIMIT $1"
PAGE = int(os.environ.get("CEILING_PAGE", "50"))
LIST_LIMIT = PAGE + 1  # like the project: one row more tells whether a next page exists
GET = "SELECT id, title, completed, created_at, updated_at FROM todos WHERE id = $1"
INSERT = (
    "INSERT INTO todos (id, title, completed, created_at, updated_at) "
    "VALUES ($1, $2, false, now(), now()) RETURNING id, title, completed, created_at, updated_at"
)
UPDATE = (
    "UPDATE todos SET completed = $2, updated_at = now() WHERE id = $1 "
    "RETURNING id, title, completed, created_at, updated_at"
)


class Todo(msgspec.Struct):
    id: uuid.UUID
    title: str
    completed: bool
    created_at: datetime
    updated_at: datetime


class NewTodo(msgspec.Struct):
    title: str


class Patch(msgspec.Struct):
    completed: bool


encode = msgspec.json.encode
decode_new = msgspec.json.Decoder(NewTodo).decode
decode_patch = msgspec.json.Decoder(Patch).decode
JSON = [(b"content-type", b"application/json")]
pool: asyncpg.Pool  # opened by the lifespan, before the first request


async def _no_reset(connection):
    pass


async def _send(send, status, body):
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": JSON + [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _body(receive):
    message = await receive()
    body = message.get("body", b"")
    while message.get("more_body"):
        message = await receive()
        body += message.get("body", b"")
    return body


async def app(scope, receive, send):
    global pool
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                # Under Vercel's runtime: no ~40 ms Nagle stall per keep-alive response (README,
                # "No Nagle stall"); the same one setsockopt the project makes on its listener.
                listener = getattr(sys.modules.get("vercel_runtime.vc_init"), "sock", None)
                if isinstance(listener, socket.socket):
                    listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                pool = await asyncpg.create_pool(
                    os.environ["DATABASE_URL"],
                    min_size=int(os.environ.get("DB_POOL_MIN", "1")),
                    max_size=int(os.environ.get("DB_POOL_MAX", "10")),
                    reset=_no_reset,
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await pool.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    path, method = scope["path"], scope["method"]
    if path == "/todos" and method == "GET":
        async with pool.acquire() as connection:
            rows = await connection.fetch(LIST, LIST_LIMIT)
        await _send(send, 200, encode([Todo(*row) for row in rows[:PAGE]]))
        return
    if path == "/todos" and method == "POST":
        new = decode_new(await _body(receive))
        async with pool.acquire() as connection:
            row = await connection.fetchrow(INSERT, uuid.uuid4(), new.title)
        await _send(send, 201, encode(Todo(*row)))
        return
    try:
        todo_id = uuid.UUID(path[7:])
    except ValueError:
        await _send(send, 404, b'{"status":404}')
        return
    if method == "GET":
        async with pool.acquire() as connection:
            row = await connection.fetchrow(GET, todo_id)
    else:
        patch = decode_patch(await _body(receive))
        async with pool.acquire() as connection:
            row = await connection.fetchrow(UPDATE, todo_id, patch.completed)
    if row is None:
        await _send(send, 404, b'{"status":404}')
    else:
        await _send(send, 200, encode(Todo(*row)))
