"""The suite in DSQL mode: the service, as `admin` or as a role in its own schema, behind the
DSQL stand-in (tests/standins/dsql_gateway.py) with optimistic-concurrency failures injected.

- `dsql_service(database_url, sts, role=…)`: the stand-in in front of `database_url`; for a
  role, `python db.py migrate` run as `admin` through the stand-in first (schema, table,
  `CREATE INDEX ASYNC`), then the grants it printed; then the service as a real process.
  On the way out it asserts that the stand-in refused nothing.
- `SERVERS`: what a module whose tests depend on the server parametrises `backend` with
  (conftest.py): the embedded PostgreSQL, the machine's, and DSQL's stand-in (in front of
  the embedded one) as `admin` and as a role. The DSQL variants are slow: a process, a
  stand-in and STS each.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from iam_support import REGION, iam_environment
from standins.aurora_gateway import moto_credentials_lookup, parse_upstream_url
from standins.dsql_gateway import DsqlGateway
from standins.sts import Sts
from support import LiveServer, migrate, run_sql

ROLE, SCHEMA = "todo_app", "todo"  # different names: the stand-in gives "$user" no favours
SERVERS = [
    "embedded",  # the embedded PostgreSQL, the service in this process
    "machine",  # the machine's PostgreSQL (TEST_DATABASE_URL), the service in this process
    pytest.param("dsql-admin", marks=pytest.mark.slow),
    pytest.param("dsql-role", marks=pytest.mark.slow),
]
CONFLICT_RATE = 0.1  # of writes that fail with OC000, as under real contention


def dsql_environment(
    gateway: DsqlGateway,
    sts: Sts,
    database_url: str,
    *,
    user: str,
    schema: str | None = None,
    ttl: int = 900,
    **overrides: str,
) -> dict[str, str]:
    """The service's environment for DSQL behind the stand-in: IAM mode's, as `user` with
    DB_AUTH=dsql; `overrides` win."""
    settings = {"PGUSER": user, "DB_AUTH": "dsql", "LOG_LEVEL": "info"}
    if schema:
        settings["DB_SCHEMA"] = schema
    return iam_environment(gateway, sts, database_url, ttl, **{**settings, **overrides})


def migrate_as_admin(
    gateway: DsqlGateway, sts: Sts, database_url: str, schema: str | None, role: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`python db.py migrate [role]` as DSQL's admin, through the stand-in."""
    return migrate(dsql_environment(gateway, sts, database_url, user="admin", schema=schema), role)


def ensure_role(admin_url: str, role: str = ROLE) -> None:
    """A login role upstream (cluster-wide), as `CREATE ROLE … WITH LOGIN` makes on DSQL."""
    run_sql(
        admin_url, f"DO $$ BEGIN CREATE ROLE {role} LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$"
    )


def grant_printed(database_url: str, output: str) -> list[str]:
    """Run, as the owner, the GRANT statements that migrate printed; return them."""
    grants = [line.rstrip(";") for line in output.splitlines() if line.startswith("GRANT ")]
    run_sql(database_url, *grants)
    return grants


@contextmanager
def dsql_stand_in(database_url: str, **options) -> Iterator[DsqlGateway]:
    options = {"conflict_rate": CONFLICT_RATE, "seed": 11, **options}
    gateway = DsqlGateway(
        *parse_upstream_url(database_url),
        region=REGION,
        credentials_lookup=moto_credentials_lookup(),
        **options,
    ).start()
    try:
        yield gateway
    finally:
        gateway.stop()
    assert gateway.refusals == [], f"the DSQL stand-in refused: {gateway.refusals[:5]}"


@contextmanager
def dsql_service(
    database_url: str,
    sts: Sts,
    *,
    role: bool,
    ttl: int = 900,
    gateway_options: dict | None = None,
    **overrides: str,
) -> Iterator[tuple[LiveServer, DsqlGateway]]:
    """The service in DSQL mode behind the stand-in; see the module docstring."""
    with dsql_stand_in(database_url, **(gateway_options or {})) as gateway:
        if role:
            migrated = migrate_as_admin(gateway, sts, database_url, SCHEMA, ROLE)
            assert migrated.returncode == 0, migrated.stdout + migrated.stderr
            assert len(grant_printed(database_url, migrated.stdout)) == 2
            env = dsql_environment(gateway, sts, database_url, user=ROLE, schema=SCHEMA, ttl=ttl, **overrides)
        else:
            env = dsql_environment(gateway, sts, database_url, user="admin", ttl=ttl, **overrides)
        with LiveServer(env) as live:
            yield live, gateway
        assert gateway.statements_seen > 0
        # Every injected conflict was met by exactly one retry, and conflicts were injected.
        injected = [i for i in gateway.injections if i.code == "OC000"]
        retried = [e for e in live.logs() if e["message"] == "retrying after a serialization conflict"]
        assert len(retried) == len(injected), (len(retried), len(injected))
        if gateway.conflict_rate:
            assert injected and {i.sqlstate for i in injected} == {"40001", "XX000"}, injected
