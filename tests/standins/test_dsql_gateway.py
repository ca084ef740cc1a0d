"""The DSQL stand-in (tests/standins/dsql_gateway.py) keeps DSQL's rules: each refusal, each injection.

Each test talks to the stand-in with asyncpg (simple protocol through `execute` without
arguments, extended protocol with named prepared statements through `fetch`/`prepare`),
in front of a real PostgreSQL, and checks both what the client saw and what did (or did
not) happen upstream.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import asyncpg
import boto3
import pytest

import db
from standins.aurora_gateway import parse_upstream_url
from standins.dsql_gateway import OC000, OC001, DsqlGateway
from support import create_database, drop_database, fetch_sql, run_sql

REGION = "us-east-1"
AKID, SECRET = "AKIATESTDSQLSTANDIN1", "dsql-stand-in-secret"
ROLE = "todo_dsql_role"  # a real role upstream: PostgreSQL enforces its grants too
SCHEMA = "todo_space"

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.slow,
]  # the DSQL stand-in's own tests (connection rates and ages, waited out)


def token(user: str) -> str:
    client = boto3.Session(aws_access_key_id=AKID, aws_secret_access_key=SECRET, region_name=REGION).client(
        "dsql"
    )
    if user == "admin":
        return client.generate_db_connect_admin_auth_token("127.0.0.1", REGION, 900)
    return client.generate_db_connect_auth_token("127.0.0.1", REGION, 900)


@pytest.fixture(scope="module")
def database(embedded_postgres: str):
    url = create_database(embedded_postgres)
    run_sql(
        url,
        f"DO $$ BEGIN CREATE ROLE {ROLE} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$",
        db.CREATE_TABLE,
        f"CREATE SCHEMA {SCHEMA}",
        f"CREATE TABLE {SCHEMA}.todos (LIKE public.todos INCLUDING ALL)",
        *[g.rstrip(";") for g in db.grant_statements(SCHEMA, ROLE)],
    )
    yield url
    drop_database(embedded_postgres, url)


class NamedGateway(DsqlGateway):
    """The stand-in, knowing the name of the database behind it that the tests connect to."""

    database = ""


@pytest.fixture
def stand_in(database: str):
    """Factory: stand_in(**options) → a started DsqlGateway on the module's database."""
    started = []

    def start(**options) -> NamedGateway:
        gateway = NamedGateway(
            *parse_upstream_url(database), credentials_lookup={AKID: SECRET}, region=REGION, seed=7, **options
        ).start()
        gateway.database = urlsplit(database).path.lstrip("/")
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


async def connect(gateway: NamedGateway, user: str = "admin", **options) -> asyncpg.Connection:
    return await asyncpg.connect(
        host="127.0.0.1",
        port=gateway.port,
        user=user,
        password=token(user),
        database=gateway.database,
        ssl=gateway.client_ssl_context(),
        **options,
    )


@asynccontextmanager
async def session(gateway: NamedGateway, user: str = "admin", **options):
    connection = await connect(gateway, user, **options)
    try:
        yield connection
    finally:
        await connection.close()


REFUSED = [
    ("SAVEPOINT before_change", "SAVEPOINT"),
    ("RELEASE SAVEPOINT before_change", "SAVEPOINT"),
    ("ROLLBACK TO SAVEPOINT before_change", "SAVEPOINT"),
    ("SELECT pg_advisory_lock(42)", "pg_advisory_lock"),
    ("SELECT pg_try_advisory_xact_lock(42)", "pg_try_advisory_xact_lock"),
    ("SELECT pg_advisory_unlock_all()", "pg_advisory_unlock_all"),
    ("LISTEN todo_changes", "LISTEN"),
    ("UNLISTEN *", "UNLISTEN"),
    ("NOTIFY todo_changes", "NOTIFY"),
    ("SELECT pg_notify('todo_changes', 'x')", "pg_notify"),
    ("CREATE SEQUENCE todo_numbers", "sequences"),
    ("SELECT nextval('todo_numbers')", "nextval"),
    ("CREATE TABLE numbered (id serial PRIMARY KEY)", "SERIAL"),
    ("CREATE TABLE numbered (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY)", "identity"),
    ("CREATE TRIGGER touch BEFORE UPDATE ON todos FOR EACH ROW EXECUTE FUNCTION touch()", "triggers"),
    ("CREATE TABLE notes (id uuid PRIMARY KEY, todo uuid REFERENCES todos (id))", "foreign keys"),
    ("ALTER TABLE todos ADD CONSTRAINT parent FOREIGN KEY (id) REFERENCES todos (id)", "foreign keys"),
    ("CREATE TEMP TABLE scratch (a int)", "temporary"),
    ("CREATE TEMPORARY TABLE scratch (a int)", "temporary"),
    ("SELECT * INTO TEMP scratch FROM todos", "temporary"),
    ("TRUNCATE todos", "TRUNCATE"),
    ("CREATE EXTENSION IF NOT EXISTS pgcrypto", "extensions"),
    ("CREATE INDEX todos_by_title ON todos (title)", "CREATE INDEX ASYNC"),
    ("CREATE INDEX ASYNC todos_newest ON todos (created_at DESC, id DESC)", "ASC and DESC"),
    ("SELECT count(*) FROM pg_class WHERE relnamespace = current_schema()::regnamespace", "regnamespace"),
    ("DO $$ BEGIN PERFORM 1; END $$", "DO blocks"),
    ("LOCK TABLE todos", "LOCK"),
    ("VACUUM todos", "VACUUM"),
    ("ALTER SYSTEM SET work_mem = '64MB'", "ALTER SYSTEM"),
    ("CREATE MATERIALIZED VIEW done AS SELECT * FROM todos WHERE completed", "materialized"),
    ("CREATE TYPE mood AS ENUM ('ok', 'meh')", "CREATE TYPE"),
    ("CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$", "languages"),
    ("CREATE TABLE archive (LIKE todos) PARTITION BY RANGE (created_at)", "PARTITION"),
    ("CREATE TABLE archive AS SELECT * FROM todos", "AS"),
]


@pytest.mark.parametrize("sql, named", REFUSED, ids=[r[0][:40] for r in REFUSED])
async def test_what_dsql_lacks_is_refused_with_0A000_in_both_protocols(stand_in, database, sql, named):
    gateway = stand_in()
    await fetch_sql(database, "INSERT INTO todos VALUES (gen_random_uuid(), 'kept', false, now(), now())")
    before = (await fetch_sql(database, "SELECT count(*) FROM todos"))[0][0]
    async with session(gateway) as connection:
        with pytest.raises(asyncpg.FeatureNotSupportedError, match=named):
            await connection.execute(sql)  # simple protocol: one Query
        with pytest.raises(asyncpg.FeatureNotSupportedError, match=named):
            await connection.prepare(sql)  # extended: Parse/Describe/Flush, then Sync
        # The connection is in step afterwards, and nothing ran upstream.
        assert await connection.fetchval("SELECT $1::int + 1", 41) == 42
    assert [r.sqlstate for r in gateway.refusals] == ["0A000", "0A000"]
    assert (await fetch_sql(database, "SELECT count(*) FROM todos"))[0][0] == before
    assert not await fetch_sql(
        database,
        "SELECT 1 FROM pg_class WHERE relname IN ('todo_numbers', 'numbered', 'notes', "
        "'scratch', 'todos_by_title', 'todos_newest', 'done', 'archive')",
    )


async def test_every_statement_of_the_service_passes(stand_in):
    gateway = stand_in()
    async with session(gateway) as connection:
        assert await connection.fetchval(db.SCHEMA_CHECK) in (True, False)
        for ddl in (db.CREATE_TABLE, *db.CREATE_INDEXES_DSQL):
            await connection.execute(ddl)
        todo_id = "5b0c8a4e-98d1-4bb0-9a59-2f6cf7a0a001"
        row = await connection.fetchrow(db.INSERT_TODO, todo_id, "milk", False)
        assert (await connection.fetchrow(db.GET_TODO, row["id"]))["title"] == "milk"
        for completed in (None, True, False):
            for after in (None, (row["created_at"], row["id"])):
                await connection.fetch(*db.list_query(10, completed, after))
        await connection.fetchrow(db.UPDATE_TODO, row["id"], None, True)
        assert await connection.execute(db.DELETE_TODO, row["id"]) == "DELETE 1"
        await connection.execute(db.PING)
    assert gateway.refusals == [] and gateway.statements_seen >= 10


async def test_create_index_async_runs_and_answers_with_a_job_id(stand_in, database):
    gateway = stand_in()
    async with session(gateway) as connection:
        # Simple protocol, as `apply_schema` sends it.
        status = await connection.execute(
            "CREATE INDEX ASYNC IF NOT EXISTS todos_by_time ON todos (created_at, id)"
        )
        assert status == "SELECT 1"
        # Extended protocol: the job id comes back as a row.
        rows = await connection.fetch("CREATE INDEX ASYNC IF NOT EXISTS todos_by_done ON todos (completed)")
        assert len(rows) == 1 and list(rows[0].keys()) == ["job_id"] and len(rows[0]["job_id"]) == 26
    built = {
        r[0] for r in await fetch_sql(database, "SELECT indexname FROM pg_indexes WHERE tablename = 'todos'")
    }
    assert {"todos_by_time", "todos_by_done"} <= built
    assert gateway.index_jobs == 2 and gateway.refusals == []


async def test_one_ddl_per_transaction_and_never_with_dml(stand_in, database):
    gateway = stand_in()
    async with session(gateway) as connection:
        with pytest.raises(asyncpg.FeatureNotSupportedError, match="only one DDL"):
            async with connection.transaction():
                await connection.execute("CREATE TABLE first_ddl (id uuid PRIMARY KEY)")
                await connection.execute("CREATE TABLE second_ddl (id uuid PRIMARY KEY)")
        with pytest.raises(asyncpg.FeatureNotSupportedError, match="only one DDL"):
            # One Query, two statements: one implicit transaction.
            await connection.execute(
                "CREATE TABLE first_ddl (id uuid PRIMARY KEY); CREATE TABLE second_ddl (id uuid PRIMARY KEY)"
            )
        # DML, then DDL; and DDL, then DML through a named prepared statement (Bind/Execute).
        insert = await connection.prepare("INSERT INTO todos VALUES ($1, 'x', false, now(), now())")
        with pytest.raises(asyncpg.FeatureNotSupportedError, match="DDL and DML"):
            async with connection.transaction():
                await insert.fetch("5b0c8a4e-98d1-4bb0-9a59-2f6cf7a0a002")
                await connection.execute("CREATE TABLE after_dml (id uuid PRIMARY KEY)")
        with pytest.raises(asyncpg.FeatureNotSupportedError, match="DDL and DML"):
            async with connection.transaction():
                await connection.execute("CREATE TABLE before_dml (id uuid PRIMARY KEY)")
                await insert.fetch("5b0c8a4e-98d1-4bb0-9a59-2f6cf7a0a003")
        # Each on its own is fine.
        await insert.fetch("5b0c8a4e-98d1-4bb0-9a59-2f6cf7a0a004")
        await connection.execute("CREATE TABLE alone_ddl (id uuid PRIMARY KEY)")
    assert len(gateway.refusals) == 4
    tables = {r[0] for r in await fetch_sql(database, "SELECT relname FROM pg_class WHERE relkind = 'r'")}
    assert "alone_ddl" in tables and not {"first_ddl", "second_ddl", "after_dml", "before_dml"} & tables
    ids = {str(r[0]) for r in await fetch_sql(database, "SELECT id FROM todos")}
    assert "5b0c8a4e-98d1-4bb0-9a59-2f6cf7a0a004" in ids
    assert not {"5b0c8a4e-98d1-4bb0-9a59-2f6cf7a0a002", "5b0c8a4e-98d1-4bb0-9a59-2f6cf7a0a003"} & ids


async def test_schema_public_is_refused_to_roles_other_than_admin(stand_in):
    gateway = stand_in()
    async with session(gateway, ROLE) as connection:  # no search_path: public
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="schema public"):
            await connection.fetch("SELECT id FROM todos")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="schema public"):
            await connection.execute("INSERT INTO todos VALUES (gen_random_uuid(), 'x', false, now(), now())")
        assert await connection.fetchval("SELECT 1") == 1  # no table, no schema
    async with session(gateway, ROLE, server_settings={"search_path": SCHEMA}) as connection:
        await connection.execute(db.INSERT_TODO, "5b0c8a4e-98d1-4bb0-9a59-2f6cf7a0a005", "mine", False)
        assert await connection.fetchval("SELECT count(*) FROM todos") == 1
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="schema public"):
            await connection.fetch("SELECT id FROM public.todos")
        await connection.execute("SET search_path TO public")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="schema public"):
            await connection.fetch("SELECT id FROM todos")
    async with session(gateway) as connection:  # admin may
        await connection.fetch("SELECT id FROM public.todos")
    assert [r.sqlstate for r in gateway.refusals] == ["42501"] * 4


async def test_conflicts_are_injected_on_writes_under_40001_and_XX000(stand_in, database):
    gateway = stand_in(conflict_rate=1.0, xx000_every=2)
    before = (await fetch_sql(database, "SELECT count(*) FROM todos"))[0][0]
    async with session(gateway) as connection:
        with pytest.raises(asyncpg.SerializationError) as first:
            await connection.execute(db.INSERT_TODO, "5b0c8a4e-98d1-4bb0-9a59-2f6cf7a0a006", "a", False)
        with pytest.raises(asyncpg.InternalServerError) as second:
            await connection.execute("INSERT INTO todos VALUES (gen_random_uuid(), 'b', false, now(), now())")
        assert str(first.value) == str(second.value) == OC000
        assert db.is_conflict(first.value) and db.is_conflict(second.value)
        assert await connection.fetchval("SELECT count(*) FROM todos") == before  # reads pass
    assert [(i.sqlstate, i.code) for i in gateway.injections] == [("40001", "OC000"), ("XX000", "OC000")]
    assert (await fetch_sql(database, "SELECT count(*) FROM todos"))[0][0] == before  # nothing was written
    assert gateway.refusals == []


async def test_a_ddl_racing_another_gets_OC001(stand_in, database):
    gateway = stand_in()
    async with session(gateway) as first, session(gateway) as second:
        transaction = first.transaction()
        await transaction.start()
        await first.execute("CREATE TABLE racing_first (id uuid PRIMARY KEY)")
        with pytest.raises(asyncpg.SerializationError) as raced:
            await second.execute("CREATE TABLE racing_second (id uuid PRIMARY KEY)")
        assert str(raced.value) == OC001
        await transaction.commit()
        await second.execute("CREATE TABLE racing_second (id uuid PRIMARY KEY)")  # the retry passes
    # And at a configured rate, as when another process's DDL is invisible to this test.
    racy = stand_in(schema_conflict_rate=1.0)
    async with session(racy) as connection:
        with pytest.raises(asyncpg.SerializationError, match=r"\(OC001\)"):
            await connection.execute("CREATE TABLE never_made (id uuid PRIMARY KEY)")
    assert [i.code for i in gateway.injections + racy.injections] == ["OC001", "OC001"]
    tables = {r[0] for r in await fetch_sql(database, "SELECT relname FROM pg_class WHERE relkind = 'r'")}
    assert {"racing_first", "racing_second"} <= tables and "never_made" not in tables


async def test_new_connections_beyond_the_rate_get_53400(stand_in):
    # A burst of 3, then one new connection a minute: the fourth is refused however slow
    # this machine is.
    gateway = stand_in(connection_rate=1 / 60, connection_burst=3)
    opened = [await connect(gateway) for _ in range(3)]
    try:
        with pytest.raises(asyncpg.ConfigurationLimitExceededError, match="rate"):
            await connect(gateway)
        gateway.connection_rate = 50.0  # the bucket refills at the rate
        await asyncio.sleep(0.1)
        opened.append(await connect(gateway))
    finally:
        for connection in opened:
            await connection.close()
    assert [a.reason for a in gateway.refused] == ["connection rate exceeded"]


async def test_connections_are_closed_at_their_maximum_age(stand_in):
    gateway = stand_in(max_connection_age=1.0)
    connection = await connect(gateway)
    assert await connection.fetchval("SELECT 1") == 1
    deadline = time.monotonic() + 10
    while not connection.is_closed() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert connection.is_closed() and gateway.aged_out == 1
    fresh = await connect(gateway)  # a new connection starts a new hour
    assert await fresh.fetchval("SELECT 1") == 1
    await fresh.close()
