"""A request's `x-vercel-oidc-token` header is untrusted input (auth.OidcTokens).

Vercel's runtime lets a client's own header win over the platform's token, so what a header
carries is only ever a candidate: these tests drive the candidate book directly, as the
service does (`observe` per request, `first`/`fallback` per STS refresh, and what STS said).
Through the real runtime, under attack, see test_forged_oidc_headers_on_vercel.py.
"""

from __future__ import annotations

import base64
import json
import logging
import queue
import sys
import time
from logging.handlers import QueueHandler

import pytest

import auth
import db
from standins.oidc_issuer import ISSUER, SUBJECT, Issuer, forged_token, jwks

SDK_TOKEN = ISSUER.token(lifetime=3600, issued_at=time.time() - 600)


def offline(url: str) -> bytes:
    raise OSError("no network in this test")


def book(
    sdk_token: str | None = SDK_TOKEN,
    environment: str | None = "production",
    project_id: str | None = None,
    baseline: str | None = None,
    fetch_jwks=offline,
) -> auth.OidcTokens:
    return auth.OidcTokens(baseline, environment, project_id, lambda: sdk_token, fetch_jwks)


def assert_not_a_candidate(token: str) -> auth.OidcTokens:
    """A new book that has seen `token` still presents the SDK's own token: `token` is no
    candidate. The book, for a test that goes on with it."""
    tokens = book()
    tokens.observe(token)
    assert tokens.first() == SDK_TOKEN
    return tokens


def presented_and_rejected(tokens: auth.OidcTokens, forged: str) -> None:
    """`forged` arrives in a request's header, is the candidate the next refresh presents to
    STS, and STS rejects it."""
    tokens.observe(forged)
    assert tokens.first() == forged
    tokens.rejected(forged)


class KeySet:
    """The issuer's JWKS endpoint, as the service fetches it: records every URL asked for."""

    def __init__(self, *issuers: Issuer) -> None:
        self.issuers = issuers or (ISSUER,)
        self.fetched: list[str] = []

    def __call__(self, url: str) -> bytes:
        self.fetched.append(url)
        return jwks(*self.issuers)


def unsigned(header: object, claims: object, signature: str = "c2lnbmF0dXJlLXNpZ25hdHVyZQ") -> str:
    def part(value: object) -> str:
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    return f"{part(header)}.{part(claims)}.{signature}" if signature else f"{part(header)}.{part(claims)}."


def claims(**overrides: object) -> dict:
    now = int(time.time())
    return {
        "iss": "https://oidc.vercel.com/acme",
        "aud": "https://vercel.com/acme",
        "sub": SUBJECT,
        "iat": now,
        "exp": now + 3600,
        **overrides,
    }


RS256 = {"alg": "RS256", "typ": "JWT", "kid": "vercel-oidc-1"}


@pytest.mark.parametrize(
    "token",
    [
        "not a token",
        "a.b",
        "a.b.c.d",
        "eyJ@.eyJ.sig",
        "..",
        unsigned(b"not json", claims()),
        unsigned({"alg": "none", "typ": "JWT"}, claims(), signature=""),
        unsigned({"alg": "none", "typ": "JWT"}, claims()),
        unsigned({"alg": "HS256", "typ": "JWT"}, claims()),
        unsigned(RS256, [1, 2, 3]),
        unsigned(RS256, {k: v for k, v in claims().items() if k != "iss"}),
        unsigned(RS256, claims(sub="")),
        unsigned(RS256, claims(iat="yesterday")),
        unsigned(RS256, claims(exp=True)),
        unsigned(RS256, claims(aud=["https://vercel.com/acme"])),
        unsigned(RS256, claims(jti="x" * 9000)),
    ],
    ids=[
        "text",
        "two parts",
        "four parts",
        "not base64url",
        "empty parts",
        "header not json",
        "alg none",
        "alg none signed",
        "hs256",
        "claims not an object",
        "no issuer",
        "empty subject",
        "iat a string",
        "exp a boolean",
        "audience a list",
        "oversized",
    ],
)
def test_a_malformed_header_token_is_never_a_candidate(token: str):
    assert_not_a_candidate(token)


@pytest.mark.parametrize(
    "token",
    [
        ISSUER.token(lifetime=-1),
        ISSUER.token(lifetime=10 * 365 * 86400),
        ISSUER.token(lifetime=7200, issued_at=time.time() + 3600),
    ],
    ids=["expired", "exp ten years away", "issued an hour from now"],
)
def test_an_expired_or_implausibly_timed_token_is_never_a_candidate(token: str):
    assert_not_a_candidate(token)


def test_a_token_in_its_last_minutes_is_still_a_candidate():
    tokens = book()
    token = ISSUER.token(lifetime=600)
    tokens.observe(token)
    assert tokens.first() == token


@pytest.mark.parametrize(
    "token",
    [
        ISSUER.token(subject="owner:acme:project:todo:environment:preview"),
        ISSUER.token(subject="owner:acme:project:todo:environment:production", team="other"),
        ISSUER.token(iss="https://oidc.vercel.com/other"),
        ISSUER.token(iss="https://oidc.vercel.com.evil.example/acme"),
        ISSUER.token(aud="https://vercel.com/other"),
        ISSUER.token(sub="repo:acme/todo:ref:refs/heads/main"),
    ],
    ids=[
        "another environment",
        "another team's subject",
        "another team's issuer",
        "lookalike issuer",
        "another audience",
        "not a Vercel subject",
    ],
)
def test_before_any_acceptance_only_this_deployments_vercel_claims_are_candidates(token: str):
    tokens = assert_not_a_candidate(token)
    good = ISSUER.token()
    tokens.observe(good)
    assert tokens.first() == good


def test_the_global_issuer_and_this_project_id_are_accepted_and_another_project_id_is_not():
    tokens = book(project_id="prj_todo")
    tokens.observe(ISSUER.token(project_id="prj_other"))
    assert tokens.first() == SDK_TOKEN
    token = ISSUER.token(iss="https://oidc.vercel.com", project_id="prj_todo")
    tokens.observe(token)
    assert tokens.first() == token


def test_the_runtime_environment_token_sets_the_expected_claims():
    baseline = ISSUER.token(subject="owner:acme:project:todo:environment:preview")
    tokens = book(environment=None, baseline=baseline)
    tokens.observe(ISSUER.token())  # production: not what this deployment's own token names
    assert tokens.first() == SDK_TOKEN
    preview = ISSUER.token(subject="owner:acme:project:todo:environment:preview")
    tokens.observe(preview)
    assert tokens.first() == preview


def test_after_an_acceptance_a_token_of_another_project_is_never_a_candidate():
    tokens = book()
    accepted = ISSUER.token(issued_at=time.time() - 60)
    tokens.accepted(accepted)
    # Vercel-shaped, same team and environment, newer, validly signed: another deployment's.
    tokens.observe(ISSUER.token(subject="owner:acme:project:billing:environment:production"))
    assert tokens.first() == accepted


def test_candidates_are_ordered_by_their_own_iat_not_by_arrival():
    tokens = book()
    newer = ISSUER.token(issued_at=time.time() - 10)
    older = ISSUER.token(issued_at=time.time() - 100)
    tokens.observe(newer)
    tokens.observe(older)
    assert tokens.first() == newer
    tokens.accepted(newer)
    tokens.observe(older)  # older than the accepted one: never a candidate
    assert tokens.first() == newer


def test_a_rejected_token_is_never_presented_again_and_the_refresh_falls_back_to_the_accepted_one():
    tokens = book()
    accepted = ISSUER.token(issued_at=time.time() - 60)
    tokens.accepted(accepted)
    forged = forged_token()
    presented_and_rejected(tokens, forged)
    assert tokens.fallback(forged) == accepted
    tokens.observe(ISSUER.token(issued_at=time.time() - 120))  # between two arrivals of the forgery
    tokens.observe(forged)
    assert tokens.first() == accepted


def test_without_an_unexpired_accepted_token_the_fallback_is_the_sdks_own_and_never_a_rejected_one():
    tokens = book()
    forged = forged_token()
    presented_and_rejected(tokens, forged)
    assert tokens.fallback(forged) == SDK_TOKEN
    tokens.rejected(SDK_TOKEN)
    assert tokens.fallback(SDK_TOKEN) is None
    with pytest.raises(Exception, match="no usable Vercel OIDC token"):
        tokens.first()

    lapsed = book(sdk_token=None)
    lapsed.accepted(ISSUER.token(lifetime=1, issued_at=time.time() - 10))  # expired since
    assert lapsed.fallback(forged) is None


def test_a_flood_of_client_tokens_cannot_push_the_services_secrets_out_of_redaction():
    own = [
        "db-password-0f9e8d7c",
        "X-Amz-Signature=abc123def456",
        "AQoDYXdzEJr-session-token",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    ]
    for secret in own:
        auth.register_secret(secret)
    tokens = book()
    adopted = ISSUER.token()
    tokens.observe(adopted)
    tokens.accepted(adopted)
    presented = 0
    for i in range(1000):
        forged = forged_token(lifetime=3000 + i, issued_at=time.time() + 1)  # each newer than the last
        tokens.observe(forged)
        if tokens.first() == forged:
            presented += 1
            tokens.rejected(forged)
    assert presented == 1000
    scrubbed = auth.redact(" ".join([*own, adopted, "fine"]))
    assert [secret for secret in [*own, adopted] if secret in scrubbed] == []
    assert scrubbed.endswith("fine")


def test_after_a_rejection_only_signed_header_tokens_are_candidates_and_the_platforms_is_presented():
    keys = KeySet()
    tokens = book(fetch_jwks=keys)
    accepted = ISSUER.token(issued_at=time.time() - 120)
    tokens.accepted(accepted)
    platform = ISSUER.token(issued_at=time.time() - 30)
    tokens.observe(platform)
    forged = forged_token()  # newer than the platform's token: it is the candidate
    tokens.observe(forged)
    assert tokens.first() == forged and keys.fetched == []  # nothing fetched before it is needed
    tokens.rejected(forged)
    # The same refresh: the key set is fetched once, and the platform's token, signed, is next.
    assert tokens.fallback(forged) == platform
    assert keys.fetched == ["https://oidc.vercel.com/acme/.well-known/jwks"]
    tokens.accepted(platform)
    for _ in range(50):  # newer forgeries: never candidates now
        tokens.observe(forged_token(lifetime=7200))
    newer = ISSUER.token(lifetime=7200, issued_at=time.time() + 1)
    tokens.observe(newer)
    assert tokens.first() == newer and len(keys.fetched) == 1


def test_a_forgery_rejected_after_a_newer_one_replaced_it_still_has_the_keys_fetched_at_once():
    """The STS call takes a while, and forgeries keep coming meanwhile: by the time STS rejects
    the presented one, a newer forgery is the candidate. The rejection still means forgeries are
    about: the same refresh fetches the keys, and the newer forgery is never presented."""
    keys = KeySet()
    tokens = book(fetch_jwks=keys)
    accepted = ISSUER.token(issued_at=time.time() - 120)
    tokens.accepted(accepted)
    first = forged_token(lifetime=3000)
    tokens.observe(first)
    assert tokens.first() == first
    newer = forged_token(lifetime=3001, issued_at=time.time() + 1)
    tokens.observe(newer)  # while STS considers `first`
    tokens.rejected(first)
    assert tokens.fallback(first) == accepted
    assert keys.fetched == ["https://oidc.vercel.com/acme/.well-known/jwks"]
    assert tokens.first() == accepted  # not `newer`: its signature is checked now


def test_a_cold_instance_attacked_before_any_acceptance_recovers_in_the_same_refresh():
    keys = KeySet()
    tokens = book(sdk_token=None, fetch_jwks=keys)
    platform = ISSUER.token(issued_at=time.time() - 30)
    tokens.observe(platform)
    forged = forged_token()
    presented_and_rejected(tokens, forged)
    assert tokens.fallback(forged) == platform


def test_when_the_key_set_cannot_be_fetched_a_rejection_still_falls_back_and_the_fetch_waits(
    monkeypatch: pytest.MonkeyPatch,
):
    logged: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    monkeypatch.setattr(logging.getLogger("aurora_todo.auth"), "handlers", [QueueHandler(logged)])
    monkeypatch.setattr(logging.getLogger("aurora_todo.auth"), "propagate", False)
    fetched: list[str] = []

    def unreachable(url: str) -> bytes:
        fetched.append(url)
        raise OSError("unreachable")

    tokens = book(fetch_jwks=unreachable)
    accepted = ISSUER.token(issued_at=time.time() - 60)
    tokens.accepted(accepted)
    for _ in range(3):
        forged = forged_token(lifetime=3000 + len(fetched) + _)
        presented_and_rejected(tokens, forged)  # unverifiable: still a candidate, STS decides
        assert tokens.fallback(forged) == accepted
    assert len(fetched) == 1  # retried only after auth.JWKS_REFETCH
    # The operator learns why forgeries still reach STS: one warning per failed fetch.
    records = [logged.get_nowait() for _ in range(logged.qsize())]
    assert [(r.levelname, r.getMessage(), vars(r)["url"], vars(r)["error_type"]) for r in records] == [
        ("WARNING", "the OIDC issuer's key set could not be fetched", fetched[0], "OSError")
    ]


def test_keys_are_fetched_only_from_vercels_issuer():
    keys = KeySet()
    baseline = ISSUER.token(iss="https://token.example.com/acme")
    tokens = book(baseline=baseline, fetch_jwks=keys)
    forged = forged_token(iss="https://token.example.com/acme")
    presented_and_rejected(tokens, forged)
    assert tokens.fallback(forged) == SDK_TOKEN and keys.fetched == []


def test_a_token_signed_by_a_rotated_key_is_a_candidate_once_the_key_set_is_fetched_again(monkeypatch):
    rotated = Issuer("vercel-oidc-2")
    keys = KeySet()
    tokens = book(fetch_jwks=keys)
    tokens.accepted(ISSUER.token(issued_at=time.time() - 120))
    forged = forged_token()
    tokens.observe(forged)
    tokens.first()
    tokens.rejected(forged)
    tokens.fallback(forged)  # loads the key set: ISSUER's key only
    new_key_token = rotated.token(issued_at=time.time() + 1)
    tokens.observe(new_key_token)
    assert tokens.first() != new_key_token  # its kid is not in the set: not yet
    keys.issuers = (ISSUER, rotated)
    monkeypatch.setattr(auth, "JWKS_REFETCH", 0.0)
    tokens.keys.wanted = True  # as the unknown kid left it; the refetch waited JWKS_REFETCH
    assert tokens.first() == new_key_token and len(keys.fetched) == 2


def test_a_forgery_that_arrives_during_a_refresh_is_never_its_fallback():
    tokens = book()  # the key set cannot be fetched: header tokens stay unverified
    accepted = ISSUER.token(issued_at=time.time() - 60)
    tokens.accepted(accepted)
    forged = forged_token(lifetime=3000)
    presented_and_rejected(tokens, forged)
    tokens.observe(forged_token(lifetime=3001))  # the next forgery, while STS was answering
    assert tokens.fallback(forged) == accepted


def test_a_signed_token_of_another_project_seen_before_the_first_acceptance_is_never_the_fallback():
    keys = KeySet()
    tokens = book(fetch_jwks=keys)
    # Before any acceptance only Vercel's shapes are known: another project's token fits them.
    other = ISSUER.token(
        subject="owner:acme:project:billing:environment:production", issued_at=time.time() - 5
    )
    tokens.observe(other)
    tokens.accepted(ISSUER.token(issued_at=time.time() - 120))  # this deployment's: now the reference
    forged = forged_token()
    presented_and_rejected(tokens, forged)
    assert tokens.fallback(forged) != other


def test_a_forgery_found_unverifiable_just_before_the_keys_arrived_is_never_presented(monkeypatch):
    """A request's header is checked on the event loop, and the check and the choice of the
    candidate are two steps: between them, a refresh may load the keys and choose again. The
    forgery the check let through (no keys yet) must not be presented once the keys are in."""
    keys = KeySet()
    tokens = book(fetch_jwks=keys)
    accepted = ISSUER.token(issued_at=time.time() - 120)
    tokens.accepted(accepted)
    first_forgery = forged_token()
    presented_and_rejected(tokens, first_forgery)
    late_forgery = forged_token(lifetime=7200)
    check = tokens.keys.signed
    refreshed: list[str | None] = []

    def keys_arrive_meanwhile(token: auth.OidcToken) -> bool | None:
        verdict = check(token)
        if token.raw == late_forgery and not refreshed:
            refreshed.append(None)
            refreshed[0] = tokens.fallback(first_forgery)  # the refresh that loads the keys
        return verdict

    monkeypatch.setattr(tokens.keys, "signed", keys_arrive_meanwhile)
    tokens.observe(late_forgery)
    # The refresh presented the accepted token, having fetched the keys (booleans: never
    # print a token).
    assert [refreshed == [accepted], len(keys.fetched)] == [True, 1]
    presented = tokens.first()
    assert [presented == late_forgery, presented == accepted] == [False, True]


def test_a_request_met_while_another_thread_imports_the_sdks_header_module_is_served(monkeypatch):
    """The first requests and the first STS call overlap: `_sign`, in a thread, imports the
    SDK's OIDC getter (and with it `vercel.headers`) while a request on the event loop looks
    for that module's headers. A module still being imported is in sys.modules without its
    functions; the request must pass it by, not fail with an AttributeError (a 500)."""
    import importlib.machinery
    import types

    half_made = types.ModuleType("vercel.headers")
    half_made.__spec__ = importlib.machinery.ModuleSpec("vercel.headers", None)
    half_made.__spec__._initializing = True  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vercel.headers", half_made)
    settings = db.Settings.from_env(
        {"PGHOST": "cluster.dsql.us-east-1.on.aws", "AWS_ROLE_ARN": "arn:aws:iam::123456789012:role/todo"}
    )
    signer = auth.TokenSigner(settings)
    try:
        signer.observe_request()  # no header module to read yet: nothing observed, no error
    finally:
        signer.close()
