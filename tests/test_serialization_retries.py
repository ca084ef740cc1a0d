"""Serialization conflicts are retried: concurrent PATCHes of one todo at REPEATABLE READ (as
Aurora DSQL runs every transaction) all succeed, with a password and in DSQL mode.
"""

from __future__ import annotations

import concurrent.futures
from urllib.parse import urlsplit

import httpx
import pytest

from iam_support import (
    REGION,
    apply_postgres_schema,
    iam_environment,
)
from standins.aurora_gateway import AuroraGateway, moto_credentials_lookup, parse_upstream_url
from standins.sts import Sts
from support import LiveServer, clean_environment, create_database, drop_database, run_sql

pytestmark = pytest.mark.slow  # processes under contended writes, through the stand-in


@pytest.mark.parametrize("mode", ["password", "dsql"])
def test_conflicting_patches_all_succeed_through_retries(fresh_sts: Sts, embedded_postgres: str, mode: str):
    url = create_database(embedded_postgres)
    database = urlsplit(url).path.lstrip("/")
    try:
        # Aurora DSQL runs every transaction at REPEATABLE READ, with optimistic concurrency.
        run_sql(url, f"ALTER DATABASE \"{database}\" SET default_transaction_isolation = 'repeatable read'")
        if mode == "password":
            env = clean_environment(DATABASE_URL=url, DB_POOL_MAX="10")
            server, gateway = LiveServer(env), None
        else:
            apply_postgres_schema(url)
            gateway = AuroraGateway(
                *parse_upstream_url(url),
                max_token_age=900,
                region=REGION,
                mode="dsql",
                credentials_lookup=moto_credentials_lookup(),
                upstream_user="postgres",
            ).start()
            env = iam_environment(
                gateway, fresh_sts, url, 900, DB_AUTH="dsql", PGUSER="admin", DB_POOL_MAX="10"
            )
            server = LiveServer(env)
        with server, httpx.Client(base_url=server.url, timeout=15) as client:
            todo = client.post("/todos", json={"title": "contended"}).json()
            titles = [f"writer {i}" for i in range(30)]
            with concurrent.futures.ThreadPoolExecutor(15) as pool:
                results = list(
                    pool.map(
                        lambda title: client.patch(
                            f"/todos/{todo['id']}", json={"title": title, "completed": True}
                        ),
                        titles,
                    )
                )
            assert [r.status_code for r in results] == [200] * len(titles), [
                r.text for r in results if r.status_code != 200
            ]
            final = client.get(f"/todos/{todo['id']}").json()
            assert final["title"] in titles and final["completed"] is True
            assert final["updated_at"] == max(r.json()["updated_at"] for r in results)
            retried = [e for e in server.logs() if e["message"] == "retrying after a serialization conflict"]
            assert retried, "the workload produced no conflict, so it proves nothing"
    finally:
        if gateway is not None:
            gateway.stop()
        drop_database(embedded_postgres, url)
