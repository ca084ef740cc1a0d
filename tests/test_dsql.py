"""Aurora DSQL as it really is: what the service does about each way DSQL differs.

Aurora DSQL is played by the IAM gateway in DSQL mode (TLS with its own CA, tokens checked
as DbConnectAdmin / DbConnect against the credentials moto's STS issued, tokens signed by
expired credentials refused), in front of a real PostgreSQL.
"""

from __future__ import annotations

import time

import asyncpg
import httpx
import pytest

import db
from iam_support import Sts
from support import LiveServer, create_database, drop_database
from test_iam import apply_postgres_schema, aurora, iam_environment, replacements


@pytest.fixture(scope="module")
def dsql_database(embedded_postgres: str):
    url = create_database(embedded_postgres)
    apply_postgres_schema(url)
    yield url
    drop_database(embedded_postgres, url)


@pytest.mark.parametrize("error", [
    asyncpg.SerializationError("change conflicts with another transaction, please retry: (OC000)"),
    asyncpg.InternalServerError("change conflicts with another transaction, please retry: (OC000)"),
    asyncpg.InternalServerError("schema has been updated by another transaction, please retry: (OC001)"),
    asyncpg.SerializationError("could not serialize access due to concurrent update"),
])
def test_conflicts_are_known_by_sqlstate_or_by_their_code_in_the_message(error):
    assert db.is_conflict(error)


@pytest.mark.parametrize("error", [
    asyncpg.InternalServerError("something else broke"),
    asyncpg.UniqueViolationError("duplicate key value violates unique constraint (OC0001x)"),
    ValueError("(OC000)"),
])
def test_other_errors_are_not_conflicts(error):
    assert not db.is_conflict(error)


def test_pool_never_outlives_the_credentials_that_signed_its_token(fresh_sts: Sts, dsql_database: str):
    # DSQL accepts this TTL, but the credentials that sign the token last 8 s: a token is
    # worthless once they expire, so the pool must be replaced before then.
    fresh_sts.credential_lifetime = 8
    with aurora(dsql_database, 3600, mode="dsql", upstream_user="postgres") as gateway:
        env = iam_environment(gateway, fresh_sts, dsql_database, 3600, DB_AUTH="dsql", PGUSER="admin")
        with LiveServer(env) as live, httpx.Client(base_url=live.url, timeout=15) as client:
            assert client.post("/todos", json={"title": "signed by short-lived keys"}).status_code == 201
            left = client.get("/readyz").json()["token"]["seconds_left"]
            assert left <= 8, left
            stop_at = time.monotonic() + 14
            while time.monotonic() < stop_at:
                # Dropped connections make the pool open new ones, presenting its token.
                gateway.drop_connections()
                response = client.get("/todos")
                assert response.status_code == 200, response.text
                time.sleep(1.0)
            assert replacements(live) >= 1
            assert gateway.refused == [], gateway.refused


def test_certificate_that_does_not_verify_is_a_503_naming_PGSSLROOTCERT(fresh_sts: Sts, dsql_database: str):
    with aurora(dsql_database, 900, mode="dsql", upstream_user="postgres") as gateway:
        # No CA bundle: verify-full against the system trust store, which lacks the stand-in's CA.
        env = iam_environment(gateway, fresh_sts, dsql_database, 900, DB_AUTH="dsql", PGUSER="admin",
                              PGSSLROOTCERT="")
        with LiveServer(env) as live, httpx.Client(base_url=live.url, timeout=15) as client:
            response = client.get("/todos")
            assert response.status_code == 503 and response.headers["retry-after"]
            assert "PGSSLROOTCERT" in response.json()["detail"], response.text
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "PGSSLROOTCERT" in ready.json()["detail"]
        assert gateway.accepted == []  # no token was ever presented to an unverified server
