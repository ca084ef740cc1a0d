"""Where database credentials come from: AWS credentials, and IAM tokens for Aurora and DSQL.

What lives here, in reading order:
- IAM tokens: `TokenSigner.token()` signs one for the configured endpoint (`presigned_token`:
  the presigned URL botocore's `rds` `generate_db_auth_token` makes for Aurora PostgreSQL; for
  DSQL the admin token for user `admin`, else the role token), signed by AWS's CRT (awscrt),
  with one snapshot of the credentials, so that a token costs at most one credential refresh.
  `Token` says when the credentials that signed it expire.
- Credentials: with `AWS_ROLE_ARN`, a Vercel OIDC token is exchanged with STS
  `AssumeRoleWithWebIdentity` (`WebIdentityCredentials`: an unsigned call, made with the
  standard library, at the endpoint botocore would use, `AWS_ENDPOINT_URL_STS` included), and
  the credentials are reused until shortly before they expire. One HTTP request per call:
  db.py's backoff is the retry. Without a role, boto3's default chain
  (`DefaultChainCredentials`, botocore's session). Neither botocore nor an STS client is on
  the cold path of a Vercel function (README, "The AWS side").
- OIDC tokens (`OidcTokens`): which one STS sees. A request's `x-vercel-oidc-token` header is
  untrusted input (Vercel's runtime lets a client's own header win over the platform's):
  it becomes a candidate only when it is a well-formed, unexpired JWT with the issuer,
  audience and subject the deployment expects, and candidates are ordered by their own
  `iat`. A token STS rejects is never presented again, and the same refresh falls back at
  once to a trusted token. Once STS has rejected a header token, `IssuerKeys` fetches the
  issuer's published keys and every header token must carry a valid signature too.
- Secrets (`redact`): every secret this process owns (database password, IAM tokens, STS
  keys, the OIDC tokens STS accepted) is registered here and scrubbed from any text bound
  for a log or a response; what a client sent is never registered, so no client can push
  them out.

Nothing here blocks the event loop: STS calls, botocore's session (built once) and its
credentials, which it may refresh with an STS call when they are read, and signing all run
in a worker thread.

What does not live here: the pool and when it needs a token (db.py), HTTP (app.py).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import contextvars
import logging
import math
import os
import re
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import msgspec

if TYPE_CHECKING:
    from db import Settings

log = logging.getLogger("aurora_todo.auth")
OIDC_HEADER = "x-vercel-oidc-token"  # where Vercel's runtime puts a request's OIDC token


# --- IAM tokens --------------------------------------------------------------------------


class Token(NamedTuple):
    """A signed IAM token, and when the AWS credentials that signed it expire.

    A token signed with temporary credentials stops working when they expire, whatever
    its own TTL says: its user must not present it after `credentials_expire_at`
    (epoch seconds; inf for long-term keys).
    """

    secret: str
    credentials_expire_at: float


class AwsCredentials(NamedTuple):
    """One snapshot of AWS credentials, and when they expire (epoch seconds; inf for
    long-term keys)."""

    access_key: str
    secret_key: str
    session_token: str | None
    expires_at: float


class TokenSigner:
    """Signs IAM database tokens for one endpoint, and offers each request's OIDC header to
    `OidcTokens` (`observe_request`)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.oidc = OidcTokens.from_environment(os.environ) if settings.role_arn else None
        # The signer's import overlaps the first STS call, which waits on the network.
        threading.Thread(target=_import_signer, name="import awscrt", daemon=True).start()
        self._credentials: WebIdentityCredentials | DefaultChainCredentials
        if settings.role_arn and self.oidc is not None:
            self._credentials = WebIdentityCredentials(settings.role_arn, settings.region, self.oidc)
        else:
            self._credentials = DefaultChainCredentials(settings.region)

    async def token(self) -> Token:
        """A freshly signed token, valid for DB_TOKEN_TTL seconds (900 for Aurora)."""
        self.observe_request()  # an attempt a request started carries its header (the first one)
        return await asyncio.to_thread(self._sign)

    def _sign(self) -> Token:
        # One snapshot: reading credentials may refresh them (an STS call); signing with the
        # snapshot costs at most one refresh.
        credentials = self._credentials.get()
        register_secret(credentials.secret_key)
        register_secret(credentials.session_token)
        token = presigned_token(self.settings, credentials)
        register_secret(token)
        return Token(token, credentials.expires_at)

    def observe_request(self) -> None:
        """Offer this request's OIDC header as a candidate for the next STS call.

        Replacements run by the timer belong to no request, and the platform's token
        changes about every 45 minutes. Cheap: a contextvar read, and a string comparison
        for every request that carries the token the previous one did.
        """
        if self.oidc is None:
            return
        # The runtime imports the SDK's header module before it calls the app; when it is
        # not loaded, no request carries headers for it (and importing it would cost). Nor
        # while another thread is still importing it (the SDK's OIDC getter, in `_sign`):
        # the half-made module has no `get_headers` yet.
        get_headers = getattr(sys.modules.get("vercel.headers"), "get_headers", None)
        headers = get_headers() if get_headers is not None else None
        token = headers.get(OIDC_HEADER) if headers else None
        if token:
            self.oidc.observe(token)

    def close(self) -> None:
        self._credentials.close()


def _import_signer() -> None:
    with contextlib.suppress(ImportError):  # presigned_token reports it, where it is needed
        import awscrt.auth  # noqa: F401
        import awscrt.http  # noqa: F401


RDS_TOKEN_TTL = 900  # what botocore's generate_db_auth_token signs for; Aurora's maximum


def presigned_token(settings: Settings, credentials: AwsCredentials) -> str:
    """The IAM token for `settings`' endpoint: a SigV4 presigned URL without its scheme, as
    botocore's `rds.generate_db_auth_token` and dsql's `generate_db_connect_(admin_)auth_token`
    make it, signed by AWS's CRT (awscrt: native, and quick to import on a cold start).

    Aurora PostgreSQL: `GET https://host:port/?Action=connect&DBUser=user`, service `rds-db`;
    DSQL: `GET https://host/?Action=DbConnectAdmin` for `admin`, else `Action=DbConnect`,
    service `dsql`, for DB_TOKEN_TTL.
    """
    from urllib.parse import urlencode

    from awscrt import auth as crt_auth
    from awscrt import http as crt_http

    if settings.auth == "iam":
        host, service, expires = f"{settings.host}:{settings.port}", "rds-db", RDS_TOKEN_TTL
        query = urlencode({"Action": "connect", "DBUser": settings.user})
    else:
        host, service, expires = settings.host, "dsql", settings.token_ttl
        query = urlencode({"Action": "DbConnectAdmin" if settings.user == "admin" else "DbConnect"})
    request = crt_http.HttpRequest("GET", f"/?{query}", crt_http.HttpHeaders([("host", host)]))
    config = crt_auth.AwsSigningConfig(
        algorithm=crt_auth.AwsSigningAlgorithm.V4,
        signature_type=crt_auth.AwsSignatureType.HTTP_REQUEST_QUERY_PARAMS,
        credentials_provider=crt_auth.AwsCredentialsProvider.new_static(
            credentials.access_key, credentials.secret_key, credentials.session_token
        ),
        region=settings.region or "",
        service=service,
        signed_body_value=crt_auth.AwsSignedBodyValue.EMPTY_SHA256,
        expiration_in_seconds=expires,
    )
    crt_auth.aws_sign_request(request, config).result()
    return f"{host}{request.path}"


# --- credentials: Vercel OIDC token → STS, or boto3's default chain ----------------------

ROLE_SESSION_NAME = "aurora-todo"
# One HTTP request per STS call, bounded: a down or black-holed STS fails the attempt fast
# and db.py's backoff decides when to try again (it is the only retry).
STS_CONNECT_TIMEOUT, STS_READ_TIMEOUT = 2.0, 5.0
STS_MAX_ANSWER = 1 << 16
# Credentials are refreshed this long before they expire (botocore's advisory window);
# a failed refresh keeps them while more than the mandatory window is left (botocore's too).
ADVISORY_REFRESH, MANDATORY_REFRESH = 15 * 60.0, 10 * 60.0
# What STS answers when it refuses the token itself (not when it is down): that token is
# never presented again, and the same refresh falls back to a trusted one.
STS_REJECTIONS = frozenset(
    {
        "InvalidIdentityToken",
        "ExpiredTokenException",
        "IDPRejectedClaim",
        "AccessDenied",
        "AccessDeniedException",
    }
)


class StsError(Exception):
    """STS answered with an error (`code` is its error code, "" when it sent none)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"STS AssumeRoleWithWebIdentity: {code or 'error'}: {message}")
        self.code = code


class CredentialsUnavailable(Exception):
    """No AWS credentials can be had now."""


class WebIdentityCredentials:
    """Vercel OIDC token → STS AssumeRoleWithWebIdentity, reused until shortly before they
    expire.

    The call is unsigned (the OIDC token is the proof), so it needs no AWS SDK: one HTTPS
    form POST with the standard library, its XML answer read by ElementTree (botocore's
    session and STS client cost a cold start more than the call itself; README, "The AWS
    side"). The endpoint is botocore's: `AWS_ENDPOINT_URL_STS` (or `AWS_ENDPOINT_URL`) when
    set, else STS in the configured region. Each refresh presents the token `OidcTokens`
    chooses; when STS rejects it, the same refresh presents the fallback at once (so an
    attacker's token costs one STS call, never a failed replacement), and every outcome
    is reported back.
    """

    def __init__(self, role_arn: str, region: str | None, tokens: OidcTokens):
        self._role_arn = role_arn
        self._endpoint = sts_endpoint(os.environ, region)
        self._tokens = tokens
        self._lock = threading.Lock()  # one refresh at a time
        self._current: AwsCredentials | None = None

    def get(self) -> AwsCredentials:
        with self._lock:
            current, now = self._current, time.time()
            if current is not None and current.expires_at - now > ADVISORY_REFRESH:
                return current
            try:
                self._current = self._refresh()
            except Exception:
                if current is not None and current.expires_at - now > MANDATORY_REFRESH:
                    return current
                raise
            return self._current

    def close(self) -> None:
        self._current = None

    def _refresh(self) -> AwsCredentials:
        token = self._tokens.first()
        try:
            return self._exchange(token)
        except StsError as error:
            if error.code not in STS_REJECTIONS:
                raise
            fallback = self._tokens.fallback(token)
            if fallback is None:
                raise
            return self._exchange(fallback)

    def _exchange(self, token: str) -> AwsCredentials:
        """One STS call presenting `token`; its outcome is reported to `OidcTokens`."""
        try:
            credentials = assume_role_with_web_identity(self._endpoint, self._role_arn, token)
        except StsError as error:
            if error.code in STS_REJECTIONS:
                self._tokens.rejected(token)
            raise
        self._tokens.accepted(token)
        return credentials


def sts_endpoint(env: Any, region: str | None) -> str:
    """Where STS is, as botocore finds it: its endpoint variables, else the regional endpoint
    (botocore's default), else the global one."""
    configured = env.get("AWS_ENDPOINT_URL_STS") or env.get("AWS_ENDPOINT_URL")
    if configured:
        return str(configured)
    if not region:
        return "https://sts.amazonaws.com"
    return f"https://sts.{region}.amazonaws.com" + (".cn" if region.startswith("cn-") else "")


def assume_role_with_web_identity(endpoint: str, role_arn: str, web_identity_token: str) -> AwsCredentials:
    """One AssumeRoleWithWebIdentity call (STS's query API, version 2011-06-15); StsError when
    STS refuses, OSError when it cannot be reached in time."""
    import http.client
    from datetime import datetime
    from urllib.parse import urlencode, urlsplit
    from xml.etree import ElementTree

    url = urlsplit(endpoint)
    connection: http.client.HTTPConnection
    if url.scheme == "https":
        import ssl

        context = ssl.create_default_context(cafile=os.environ.get("AWS_CA_BUNDLE") or None)
        connection = http.client.HTTPSConnection(
            url.hostname or "", url.port, timeout=STS_CONNECT_TIMEOUT, context=context
        )
    else:
        connection = http.client.HTTPConnection(url.hostname or "", url.port, timeout=STS_CONNECT_TIMEOUT)
    form = urlencode(
        {
            "Action": "AssumeRoleWithWebIdentity",
            "Version": "2011-06-15",
            "RoleArn": role_arn,
            "RoleSessionName": ROLE_SESSION_NAME,
            "WebIdentityToken": web_identity_token,
        }
    )
    try:
        connection.connect()
        if connection.sock is not None:
            connection.sock.settimeout(STS_READ_TIMEOUT)
        connection.request(
            "POST",
            url.path or "/",
            form,
            {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8", "User-Agent": "aurora-todo"},
        )
        response = connection.getresponse()
        answer = response.read(STS_MAX_ANSWER)
    finally:
        connection.close()
    try:
        root = ElementTree.fromstring(answer)
    except ElementTree.ParseError:
        raise StsError("", f"HTTP {response.status}, not an STS answer") from None
    if response.status != 200:
        code = root.findtext("{*}Error/{*}Code") or ""
        raise StsError(code, root.findtext("{*}Error/{*}Message") or f"HTTP {response.status}")
    found = root.find("{*}AssumeRoleWithWebIdentityResult/{*}Credentials")
    fields = [found.findtext(f"{{*}}{name}") if found is not None else None for name in _STS_FIELDS]
    if not all(fields):
        raise StsError("", "no credentials in STS's answer")
    access_key, secret_key, session_token, expiration = (str(field) for field in fields)
    return AwsCredentials(
        access_key, secret_key, session_token, datetime.fromisoformat(expiration).timestamp()
    )


_STS_FIELDS = ("AccessKeyId", "SecretAccessKey", "SessionToken", "Expiration")


class DefaultChainCredentials:
    """boto3's default credential chain (environment, shared files, SSO, web identity files,
    container and instance metadata), through botocore's session, built once in the worker
    thread that first reads it; botocore refreshes temporary credentials itself."""

    def __init__(self, region: str | None):
        self._region = region
        self._core: Any = None
        self._session_lock = threading.Lock()

    def get(self) -> AwsCredentials:
        core = self._core or self._build_session()
        credentials = core.get_credentials()
        if credentials is None:
            raise CredentialsUnavailable("no AWS credentials in boto3's default chain")
        frozen = credentials.get_frozen_credentials()  # reading them may refresh them
        expires_at = _expiry_of(credentials)  # of the keys just frozen: read after the refresh
        return AwsCredentials(frozen.access_key, frozen.secret_key, frozen.token, expires_at)

    def close(self) -> None:
        self._core = None

    def _build_session(self) -> Any:
        with self._session_lock:
            if self._core is not None:
                return self._core
            import botocore.session

            core = botocore.session.get_session()
            if self._region:
                core.set_config_variable("region", self._region)
            self._core = core
            return core


def _expiry_of(credentials: Any) -> float:
    """Epoch seconds at which botocore credentials expire; inf for long-term keys.

    botocore keeps the expiry of refreshable (temporary) credentials in `_expiry_time`
    and offers no public accessor for it.
    """
    expiry = getattr(credentials, "_expiry_time", None)
    return expiry.timestamp() if expiry is not None else float("inf")


# --- OIDC tokens: which one STS sees ------------------------------------------------------

VERCEL_ISSUER = "https://oidc.vercel.com"
# Vercel's subject: owner:<team slug>:project:<project name>:environment:<environment>.
VERCEL_SUBJECT = re.compile(r"owner:([A-Za-z0-9_-]+):project:([^:]+):environment:([^:]+)")
OIDC_MAX_LENGTH = 8192  # Vercel's tokens are about 1 KiB; anything far longer is not one
OIDC_MAX_LIFETIME = 24 * 3600.0  # an `exp` further away than this is not a Vercel token
OIDC_CLOCK_SKEW = 60.0  # an `iat` this far ahead of this clock is still believed
REJECTED_REMEMBERED = 1024  # at most one per refresh: hours of them
RECENT_REMEMBERED = 64  # distinct header tokens kept, to find the platform's among forgeries
# Vercel's issuers (global and team); only theirs have keys fetched, from `<iss>/.well-known/jwks`.
VERCEL_ISSUERS = re.compile(r"https://oidc\.vercel\.com(?:/[A-Za-z0-9_-]+)?")
JWKS_TIMEOUT = 2.0  # one fetch of the key set; a slow one fails and verification waits
JWKS_REFETCH = 60.0  # after a failed fetch, or a token whose key the set lacks
JWKS_MAX_BYTES = 1 << 20
_BASE64URL = re.compile(r"[A-Za-z0-9_-]+")


class _JwtHeader(msgspec.Struct):
    alg: str
    kid: str | None = None


class _JwtClaims(msgspec.Struct):
    iss: str
    aud: str
    sub: str
    iat: float
    exp: float
    project_id: str | None = None


_header_decoder = msgspec.json.Decoder(_JwtHeader)
_claims_decoder = msgspec.json.Decoder(_JwtClaims)


class OidcToken(NamedTuple):
    """A JWT that parsed, with the claims the choice of token rests on (unverified)."""

    raw: str
    iss: str
    aud: str
    sub: str
    iat: float
    exp: float
    project_id: str | None
    kid: str | None

    @classmethod
    def parse(cls, raw: str) -> OidcToken | None:
        """The token's claims, or None unless it is a well-formed RS256 JWT with string
        `iss`, `aud` and `sub` and numeric `iat` and `exp`."""
        if len(raw) > OIDC_MAX_LENGTH:
            return None
        parts = raw.split(".")
        if len(parts) != 3 or not all(map(_BASE64URL.fullmatch, parts)):
            return None
        try:
            header = _header_decoder.decode(_unbase64(parts[0]))
            claims = _claims_decoder.decode(_unbase64(parts[1]))
        except (msgspec.DecodeError, binascii.Error):
            return None
        if header.alg != "RS256" or not all((claims.iss, claims.aud, claims.sub)):
            return None
        if not (math.isfinite(claims.iat) and math.isfinite(claims.exp)):
            return None
        return cls(
            raw, claims.iss, claims.aud, claims.sub, claims.iat, claims.exp, claims.project_id, header.kid
        )

    @property
    def order(self) -> tuple[float, float]:
        """Newer first: by its own `iat`, then by `exp`."""
        return self.iat, self.exp

    def fresh(self, now: float) -> bool:
        """Unexpired, issued no later than now (give or take skew), and not absurdly long-lived."""
        return (
            now < self.exp <= now + OIDC_MAX_LIFETIME
            and self.iat <= now + OIDC_CLOCK_SKEW
            and self.iat < self.exp
        )


def _unbase64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


class IssuerKeys:
    """The issuer's published signing keys (its JWKS), fetched when first needed and cached.

    Needed once STS has rejected a header token (someone is sending forgeries): from then on
    a header token is a candidate only with a valid RS256 signature by one of these keys
    (PyJWT checks it). Only Vercel's issuers have their keys fetched, from the issuer the
    claims policy already pinned to Vercel's host; a failed fetch, or a token whose `kid`
    the set lacks (a rotation), allows the next fetch JWKS_REFETCH later. Fetching happens
    in a credentials refresh (a worker thread), never on the event loop.
    """

    def __init__(self, fetch: Callable[[str], bytes]):
        self._fetch = fetch
        self._keys: dict[str, Any] | None = None  # kid -> PyJWK
        self._fetched_at = -math.inf  # time.monotonic() of the last fetch, successful or not
        self.wanted = False  # a fetch would help: set by a rejection or an unknown kid

    @property
    def loaded(self) -> bool:
        return self._keys is not None

    def load(self, issuer: str) -> bool:
        """Fetch `issuer`'s key set if allowed now; whether keys are loaded."""
        if not VERCEL_ISSUERS.fullmatch(issuer) or time.monotonic() - self._fetched_at < JWKS_REFETCH:
            return self.loaded
        self._fetched_at = time.monotonic()
        self.wanted = False
        url = f"{issuer}/.well-known/jwks"
        try:
            import jwt

            keyset = jwt.PyJWKSet.from_dict(msgspec.json.decode(self._fetch(url)))
        except Exception as error:  # unreachable or malformed: STS still checks every token it is shown
            log.warning(
                "the OIDC issuer's key set could not be fetched",
                extra={
                    "url": url,
                    "error_type": type(error).__name__,
                    "error": str(error)[:200],
                    "duration_ms": round((time.monotonic() - self._fetched_at) * 1000, 1),
                    "next_fetch_in_s": JWKS_REFETCH,
                },
            )
            return self.loaded
        self._keys = {key.key_id: key for key in keyset.keys if key.key_id and key.key_type == "RSA"}
        log.info(
            "the OIDC issuer's key set was fetched",
            extra={
                "url": url,
                "keys": len(self._keys),
                "duration_ms": round((time.monotonic() - self._fetched_at) * 1000, 1),
            },
        )
        return True

    def signed(self, token: OidcToken) -> bool | None:
        """Whether one of the keys signed `token`; None while no keys are loaded."""
        if self._keys is None:
            return None
        key = self._keys.get(token.kid) if token.kid else None
        if key is None:
            self.wanted = True
            return False
        import jwt

        try:
            jwt.PyJWS().decode(token.raw, key=key.key, algorithms=["RS256"])
        except jwt.InvalidTokenError:
            return False
        return True


def _fetch_jwks(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=JWKS_TIMEOUT) as response:
        body: bytes = response.read(JWKS_MAX_BYTES)
        return body


class OidcTokens:
    """Which OIDC token the next STS call presents, and what STS made of the last ones.

    Trusted: the token STS last accepted (`_accepted`) and the SDK's own sources
    (its process-wide cache, `VERCEL_OIDC_TOKEN`, `VERCEL_OIDC_TOKEN_FILE`, read outside
    any request so that no request header reaches them). Untrusted: every request's header.
    A header token becomes the candidate (`_candidate`) only when it parses, is `fresh`,
    is newer by its own `iat` than both the accepted token and the current candidate, was
    never rejected, has the claims the deployment expects (`_expected`): the issuer,
    audience and subject of the token STS last accepted; before any, those of
    `VERCEL_OIDC_TOKEN`; without it, Vercel's shapes for the deployment's environment and
    project (`_vercel_shaped`), and, once STS has rejected a header token, a valid
    signature by the issuer's published keys (`IssuerKeys`). The candidate is presented
    first; if STS rejects it, the same refresh presents the newest signed header token seen
    lately (`_recent`) once the keys are loaded, else the accepted token, else the SDK's own.

    `observe` runs on the event loop, the rest in a credentials refresh (a worker thread):
    one lock, held for microseconds.
    """

    def __init__(
        self,
        baseline: str | None,
        environment: str | None,
        project_id: str | None,
        sdk_token: Callable[[], str | None],
        fetch_jwks: Callable[[str], bytes] = _fetch_jwks,
    ):
        self._baseline = OidcToken.parse(baseline) if baseline else None
        self._environment = environment
        self._project_id = project_id
        self._sdk_token = sdk_token
        self.keys = IssuerKeys(fetch_jwks)
        self._lock = threading.Lock()
        self._accepted: OidcToken | None = None
        self._candidate: OidcToken | None = None
        self._recent: dict[str, OidcToken] = {}  # insertion-ordered, oldest first
        self._rejected: set[str] = set()
        self._rejected_order: deque[str] = deque()
        self._forged_issuer: str | None = None  # the issuer a rejected header token named
        self._presented: OidcToken | None = None  # the header token last handed out to present
        self._last_seen: str | None = None  # most requests carry what the previous one did

    @classmethod
    def from_environment(cls, env: Any) -> OidcTokens:
        """Expectations from the Vercel runtime's own variables (as the SDK reads them)."""
        return cls(
            env.get("VERCEL_OIDC_TOKEN") or None,
            env.get("VERCEL_TARGET_ENV") or env.get("VERCEL_ENV") or None,
            env.get("VERCEL_PROJECT_ID") or None,
            _sdk_oidc_token,
        )

    # --- the event loop: a request's header

    def observe(self, raw: str) -> None:
        """Consider a request's header token as the next candidate (see the class docstring)."""
        if raw == self._last_seen:
            return
        self._last_seen = raw
        token = OidcToken.parse(raw)
        if token is None or not token.fresh(time.time()):
            return
        with self._lock:
            if raw in self._rejected or not self._expected(token):
                return
            self._recent.pop(raw, None)
            self._recent[raw] = token
            if len(self._recent) > RECENT_REMEMBERED:
                del self._recent[next(iter(self._recent))]
            if not self._newest(token):
                return
        if self.keys.signed(token) is not False:
            with self._lock:
                if self._newest(token):
                    self._candidate = token

    def _newest(self, token: OidcToken) -> bool:
        """Newer than the accepted token and the candidate (under the lock)."""
        return all(token.order > other.order for other in (self._accepted, self._candidate) if other)

    def _expected(self, token: OidcToken) -> bool:
        reference = self._accepted or self._baseline
        if reference is not None:
            return (token.iss, token.aud, token.sub) == (reference.iss, reference.aud, reference.sub)
        return self._vercel_shaped(token)

    def _vercel_shaped(self, token: OidcToken) -> bool:
        """Vercel's claims for this deployment: iss `https://oidc.vercel.com[/<team>]`, aud
        `https://vercel.com/<team>`, sub `owner:<team>:project:<name>:environment:<env>`,
        with the deployment's environment and project id when the runtime names them."""
        subject = VERCEL_SUBJECT.fullmatch(token.sub)
        if subject is None:
            return False
        team, _, environment = subject.groups()
        return (
            token.iss in (VERCEL_ISSUER, f"{VERCEL_ISSUER}/{team}")
            and token.aud == f"https://vercel.com/{team}"
            and self._environment in (None, environment)
            and self._project_id in (None, token.project_id or self._project_id)
        )

    # --- a credentials refresh: what to present, and what STS said

    def first(self) -> str:
        """The token to present: the candidate, else the accepted one while unexpired, else
        the SDK's own."""
        self._verify_when_needed()
        now = time.time()
        with self._lock:
            candidate, accepted = self._candidate, self._accepted
        # `observe` checks a signature before it takes the lock: a forgery it found unverifiable
        # just before the keys arrived may be the candidate. Once they are loaded, only a signed
        # candidate is presented.
        if candidate is not None and candidate.exp > now and self.keys.signed(candidate) is not False:
            return self._present(candidate)
        if accepted is not None and accepted.exp > now:
            return accepted.raw
        token = self._sdk_token()
        if token is None or self._was_rejected(token):
            raise CredentialsUnavailable("no usable Vercel OIDC token")
        return token

    def fallback(self, rejected: str) -> str | None:
        """After STS rejected `rejected`: the newest signed header token (once the keys are
        loaded), else the accepted token while unexpired, else the SDK's own, never what
        was rejected; None when nothing trusted is left."""
        self._verify_when_needed()
        now = time.time()
        with self._lock:
            candidate, accepted = self._candidate, self._accepted
        # Only a signed candidate: an unverified one may be the next forgery, come in meanwhile.
        if (
            candidate is not None
            and candidate.raw != rejected
            and candidate.exp > now
            and self.keys.signed(candidate)
        ):
            return self._present(candidate)
        if accepted is not None and accepted.raw != rejected and accepted.exp > now:
            return accepted.raw
        token = self._sdk_token()
        if token is None or token == rejected or self._was_rejected(token):
            return None
        return token

    def _present(self, header_token: OidcToken) -> str:
        """Hand out a header token to present; `rejected` knows it by this, even after a newer
        one has replaced it as the candidate while STS considered it."""
        with self._lock:
            self._presented = header_token
        return header_token.raw

    def _verify_when_needed(self) -> None:
        """Once a forgery was seen: load the keys, and choose the candidate again among the
        header tokens seen lately, by signature (a worker thread: this may fetch)."""
        if not self.keys.wanted:
            return
        with self._lock:
            reference = self._accepted or self._baseline
        issuer = reference.iss if reference is not None else self._forged_issuer
        if issuer is None or not self.keys.load(issuer):
            return
        with self._lock:  # the expected claims may have changed since they were seen
            recent = sorted(
                (token for token in self._recent.values() if self._expected(token)),
                key=lambda t: t.order,
                reverse=True,
            )
        now = time.time()
        signed = next(
            (
                token
                for token in recent
                if token.exp > now and not self._was_rejected(token.raw) and self.keys.signed(token)
            ),
            None,
        )
        with self._lock:
            accepted_order = self._accepted.order if self._accepted else None
            newer = signed is not None and (accepted_order is None or signed.order > accepted_order)
            self._candidate = signed if newer else None

    def _was_rejected(self, raw: str) -> bool:
        with self._lock:
            return raw in self._rejected

    def accepted(self, raw: str) -> None:
        """STS accepted `raw`: it is the service's own secret now, and the reference for claims."""
        register_secret(raw)
        token = OidcToken.parse(raw)
        with self._lock:
            if self._candidate is not None and self._candidate.raw == raw:
                self._candidate = None
            if self._presented is not None and self._presented.raw == raw:
                self._presented = None
            if token is not None and (self._accepted is None or token.order >= self._accepted.order):
                self._accepted = token
                if self._candidate is not None and not self._expected(self._candidate):
                    self._candidate = None

    def rejected(self, raw: str) -> None:
        """STS rejected `raw`: never present it again; a header token's rejection means
        forgeries are about, so signatures are checked from now on."""
        with self._lock:
            if self._candidate is not None and self._candidate.raw == raw:
                self._candidate = None
            if self._presented is not None and self._presented.raw == raw:
                self._forged_issuer = self._presented.iss
                self._presented = None
                self.keys.wanted = not self.keys.loaded or self.keys.wanted
            if self._accepted is not None and self._accepted.raw == raw:
                self._accepted = None
            self._recent.pop(raw, None)
            if raw not in self._rejected:
                self._rejected.add(raw)
                self._rejected_order.append(raw)
                if len(self._rejected_order) > REJECTED_REMEMBERED:
                    self._rejected.discard(self._rejected_order.popleft())


def _sdk_oidc_token() -> str | None:
    """The SDK's own token (its cache, `VERCEL_OIDC_TOKEN`, `VERCEL_OIDC_TOKEN_FILE`).

    Read in a context of its own: inside a request the SDK would prefer that request's
    header (untrusted) and cache it process-wide. (The SDK's full getter refuses a token
    in its last 15 minutes; this one does not.)
    """
    from vercel.oidc import VercelOidcTokenError, get_vercel_oidc_token_sync

    try:
        return contextvars.Context().run(get_vercel_oidc_token_sync) or None
    except VercelOidcTokenError:
        return None


# --- secrets never leave the process --------------------------------------------------------

# The service's own secrets, newest last: only this process adds to it (never what a client
# sent), so the ones in use are always here; the oldest, long expired, make room.
_secrets: deque[str] = deque(maxlen=64)
# Shapes of secrets that were never registered (another process's token, a client's).
_SECRET_SHAPES = re.compile(
    r"(X-Amz-(?:Signature|Security-Token|Credential)=)[^&\s\"']+"
    r"|eyJ[\w-]{8,}\.[\w-]{8,}\.[\w-]*"
)


def register_secret(secret: str | None) -> None:
    """Remember a secret of the service's own so that `redact` scrubs it; short strings are
    not secrets. Never called with client input: a flood of it would push real secrets out."""
    if secret and len(secret) >= 8 and secret not in _secrets:
        _secrets.append(secret)


def redact(text: str) -> str:
    """`text` with every registered secret and anything shaped like a token replaced."""
    for secret in list(_secrets):
        if secret in text:
            text = text.replace(secret, "[redacted]")
    if "X-Amz-" not in text and "eyJ" not in text:  # every shape starts so: skip the regex scan (log lines)
        return text
    return _SECRET_SHAPES.sub(lambda m: (m.group(1) or "") + "[redacted]", text)
