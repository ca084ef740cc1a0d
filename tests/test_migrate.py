"""`python db.py migrate`: the schema applies twice without harm, uses nothing DSQL lacks,
bad configuration is reported, and on DSQL (as admin, or for a role in its own schema)
migrate prints the grants and the service then serves."""

from __future__ import annotations

import httpx
import pytest

from dsql_support import (
    ROLE,
    SCHEMA,
    dsql_environment,
    dsql_stand_in,
    ensure_role,
    grant_printed,
    migrate_as_admin,
)
from standins.sts import Sts
from support import InProcess, LiveServer, clean_environment, create_database, drop_database, migrate, run_sql


def test_schema_applies_twice_without_harm(postgres_url: str):
    url = create_database(postgres_url)
    try:
        env = clean_environment(DATABASE_URL=url)
        first, second = migrate(env), migrate(env)
        assert first.returncode == 0 and "schema applied" in first.stdout, first.stderr
        assert second.returncode == 0 and "already up to date" in second.stdout, second.stderr
        columns = run_sql(
            url,
            """SELECT column_name, data_type, is_nullable FROM information_schema.columns
                                  WHERE table_name = 'todos' ORDER BY ordinal_position""",
        )
        assert [tuple(c) for c in columns] == [
            ("id", "uuid", "NO"),
            ("title", "text", "NO"),
            ("completed", "boolean", "NO"),
            ("created_at", "timestamp with time zone", "NO"),
            ("updated_at", "timestamp with time zone", "NO"),
        ]
        indexes = run_sql(url, "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'todos'")
        assert {name: definition.split(" USING btree ")[1] for name, definition in indexes} == {
            "todos_pkey": "(id)",
            "todos_newest_first": "(created_at, id)",
            "todos_by_completed": "(completed, created_at, id)",
        }
        # A service starting on the migrated database checks once and serves.
        with InProcess(clean_environment(DATABASE_URL=url)) as client:
            assert client.post("/todos", json={"title": "after migrate"}).status_code == 201
            assert not any(e["message"] == "schema applied" for e in client.logs())
    finally:
        drop_database(postgres_url, url)


def test_schema_uses_nothing_dsql_lacks():
    import db

    ddl = " ".join([db.CREATE_TABLE, *db.CREATE_INDEXES_DSQL]).upper()
    for forbidden in ("SERIAL", "SEQUENCE", "TRIGGER", "REFERENCES", "TEMPORARY", "SAVEPOINT"):
        assert forbidden not in ddl
    assert all(index.startswith("CREATE INDEX ASYNC ") for index in db.CREATE_INDEXES_DSQL)


def test_migrate_reports_bad_configuration():
    result = migrate(clean_environment(PGHOST="db.example.com", DB_AUTH="nonsense"))
    assert result.returncode == 1 and "DB_AUTH" in result.stderr


@pytest.mark.slow  # migrate twice and a process, through STS and the DSQL stand-in
@pytest.mark.parametrize("role", [None, ROLE], ids=["admin-public", "role-own-schema"])
def test_migrate_on_dsql_as_admin_then_serve(fresh_sts: Sts, embedded_postgres: str, role: str | None):
    """The README's DSQL order: as admin, migrate (schema, table, CREATE INDEX ASYNC, one DDL
    per transaction, a DDL that races another retried), grant what it printed, then serve."""
    url = create_database(embedded_postgres)
    schema = SCHEMA if role else None
    try:
        ensure_role(embedded_postgres)
        # Half of all DDL meets a (simulated) concurrent DDL: OC001, which migrate retries.
        with dsql_stand_in(url, schema_conflict_rate=0.5, conflict_rate=0.0) as gateway:
            first = migrate_as_admin(gateway, fresh_sts, url, schema, role)
            second = migrate_as_admin(gateway, fresh_sts, url, schema, role)
            assert first.returncode == 0 and "schema applied" in first.stdout, first.stdout + first.stderr
            assert second.returncode == 0 and "already up to date" in second.stdout, second.stderr
            assert gateway.index_jobs == 2  # one CREATE INDEX ASYNC per index, none on the second run
            assert any(i.code == "OC001" for i in gateway.injections)
            assert "retrying schema creation after a conflict" in first.stderr + first.stdout
            where = schema or "public"
            assert (
                len(
                    run_sql(
                        url,
                        f"""SELECT 1 FROM pg_indexes WHERE schemaname = '{where}'
                                        AND indexname IN ('todos_newest_first', 'todos_by_completed')""",
                    )
                )
                == 2
            )
            if role is None:
                assert "only admin may use schema public" in first.stdout
                env = dsql_environment(gateway, fresh_sts, url, user="admin")
            else:
                assert grant_printed(url, first.stdout) == [
                    f'GRANT USAGE ON SCHEMA "{SCHEMA}" TO "{ROLE}"',
                    f'GRANT SELECT, INSERT, UPDATE, DELETE ON "{SCHEMA}".todos TO "{ROLE}"',
                ]
                env = dsql_environment(gateway, fresh_sts, url, user=ROLE, schema=SCHEMA)
            with LiveServer(env) as live:
                made = httpx.post(live.url + "/todos", json={"title": "after migrate"})
                assert made.status_code == 201, made.text
                assert httpx.get(live.url + made.headers["location"]).status_code == 200
                assert not any(e["message"] == "schema applied" for e in live.logs())
            actions = {a.action for a in gateway.accepted}
            assert actions == ({"DbConnectAdmin"} if role is None else {"DbConnectAdmin", "DbConnect"})
    finally:
        drop_database(embedded_postgres, url)
