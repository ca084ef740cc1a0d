"""A client's own `x-vercel-oidc-token` header cannot choose the service's AWS credentials.

Vercel's runtime (`vercel_runtime.headers.get_oidc_token_for_request`) keeps a request's
public `x-vercel-oidc-token` when it has one and appends the platform's token (from
`x-vercel-internal-oidc-token`) only when it has not, so a client's header reaches the app as
"the request's OIDC token". Here the platform stand-in (standins/vercel_harness.py) sends
both headers on the attacker's requests, through the real runtime; STS is the moto stand-in,
which refuses any token the issuer (standins/oidc_issuer.py) did not sign, as real STS does;
Aurora is the IAM gateway in front of the embedded PostgreSQL.

Credentials live 15 s, inside botocore's mandatory refresh window, so every new IAM token
needs STS, and the platform's token rotates every 3 s.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from standins.vercel_harness import NO_VERCEL_RUNTIME

if NO_VERCEL_RUNTIME:  # named on the command line; a whole run leaves the module out (conftest)
    pytest.skip(NO_VERCEL_RUNTIME, allow_module_level=True)
try:  # only the package root: importing vercel_runtime.vc_init would start a server
    importlib.import_module("vercel_runtime")
except ImportError as error:
    pytest.skip(f"vercel-runtime cannot be imported: {error}", allow_module_level=True)

from iam_support import aurora, vercel_iam_environment  # noqa: E402
from standins.aurora_gateway import AuroraGateway  # noqa: E402
from standins.oidc_issuer import ISSUER, IssuerHost, claims_of, forged_token  # noqa: E402
from standins.sts import Sts  # noqa: E402
from standins.vercel_harness import VercelRuntime  # noqa: E402
from support import free_port  # noqa: E402

pytestmark = pytest.mark.slow

TTL = 3  # the timer replaces the pool 2.1 s after the second its token is dated; it expires at 2.85 s
ROTATION = 3.0  # seconds between two platform tokens
HONEST_RATE, ATTACK_RATE = 8, 40  # requests per second


@contextmanager
def vercel_service(
    database_url: str, sts: Sts, keys: IssuerHost | None = None
) -> Iterator[tuple[VercelRuntime, AuroraGateway]]:
    """The service in IAM mode under Vercel's runtime, Aurora's IAM front door before it.

    With `keys`, Vercel's key set is reachable (the issuer stand-in, through a proxy);
    without, the proxy is a closed port: the service cannot fetch it, as if offline.
    """
    offline = {"HTTPS_PROXY": f"http://127.0.0.1:{free_port()}", "NO_PROXY": "127.0.0.1,localhost"}
    with aurora(database_url, TTL) as gateway:
        proxy = keys.environment() if keys is not None else offline
        env = vercel_iam_environment(gateway, sts, database_url, TTL, **proxy)
        with VercelRuntime(env=env) as runtime:
            yield runtime, gateway


class Platform:
    """Vercel's side of the token: a new one every ROTATION seconds, as `current`."""

    def __init__(self) -> None:
        self.tokens = [ISSUER.token()]
        self._minted = time.monotonic()
        self._lock = threading.Lock()

    @property
    def current(self) -> str:
        with self._lock:
            if time.monotonic() - self._minted >= ROTATION:
                self.tokens.append(ISSUER.token())
                self._minted = time.monotonic()
            return self.tokens[-1]


def messages(runtime: VercelRuntime) -> list[tuple[int, str]]:
    """(index among the runtime's logs, message) of every JSON log line the service wrote."""
    found = []
    for index, line in enumerate(runtime.logs):
        try:
            entry = json.loads(line.text)
        except ValueError:
            continue
        if isinstance(entry, dict):
            found.append((index, str(entry.get("message", ""))))
    return found


def paced(rate: float, until: float, send: Callable[[], None]) -> None:
    """Call `send()` `rate` times a second until `until` (time.monotonic())."""
    period = 1 / rate
    next_at = time.monotonic()
    while next_at < until:
        send()
        next_at += period
        time.sleep(max(0.0, next_at - time.monotonic()))


@pytest.mark.parametrize("key_set", ["reachable", "unreachable"])
def test_forged_header_tokens_at_five_times_the_honest_rate_cost_no_honest_request(
    fresh_sts: Sts, embedded_database: str, key_set: str
):
    """Whether or not the service can fetch the issuer's keys, forgeries cost no honest
    request, no replacement, and never two STS calls for one token. With the keys, one
    forgery reaches STS (it is what makes the service fetch them) and the platform's newer
    tokens are adopted during the attack; without, each forgery that is the newest token when
    a replacement starts reaches STS once, and the refresh falls back at once."""
    fresh_sts.credential_lifetime = 15  # inside botocore's mandatory refresh window
    platform = Platform()
    forged: list[str] = []
    honest: list[int] = []
    lock = threading.Lock()
    with contextlib.ExitStack() as stack:
        keys = stack.enter_context(IssuerHost()) if key_set == "reachable" else None
        runtime, gateway = stack.enter_context(vercel_service(embedded_database, fresh_sts, keys))
        assert runtime.request("GET", "/todos", oidc_token=platform.current).status == 200
        attack_started = time.time()
        start = time.monotonic()
        since = len(runtime.logs)
        attack_for = 10.0

        def honest_request() -> None:
            status = runtime.request("GET", "/todos?limit=5", oidc_token=platform.current).status
            with lock:
                honest.append(status)

        def attacker_request() -> None:
            token = forged_token()
            with lock:
                forged.append(token)
            # The platform adds its own token as usual; the client's header wins in the runtime.
            runtime.request(
                "GET", "/todos?limit=1", oidc_token=platform.current, headers={"x-vercel-oidc-token": token}
            )

        until = start + attack_for
        threads = [
            threading.Thread(target=paced, args=(HONEST_RATE / 2, until, honest_request)) for _ in range(2)
        ]
        threads += [
            threading.Thread(target=paced, args=(ATTACK_RATE / 5, until, attacker_request)) for _ in range(5)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - start
        runtime.wait_idle(15)

        # Every honest request answered 2xx, at the honest rate (the attack did not slow it down).
        assert len(honest) >= HONEST_RATE * attack_for * 0.8, f"only {len(honest)} honest requests"
        assert [status for status in honest if not 200 <= status < 300] == []
        assert len(forged) >= ATTACK_RATE * attack_for * 0.6, f"only {len(forged)} forged tokens sent"

        # Replacements kept their schedule: none failed, and no pool outlived its token.
        logged = [message for index, message in messages(runtime) if index >= since]
        assert "pool replacement failed" not in logged
        replaced = logged.count("pool replaced")
        assert replaced >= elapsed / (0.7 * TTL) - 2, f"{replaced} replacements in {elapsed:.1f} s"

        # STS saw forged tokens (the attack reached it), never one twice, and at most two calls
        # (the forged token and the fallback) per new IAM token.
        presented = Counter(fresh_sts.presented)
        forged_presented = {token: n for token, n in presented.items() if token in set(forged)}
        assert forged_presented, "no forged token reached STS: the test proves nothing"
        assert max(forged_presented.values()) == 1
        assert set(fresh_sts.refused) == set(forged_presented)  # every refusal was a forgery
        everything = [message for _, message in messages(runtime)]
        new_tokens = everything.count("pool created") + everything.count("pool replaced")
        assert fresh_sts.attempts <= 2 * new_tokens, f"{fresh_sts.attempts} STS calls for {new_tokens} tokens"
        assert gateway.refused == []
        if keys is not None:
            assert keys.fetched == ["/acme/.well-known/jwks"]
            # More than one means the service went on without the keys: the fetch failed or
            # took longer than auth.JWKS_TIMEOUT, and the next is a minute away.
            fetches = [line.text for line in runtime.logs if "key set" in line.text]
            assert len(forged_presented) == 1, f"{len(forged_presented)} forged tokens reached STS; {fetches}"
            assert [json.loads(line)["message"] for line in fetches] == [
                "the OIDC issuer's key set was fetched"
            ]
            # The platform kept rotating its token, and the service kept up despite the forgeries.
            adopted = {
                token
                for token in fresh_sts.web_identity_tokens
                if claims_of(token)["iat"] >= attack_started - 1
            }
            assert len(adopted) >= 2, f"{len(adopted)} platform tokens adopted during the attack"


def test_a_validly_signed_token_of_another_project_is_never_presented(fresh_sts: Sts, embedded_database: str):
    fresh_sts.credential_lifetime = 15
    platform = Platform()
    with vercel_service(embedded_database, fresh_sts) as (runtime, gateway):
        assert runtime.request("GET", "/todos", oidc_token=platform.current).status == 200
        since = len(runtime.logs)
        sent: list[str] = []

        def foreign_request() -> None:
            # Newer than the platform's, signed by the same issuer: only the subject differs.
            token = ISSUER.token(subject="owner:acme:project:billing:environment:production")
            sent.append(token)
            status = runtime.request(
                "GET", "/todos", oidc_token=platform.current, headers={"x-vercel-oidc-token": token}
            ).status
            assert status == 200

        paced(10, time.monotonic() + 2.5 * TTL, foreign_request)
        runtime.wait_idle(15)
        assert [m for i, m in messages(runtime) if i >= since].count("pool replaced") >= 2
        assert len(set(sent) & set(fresh_sts.presented)) == 0  # a count: never print a token
        assert fresh_sts.refused == [] and gateway.refused == []


def test_after_a_thousand_forged_tokens_the_services_secrets_are_still_redacted(
    fresh_sts: Sts, embedded_database: str
):
    fresh_sts.credential_lifetime = 15
    platform = Platform()
    with vercel_service(embedded_database, fresh_sts) as (runtime, _):
        assert runtime.request("GET", "/todos", oidc_token=platform.current).status == 200
        tokens = [forged_token() for _ in range(1000)]
        batches = [tokens[i::8] for i in range(8)]

        def flood(batch: list[str]) -> None:
            for token in batch:
                runtime.request(
                    "GET",
                    "/todos?limit=1",
                    oidc_token=platform.current,
                    headers={"x-vercel-oidc-token": token},
                )

        threads = [threading.Thread(target=flood, args=(batch,)) for batch in batches]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        runtime.wait_idle(15)

        # The service's own secrets now: its STS keys and the OIDC token STS last accepted.
        secret_key, session_token = fresh_sts.secrets()[-2:]
        adopted = fresh_sts.web_identity_tokens[-1]
        since = len(runtime.logs)
        for secret in (secret_key, session_token, adopted):
            # A path is logged as sent: the request line carries the secret unless redaction knows it.
            # An AWS secret key may hold "/" and end with one: Starlette would redirect that path,
            # and on Vercel a redirect writes no request line. The suffix keeps every one a 404.
            status = runtime.request("GET", f"/todos/{secret}-", oidc_token=platform.current).status
            assert status == 404
        runtime.wait_idle(15)
        lines = [line.text for line in runtime.logs[since:]]
        request_lines = [line for line in lines if '"message":"request"' in line.replace(" ", "")]
        assert len(request_lines) >= 3 and all("[redacted]" in line for line in request_lines[-3:])
        output = runtime.output()
        leaked = [
            name
            for name, secret in (
                ("STS secret key", secret_key),
                ("STS session token", session_token),
                ("adopted OIDC token", adopted),
            )
            if secret in output
        ]
        assert leaked == []  # names only: never print a secret, even a test one
