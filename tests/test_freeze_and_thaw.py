"""A Vercel instance frozen between requests and thawed later, in IAM mode: its first request is
served, and answered fast even when the sockets it held died silently meanwhile.
"""

from __future__ import annotations

import signal
import time

import httpx
import pytest

from iam_support import (
    aurora,
    iam_environment,
    replacements,
)
from standins.sts import Sts
from support import LiveServer

pytestmark = pytest.mark.slow  # freezes a process past its token's life and past the thaw gap

THAW_GAP = 1.5  # db.THAW_GAP for the black-hole test's service (5 s in production)


def test_thawed_instance_serves_its_first_request(fresh_sts: Sts, embedded_database: str):
    ttl = 3
    with aurora(embedded_database, ttl) as gateway:
        env = iam_environment(gateway, fresh_sts, embedded_database, ttl)
        with LiveServer(env) as live, httpx.Client(base_url=live.url, timeout=15) as client:
            assert client.post("/todos", json={"title": "before the freeze"}).status_code == 201

            # A short freeze: the server's idle connections are dropped meanwhile.
            live.signal(signal.SIGSTOP)
            gateway.drop_connections()
            time.sleep(1)
            live.signal(signal.SIGCONT)
            assert client.get("/todos").status_code == 200

            # A freeze past the token's life: no timer fired, the connections are gone, and
            # the pool's token is too old to open new ones.
            before = replacements(live)
            live.signal(signal.SIGSTOP)
            gateway.drop_connections()
            time.sleep(ttl + 1.5)
            live.signal(signal.SIGCONT)
            first = client.get("/todos")
            assert first.status_code == 200, first.text
            assert "before the freeze" in first.text
            assert client.post("/todos", json={"title": "after the thaw"}).status_code == 201
            assert replacements(live) > before
            assert gateway.refused == []


def test_first_request_after_a_thaw_with_silently_dead_sockets_answers_fast(
    fresh_sts: Sts, embedded_database: str
):
    """While the instance is frozen, a NAT forgets its connections: no FIN, no RST, nothing.
    The first request after the thaw must not wait for a dead socket (it used to take the
    8 s deadline and answer 503). The gap after which idle connections are checked is
    shortened from db.THAW_GAP's 5 s to THAW_GAP: the freeze need only outlast it."""
    with aurora(embedded_database, 900) as gateway:
        env = iam_environment(gateway, fresh_sts, embedded_database, 900, DB_POOL_MIN="2")
        with (
            LiveServer(env, shortened={"db.THAW_GAP": THAW_GAP}) as live,
            httpx.Client(base_url=live.url, timeout=15) as client,
        ):
            assert client.post("/todos", json={"title": "before the black hole"}).status_code == 201
            assert client.get("/readyz").json()["pool"]["idle"] >= 1
            live.signal(signal.SIGSTOP)
            try:
                assert gateway.black_hole() >= 1
                time.sleep(THAW_GAP + 1)
            finally:
                live.signal(signal.SIGCONT)
            first = client.get("/todos")
            assert first.status_code == 200 and "before the black hole" in first.text, first.text
            assert first.elapsed.total_seconds() < 2.5, f"first request after the thaw took {first.elapsed}"
            assert client.post("/todos", json={"title": "after the thaw"}).status_code == 201
            messages = [entry["message"] for entry in live.logs()]
            assert "idle connections did not answer after a pause: replacing the pool" in messages
            assert gateway.refused == []
