"""IAM mode in tests: Vercel-shaped OIDC tokens, Aurora's IAM front door (the Aurora stand-in)
before a database, the service's environment for it, and the soak that drives it.

- `aurora(database_url, ttl)`: `AuroraGateway` (standins/aurora_gateway.py) in front of
  `database_url`, checking SigV4 tokens against the credentials moto's STS issued.
- `iam_environment(gateway, sts, database_url, ttl)`: the service's environment behind it;
  `vercel_iam_environment(…)` the same under Vercel's runtime, where requests carry the OIDC token.
- `soak(live, workers, replaced=n)`: clients create, read, complete and list todos until the
  pool has been replaced n times; nothing lost. `ready_after_soak(live, auth, ttl, n)`: what
  /readyz says then.
- `assert_no_secrets(texts, sts, env)`: no token or STS secret anywhere in `texts`.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx

from standins.aurora_gateway import AuroraGateway, moto_credentials_lookup, parse_upstream_url
from standins.oidc_issuer import ISSUER
from standins.sts import Sts
from support import LiveServer, clean_environment, run_sql

ROLE_ARN = "arn:aws:iam::123456789012:role/aurora-todo"
REGION = "us-east-1"


def oidc_token(
    lifetime: float = 3600, subject: str = "owner:acme:project:todo:environment:production"
) -> str:
    """A token as Vercel's platform mints it, signed by the issuer STS trusts (standins/oidc_issuer.py)."""
    return ISSUER.token(lifetime, subject)


@contextmanager
def aurora(database_url: str, ttl: float, mode: str = "iam", **options):
    host, port = parse_upstream_url(database_url)
    with AuroraGateway(
        host,
        port,
        max_token_age=ttl,
        region=REGION,
        mode=mode,
        credentials_lookup=moto_credentials_lookup(),
        **options,
    ) as gateway:
        yield gateway


def iam_settings(gateway: AuroraGateway, sts: Sts, database_url: str, ttl: int) -> dict[str, str]:
    """What the service is configured with for IAM mode behind `gateway`, wherever it runs:
    the database, the role to assume through `sts`, the stand-in's CA, the token TTL, the pool."""
    assert gateway.ca_file, "the service verifies the stand-in's certificate (PGSSLROOTCERT)"
    return {
        "PGHOST": "127.0.0.1",
        "PGPORT": str(gateway.port),
        "PGUSER": "postgres",
        "PGDATABASE": urlsplit(database_url).path.lstrip("/"),
        "DB_AUTH": "iam",
        "AWS_ROLE_ARN": ROLE_ARN,
        "AWS_ENDPOINT_URL_STS": sts.url,
        "AWS_EC2_METADATA_DISABLED": "true",
        "PGSSLROOTCERT": gateway.ca_file,
        "DB_TOKEN_TTL": str(ttl),
        "DB_POOL_MIN": "1",
        "DB_POOL_MAX": "6",
    }


def iam_environment(gateway: AuroraGateway, sts: Sts, database_url: str, ttl: int, **overrides: str) -> dict:
    """The service's environment for IAM mode behind `gateway`, as a process of this machine
    (the OIDC token in VERCEL_OIDC_TOKEN); `overrides` win."""
    settings = {
        **iam_settings(gateway, sts, database_url, ttl),
        "AWS_REGION": REGION,
        "VERCEL_OIDC_TOKEN": oidc_token(),
    }
    return clean_environment(**{**settings, **overrides})


def vercel_iam_environment(
    gateway: AuroraGateway, sts: Sts, database_url: str, ttl: int, **extra: str
) -> dict[str, str]:
    """The service's environment for IAM mode behind `gateway` under Vercel's runtime
    (standins/vercel_harness.py), at LOG_LEVEL=info, with `extra`.

    The harness adds VERCEL=1, AWS_REGION and the rest of a Vercel function's environment and
    nothing from this process, and there is no VERCEL_OIDC_TOKEN: the only OIDC tokens are
    those the requests carry, as on Vercel.
    """
    env = {**iam_settings(gateway, sts, database_url, ttl), "LOG_LEVEL": "info", **extra}
    assert "VERCEL_OIDC_TOKEN" not in env
    return env


def apply_postgres_schema(url: str) -> None:
    """The schema in PostgreSQL's dialect, for DSQL-mode tests here: the IAM gateway relays SQL
    unchanged (it cannot run CREATE INDEX ASYNC); DSQL's SQL surface is tests/standins/dsql_gateway.py's."""
    import db

    run_sql(url, db.CREATE_TABLE, *db.CREATE_INDEXES)


def assert_no_secrets(texts: list[str], sts: Sts, env: dict) -> None:
    """No OIDC token, STS secret, session token or database token anywhere in `texts`."""
    secrets = [env["VERCEL_OIDC_TOKEN"], *sts.secrets()]
    for text in texts:
        for secret in secrets:
            assert secret not in text
        for shape in (
            "X-Amz-Signature",
            "X-Amz-Security-Token",
            "Amz-Credential",
            "Action=connect",
            "Action=DbConnect",
        ):
            assert shape not in text


def replacements(live: LiveServer) -> int:
    return sum(1 for entry in live.logs() if entry["message"] == "pool replaced")


def soak(live: LiveServer, workers: int, *, replaced: int, within: float = 40.0) -> list[str]:
    """`workers` clients create, read, complete and list todos until the service has replaced
    its pool `replaced` times (the soak lasts as long as its bound needs, no longer); failing
    if that takes more than `within` seconds.

    Every answer must be the one expected (none is retried here), and afterwards every todo
    created must read back completed. Returns the ids created.
    """
    failures: list[str] = []
    created: list[str] = []
    lock = threading.Lock()
    done = threading.Event()
    give_up = time.monotonic() + within

    def enough() -> None:
        while not done.wait(0.25):
            if replacements(live) >= replaced or time.monotonic() > give_up:
                done.set()

    def worker(n: int) -> None:
        with httpx.Client(base_url=live.url, timeout=15) as client:
            i = 0
            while not done.is_set():
                i += 1
                made = client.post("/todos", json={"title": f"soak {n}-{i}"})
                steps = [(made, 201)]
                if made.status_code == 201:
                    todo_id = made.json()["id"]
                    with lock:
                        created.append(todo_id)
                    steps.append((client.get(f"/todos/{todo_id}"), 200))
                    steps.append((client.patch(f"/todos/{todo_id}", json={"completed": True}), 200))
                steps.append((client.get("/todos", params={"limit": 5}), 200))
                for response, wanted in steps:
                    if response.status_code != wanted:
                        with lock:
                            failures.append(
                                f"{response.request.method} {response.request.url.path}"
                                f" -> {response.status_code} {response.text[:200]}"
                            )

    with concurrent.futures.ThreadPoolExecutor(workers + 1) as pool:
        watcher = pool.submit(enough)
        list(pool.map(worker, range(workers)))
        watcher.result()

    assert replacements(live) >= replaced, f"only {replacements(live)} replacements in {within} s"
    assert failures == [], "\n".join(failures[:20])
    with httpx.Client(base_url=live.url, timeout=15) as client:
        for todo_id in created:
            got = client.get(f"/todos/{todo_id}")
            assert got.status_code == 200 and got.json()["completed"] is True
    return created


def ready_after_soak(live: LiveServer, auth: str, ttl: int, replaced: int) -> dict:
    """/readyz once a soak is over: it names the auth mode `auth` and tokens of `ttl` seconds,
    and the pool has been replaced at least `replaced` times. The report, for a secrets check."""
    with httpx.Client(base_url=live.url, timeout=15) as client:
        ready = client.get("/readyz").json()
    assert ready["auth"] == auth and ready["token"]["ttl_seconds"] == ttl
    assert replacements(live) >= replaced, f"only {replacements(live)} replacements"
    return ready
