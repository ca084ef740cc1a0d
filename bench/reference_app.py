"""The FastAPI + asyncpg todo service that aurora-todo replaces — the benchmark's reference.

Written the obvious FastAPI way, as in the snippet users copy: one asyncpg pool opened in
the lifespan (with an IAM token from `boto3.client("rds").generate_db_auth_token(...)` in
IAM mode, or the DSN in password mode), plain `async def` routes, rows returned as
`[dict(r) for r in rows]`, `title: str` / `completed: bool` as query parameters, integer
(SERIAL) ids in its own `todos_ref` table, which bench/run.py creates and seeds.

The one concession to a fair comparison: `GET /todos` takes `limit` (default 50), so that
every target returns the same page of rows from the 500-todo data set.

Configuration (the same variables as the project):
  password mode: DATABASE_URL
  IAM mode:      PGHOST PGPORT PGUSER PGDATABASE AWS_REGION PGSSLMODE PGSSLROOTCERT
                 (credentials from boto3's default chain: AWS_ROLE_ARN +
                 AWS_WEB_IDENTITY_TOKEN_FILE, AWS_ENDPOINT_URL_STS honoured by boto3)
  DB_POOL_MIN / DB_POOL_MAX: pool size.

Run: uvicorn reference_app:app --app-dir bench
"""

import os
import ssl
from contextlib import asynccontextmanager

import asyncpg
from fastapi import FastAPI, HTTPException, Response

pool: asyncpg.Pool  # opened by the lifespan, before the first request


@asynccontextmanager
async def lifespan(app: FastAPI):
    global pool
    min_size = int(os.environ.get("DB_POOL_MIN", "1"))
    max_size = int(os.environ.get("DB_POOL_MAX", "10"))
    if os.environ.get("DATABASE_URL"):
        pool = await asyncpg.create_pool(os.environ["DATABASE_URL"], min_size=min_size, max_size=max_size)
    else:
        import boto3

        host = os.environ["PGHOST"]
        port = int(os.environ.get("PGPORT", "5432"))
        user = os.environ.get("PGUSER", "postgres")
        region = os.environ.get("AWS_REGION")
        token = boto3.client("rds", region_name=region).generate_db_auth_token(
            DBHostname=host, Port=port, DBUsername=user, Region=region
        )
        sslmode = os.environ.get("PGSSLMODE", "require")
        ssl_arg: ssl.SSLContext | str | bool = sslmode
        if sslmode == "disable":
            ssl_arg = False
        elif os.environ.get("PGSSLROOTCERT"):
            ssl_arg = ssl.create_default_context(cafile=os.environ["PGSSLROOTCERT"])
        pool = await asyncpg.create_pool(
            host=host,
            port=port,
            user=user,
            password=token,
            database=os.environ.get("PGDATABASE", "postgres"),
            ssl=ssl_arg,
            min_size=min_size,
            max_size=max_size,
        )
    yield
    await pool.close()


app = FastAPI(lifespan=lifespan)


@app.get("/todos")
async def list_todos(limit: int = 50):
    rows = await pool.fetch("SELECT * FROM todos_ref ORDER BY id DESC LIMIT $1", limit)
    return [dict(r) for r in rows]


@app.get("/todos/{todo_id}")
async def get_todo(todo_id: int):
    row = await pool.fetchrow("SELECT * FROM todos_ref WHERE id = $1", todo_id)
    if row is None:
        raise HTTPException(status_code=404, detail="Todo not found")
    return dict(row)


@app.post("/todos", status_code=201)
async def create_todo(title: str):
    row = await pool.fetchrow("INSERT INTO todos_ref (title) VALUES ($1) RETURNING *", title)
    return dict(row)


@app.patch("/todos/{todo_id}")
async def update_todo(todo_id: int, completed: bool):
    row = await pool.fetchrow(
        "UPDATE todos_ref SET completed = $2, updated_at = now() WHERE id = $1 RETURNING *",
        todo_id,
        completed,
    )
    if row is None:
        raise HTTPException(status_code=404, detail="Todo not found")
    return dict(row)


@app.delete("/todos/{todo_id}", status_code=204)
async def delete_todo(todo_id: int):
    result = await pool.execute("DELETE FROM todos_ref WHERE id = $1", todo_id)
    if result == "DELETE 0":
        raise HTTPException(status_code=404, detail="Todo not found")
    return Response(status_code=204)
