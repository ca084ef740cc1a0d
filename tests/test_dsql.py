"""Aurora DSQL as it really is: what the service does about each way DSQL differs.

Aurora DSQL is played by the DSQL stand-in (tests/standins/dsql_gateway.py): TLS with its own CA,
tokens checked as DbConnectAdmin / DbConnect against the credentials moto's STS issued
(tokens signed by expired credentials refused), DSQL's SQL surface enforced, conflicts
injected, connection age and rate capped, in front of a real PostgreSQL. Every test here
ends by asserting that the stand-in refused none of the service's statements.
"""

from __future__ import annotations

import concurrent.futures
import time

import asyncpg
import httpx
import pytest

import db
from dsql_support import ROLE, SCHEMA, dsql_environment, dsql_service, dsql_stand_in, ensure_role
from iam_support import assert_no_secrets, ready_after_soak, replacements, soak
from standins.sts import Sts
from support import LiveServer, create_database, drop_database


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.SerializationError("change conflicts with another transaction, please retry: (OC000)"),
        asyncpg.InternalServerError("change conflicts with another transaction, please retry: (OC000)"),
        asyncpg.InternalServerError("schema has been updated by another transaction, please retry: (OC001)"),
        asyncpg.SerializationError("could not serialize access due to concurrent update"),
    ],
)
def test_conflicts_are_known_by_sqlstate_or_by_their_code_in_the_message(error):
    assert db.is_conflict(error)


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.InternalServerError("something else broke"),
        asyncpg.UniqueViolationError("duplicate key value violates unique constraint (OC0001x)"),
        ValueError("(OC000)"),
    ],
)
def test_other_errors_are_not_conflicts(error):
    assert not db.is_conflict(error)


# --- the soak across replacements, as admin and as a role, conflicts injected ------------


@pytest.mark.slow  # a soak across token lifetimes
@pytest.mark.parametrize("role", [False, True], ids=["admin", "role"])
def test_soak_across_replacements_with_conflicts_loses_nothing(
    fresh_sts: Sts, embedded_postgres: str, role: bool
):
    ttl, workers = 3, 8
    url = create_database(embedded_postgres)
    ensure_role(embedded_postgres)
    try:
        with dsql_service(url, fresh_sts, role=role, ttl=ttl, DB_POOL_MAX="3") as (live, gateway):
            created = soak(live, workers, replaced=2)
            assert len(created) > 30
            ready = ready_after_soak(live, "dsql", ttl, replaced=2)
            assert gateway.refused == []  # every token presented was accepted
            actions = {a.action for a in gateway.accepted if a.user != "admin" or not role}
            assert actions == {"DbConnect" if role else "DbConnectAdmin"}
            assert_no_secrets([live.logs_text(), str(ready)], fresh_sts, live.env)
        # dsql_service asserted on the way out: no statement refused, conflicts injected
        # under 40001 and XX000, and each met by exactly one retry.
    finally:
        drop_database(embedded_postgres, url)


# --- tokens, TLS, connection limits ----------------------------------------------------


@pytest.mark.slow  # runs past the credentials' expiry
def test_pool_never_outlives_the_credentials_that_signed_its_token(fresh_sts: Sts, embedded_database: str):
    # DSQL accepts this TTL, but the credentials that sign the token last 8 s: a token is
    # worthless once they expire, so the pool must be replaced before then.
    fresh_sts.credential_lifetime = 8
    with dsql_stand_in(embedded_database, conflict_rate=0.0) as gateway:
        env = dsql_environment(gateway, fresh_sts, embedded_database, user="admin", ttl=3600)
        with LiveServer(env) as live, httpx.Client(base_url=live.url, timeout=15) as client:
            assert client.post("/todos", json={"title": "signed by short-lived keys"}).status_code == 201
            left = client.get("/readyz").json()["token"]["seconds_left"]
            assert left <= 8, left
            stop_at = time.monotonic() + left + 1.5  # past the first credentials' expiry
            while time.monotonic() < stop_at:
                # Dropped connections make the pool open new ones, presenting its token.
                gateway.drop_connections()
                response = client.get("/todos")
                assert response.status_code == 200, response.text
                time.sleep(1.0)
            assert replacements(live) >= 1
            # An attempt given up mid-handshake (its pool closed while reopening a dropped
            # connection, or its connect timeout passed on a loaded machine) hangs up before it
            # sends a token: it presents nothing, expired or not.
            presented = [a for a in gateway.refused if a.reason != "no password sent"]
            assert presented == [], presented


@pytest.mark.slow  # a process behind the stand-in
def test_certificate_that_does_not_verify_is_a_503_naming_PGSSLROOTCERT(
    fresh_sts: Sts, embedded_database: str
):
    with dsql_stand_in(embedded_database, conflict_rate=0.0) as gateway:
        # No CA bundle: verify-full against the system trust store, which lacks the stand-in's CA.
        env = dsql_environment(gateway, fresh_sts, embedded_database, user="admin", PGSSLROOTCERT="")
        with LiveServer(env) as live, httpx.Client(base_url=live.url, timeout=15) as client:
            response = client.get("/todos")
            assert response.status_code == 503 and response.headers["retry-after"]
            assert "PGSSLROOTCERT" in response.json()["detail"], response.text
            ready = client.get("/readyz")
            assert ready.status_code == 503 and "PGSSLROOTCERT" in ready.json()["detail"]
        assert gateway.accepted == []  # no token was ever presented to an unverified server


@pytest.mark.slow  # a connection rate, waited out
def test_new_connections_refused_by_rate_are_waited_for_not_failed(fresh_sts: Sts, embedded_database: str):
    # 2 new connections a second: a burst of requests that needs more connections meets 53400.
    with dsql_stand_in(
        embedded_database, conflict_rate=0.0, connection_rate=2.0, connection_burst=2
    ) as gateway:
        env = dsql_environment(gateway, fresh_sts, embedded_database, user="admin", DB_POOL_MAX="10")
        with LiveServer(env) as live, httpx.Client(base_url=live.url, timeout=15) as client:
            assert client.get("/todos").status_code == 200
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                results = list(
                    pool.map(lambda i: client.post("/todos", json={"title": f"burst {i}"}), range(48))
                )
            assert [r.status_code for r in results] == [201] * 48, [
                r.text for r in results if r.status_code != 201
            ][:3]
            rate_refusals = [a for a in gateway.refused if a.reason == "connection rate exceeded"]
            assert rate_refusals, "no connection was refused: the burst proves nothing"
            retried = [e for e in live.logs() if e["message"] == "retrying after a refused connection"]
            assert retried


@pytest.mark.slow  # connections aged out, for seconds
def test_connections_closed_at_their_maximum_age_cost_no_request(fresh_sts: Sts, embedded_database: str):
    with dsql_stand_in(embedded_database, conflict_rate=0.0, max_connection_age=1.5) as gateway:
        env = dsql_environment(gateway, fresh_sts, embedded_database, user="admin")
        with LiveServer(env) as live, httpx.Client(base_url=live.url, timeout=15) as client:
            stop_at = time.monotonic() + 6
            while time.monotonic() < stop_at:
                response = client.get("/todos")
                assert response.status_code == 200, response.text
                time.sleep(0.25)
        assert gateway.aged_out >= 2


@pytest.mark.slow  # a process behind the stand-in
def test_a_role_without_its_schema_gets_a_503_naming_DB_SCHEMA(fresh_sts: Sts, embedded_postgres: str):
    url = create_database(embedded_postgres)
    ensure_role(embedded_postgres)
    try:
        with dsql_stand_in(url, conflict_rate=0.0) as gateway:
            env = dsql_environment(gateway, fresh_sts, url, user=ROLE, schema=SCHEMA)
            with LiveServer(env) as live, httpx.Client(base_url=live.url, timeout=15) as client:
                response = client.get("/todos")
                assert response.status_code == 503 and "DB_SCHEMA" in response.json()["detail"], response.text
                assert "migrate" in response.json()["detail"]
    finally:
        drop_database(embedded_postgres, url)
