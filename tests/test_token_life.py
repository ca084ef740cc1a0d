"""An IAM token's life counts from the second it is dated, as AWS counts it.

SigV4 dates a token to the whole second (X-Amz-Date), and AWS counts its life from there: a
token signed at 12:00:00.9 is already 0.9 s old. A pool that counted DB_TOKEN_TTL from its
own clock would present such a token for up to a second past its life.

In process, with long-term keys (no STS), against the Aurora stand-in in front of the
embedded PostgreSQL, which refuses a token older than DB_TOKEN_TTL by its date. The pool is
made late in a second; its connections are dropped once its token, by its date, has lived
DB_TOKEN_TTL, but before the pool would be replaced were its life counted from the clock; the
request that follows must present a token the stand-in accepts.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import pytest

import db
from standins.aurora_gateway import AuroraGateway, parse_upstream_url
from support import clean_environment

pytestmark = pytest.mark.slow  # waits for a token's life, aligned on the clock's seconds

TTL = 2  # DB_TOKEN_TTL: counted from the clock, the pool would be replaced 1.4 s after it was made
LATE_IN_ITS_SECOND = 0.85  # when the pool is made: its token is dated 0.85 s before the clock
AKID, SECRET = "AKIATOKENLIFE0000001", "token-life-secret"


async def made_late_in_a_second(gateway: AuroraGateway) -> float | None:
    """Make the pool late in a second; the second its token is dated, if the clock did not
    pass into the next one while it was made."""
    await asyncio.sleep((LATE_IN_ITS_SECOND - time.time() % 1) % 1)
    asked = time.time()
    ready, report = await db.readiness()
    assert ready, report
    (accepted,) = gateway.accepted[-1:]
    assert accepted.age is not None
    dated = round(accepted.at - accepted.age)  # the stand-in's age counts from X-Amz-Date
    return dated if dated == math.floor(asked) and asked - dated >= LATE_IN_ITS_SECOND - 0.05 else None


async def request_past_the_token_life_by_its_date(gateway: AuroraGateway) -> None:
    ready, report = await db.readiness()  # the first pool pays for imports and the schema check
    assert ready, report
    await db.lifecycle.close()
    for _ in range(8):  # a loaded machine may make the pool in the next second: again
        dated = await made_late_in_a_second(gateway)
        if dated is not None:
            break
        await db.lifecycle.close()
    assert dated is not None, "the pool was never made late in a second: the test proves nothing"
    # By its date the token has lived TTL; counted from the clock, the pool would not even
    # be due for replacement yet (0.7 × TTL after it was made).
    await asyncio.sleep(dated + TTL + 0.1 - time.time())
    assert gateway.drop_connections() >= 1
    await asyncio.sleep(0.05)  # the service has seen its connections close
    answered = await asyncio.gather(db.list_todos(1, None, None), return_exceptions=True)
    assert gateway.refused == [], [(a.reason, round(a.age or 0, 2)) for a in gateway.refused]
    assert answered == [[]], answered


def long_term_keys_environment(gateway: AuroraGateway, embedded_database: str) -> dict[str, str]:
    """IAM mode through the stand-in, signed with long-term keys, DB_TOKEN_TTL=TTL, one connection."""
    return clean_environment(
        DB_AUTH="iam",
        PGHOST=gateway.host,
        PGPORT=str(gateway.port),
        PGUSER="postgres",
        PGDATABASE=urlsplit(embedded_database).path.lstrip("/"),
        PGSSLMODE="disable",
        AWS_REGION="us-east-1",
        AWS_ACCESS_KEY_ID=AKID,
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_EC2_METADATA_DISABLED="true",
        DB_TOKEN_TTL=str(TTL),
        DB_POOL_MIN="1",
        DB_POOL_MAX="1",
    )


def serve_in_process(
    embedded_database: str,
    monkeypatch: pytest.MonkeyPatch,
    scenario: Callable[[AuroraGateway], Awaitable[None]],
) -> None:
    """Run `scenario(gateway)` against a fresh pool lifecycle in this process, in IAM mode."""

    async def run() -> None:
        with AuroraGateway(
            *parse_upstream_url(embedded_database),
            max_token_age=TTL,
            tls=False,
            credentials_lookup={AKID: SECRET},
        ) as gateway:
            for key in list(os.environ):
                monkeypatch.delenv(key)
            for key, value in long_term_keys_environment(gateway, embedded_database).items():
                monkeypatch.setenv(key, value)
            try:
                await scenario(gateway)
            finally:
                await db.lifecycle.close()

    monkeypatch.setattr(db, "lifecycle", db.PoolLifecycle())
    asyncio.run(run())


def test_a_token_is_never_presented_past_its_life_counted_from_the_second_it_is_dated(
    embedded_database: str, monkeypatch: pytest.MonkeyPatch
):
    serve_in_process(embedded_database, monkeypatch, request_past_the_token_life_by_its_date)


def test_a_pool_held_past_its_token_life_opens_no_connection(
    embedded_database: str, monkeypatch: pytest.MonkeyPatch
):
    """A pool past its token's life, before its replacement (an instance frozen past it, whose
    timer never fired), opens no connection: the token is refused before it is presented, and
    before a connection is opened (asyncpg asks for the password first)."""
    monkeypatch.setattr(db, "REFRESH_AT", 2.0)  # the timer fires long after the token's life

    async def past_its_life(gateway: AuroraGateway) -> None:
        pool = await db.lifecycle.pool()
        await asyncio.sleep(TTL + 0.1)  # past the token's life by the clock and by its date
        assert gateway.drop_connections() >= 1  # its idle connection: the next one is new
        await asyncio.sleep(0.1)  # the pool has seen it close
        with pytest.raises(db.TokenExpired):
            async with pool.acquire() as connection:
                await connection.fetchval("SELECT 1")
        await asyncio.sleep(0.1)
        assert gateway.refused == [], [a.reason for a in gateway.refused]

    serve_in_process(embedded_database, monkeypatch, past_its_life)
