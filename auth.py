"""Where database credentials come from: AWS credentials and IAM tokens for Aurora and DSQL.

What lives here:
- `TokenSigner`: signs an IAM auth token for the configured endpoint — botocore's `rds`
  `generate_db_auth_token` for Aurora PostgreSQL, the DSQL admin token for user `admin`
  and the role token for any other user. botocore is imported and its session built once,
  in a worker thread: the import costs ~150 ms on a cold start, and botocore may refresh
  credentials (an STS call) synchronously when they are read. Nothing here blocks the event
  loop. No rds/dsql client is built: signing needs only a request signer (cheap, one per token).
- Credentials: with `AWS_ROLE_ARN`, the Vercel OIDC token is exchanged with STS
  `AssumeRoleWithWebIdentity` by botocore's own fetcher, which reuses the credentials until
  shortly before they expire (`AWS_ENDPOINT_URL_STS` is honoured by botocore). One STS
  call per attempt: botocore's own retries are off (db.py's backoff is the retry), and each
  token is signed with one snapshot of the credentials, so it costs at most one refresh.
  The OIDC token presented is the newest one a request carried (every request's
  `x-vercel-oidc-token` header is noted, a contextvar read), so a replacement that runs
  between requests presents a current one; until a request has carried one, the SDK's
  `get_vercel_oidc_token_sync()` (the request's header, the SDK's cache, then
  `VERCEL_OIDC_TOKEN`). (The SDK's full getter refuses a token in its last 15 minutes.)
  Without a role, boto3's default chain.
- `redact`: every secret this process handles (database password, IAM tokens, STS keys,
  OIDC tokens) is registered here and scrubbed from any text bound for a log or a response.

What does not: the pool and when tokens are needed (db.py), HTTP (app.py).
"""

from __future__ import annotations

import asyncio
import re
import threading
import types
from collections import deque
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

if TYPE_CHECKING:
    from db import Settings

ROLE_SESSION_NAME = "aurora-todo"
OIDC_HEADER = "x-vercel-oidc-token"
# One HTTP request per STS call, bounded: a down or black-holed STS fails the attempt fast
# and db.py's backoff decides when to try again (botocore would retry twice more, at once).
STS_CLIENT_OPTIONS = {"retries": {"total_max_attempts": 1}, "connect_timeout": 2, "read_timeout": 5}


class Token(NamedTuple):
    """A signed IAM token, and when the AWS credentials that signed it expire.

    A token signed with temporary credentials stops working when they expire, whatever
    its own TTL says: its user must not present it after `credentials_expire_at`
    (epoch seconds; inf for long-term keys).
    """

    secret: str
    credentials_expire_at: float


class TokenSigner:
    """Signs IAM database tokens for one endpoint; see the module docstring."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._core: Any = None  # botocore's session, built once, in a worker thread
        self._session_lock = threading.Lock()
        self._oidc_getter: Callable[[], str] | None = None
        self._request_headers: Callable[[], Any] | None = None
        self._newest_oidc: str | None = None

    async def token(self) -> Token:
        """A freshly signed token, valid for DB_TOKEN_TTL seconds (900 for Aurora)."""
        return await asyncio.to_thread(self._sign)

    def _sign(self) -> Token:
        from botocore import signers
        from botocore.credentials import Credentials

        settings = self.settings
        core = self._core or self._build_session()
        # One snapshot: reading refreshable credentials may refresh them (an STS call), and
        # signing reads them again; signing with the snapshot costs at most one refresh.
        credentials = core.get_credentials()
        if credentials is None:
            from botocore.exceptions import NoCredentialsError
            raise NoCredentialsError()
        frozen = credentials.get_frozen_credentials()
        register_secret(frozen.secret_key)
        register_secret(frozen.token)
        expire_at = _expiry_of(credentials)  # of the keys just frozen: read after the refresh
        client = _SigningClient(core, "rds" if settings.auth == "iam" else "dsql", settings.region,
                                Credentials(frozen.access_key, frozen.secret_key, frozen.token))
        if settings.auth == "iam":
            token = signers.generate_db_auth_token(
                client, DBHostname=settings.host, Port=settings.port,
                DBUsername=settings.user, Region=settings.region)
        elif settings.user == "admin":
            token = signers.dsql_generate_db_connect_admin_auth_token(
                client, Hostname=settings.host, Region=settings.region, ExpiresIn=settings.token_ttl)
        else:
            token = signers.dsql_generate_db_connect_auth_token(
                client, Hostname=settings.host, Region=settings.region, ExpiresIn=settings.token_ttl)
        register_secret(token)
        return Token(token, expire_at)

    def _build_session(self) -> Any:
        with self._session_lock:
            if self._core is not None:
                return self._core
            import botocore.session

            core = botocore.session.get_session()
            if self.settings.region:
                core.set_config_variable("region", self.settings.region)
            if self.settings.role_arn:
                self._oidc_getter, self._request_headers = _vercel_oidc_sources()
                resolver = core.get_component("credential_provider")
                resolver.insert_before("env", _VercelWebIdentityProvider(
                    core, self.settings.role_arn, self._oidc_token))
            self._core = core
            return core

    def _oidc_token(self) -> str:
        """The OIDC token for STS: the newest a request carried, else the SDK's."""
        token = self._newest_oidc
        if token is None:
            assert self._oidc_getter is not None
            token = self._oidc_getter()
            register_secret(token)
        return token

    def observe_request(self) -> None:
        """Note this request's OIDC token: the next STS call presents the newest one.

        Replacements run by the timer belong to no request, and the token a request
        carries changes about every 45 minutes. Cheap: a contextvar and a dict lookup.
        """
        if self._request_headers is None:
            return
        headers = self._request_headers()
        token = headers.get(OIDC_HEADER) if headers else None
        if token and token != self._newest_oidc:
            register_secret(token)
            self._newest_oidc = token

    def close(self) -> None:
        self._core = None


def _expiry_of(credentials: Any) -> float:
    """Epoch seconds at which botocore credentials expire; inf for long-term keys.

    botocore keeps the expiry of refreshable (temporary) credentials in `_expiry_time`
    and offers no public accessor for it.
    """
    expiry = getattr(credentials, "_expiry_time", None)
    return expiry.timestamp() if expiry is not None else float("inf")


def _vercel_oidc_sources() -> tuple[Callable[[], str], Callable[[], Any]]:
    """The SDK's OIDC token getter, and the current request's headers (which Vercel's
    runtime puts in a contextvar, lower-cased)."""
    from vercel.headers import get_headers
    from vercel.oidc import get_vercel_oidc_token_sync

    return get_vercel_oidc_token_sync, get_headers


class _SigningClient:
    """What botocore's token functions use of an rds or dsql client: its signer and region.

    They are the functions behind `rds.generate_db_auth_token` and the dsql client's
    `generate_db_connect_(admin_)auth_token`. Building the client itself would load the
    service's whole API model (~30 ms of a cold start) only to sign one URL.
    """

    def __init__(self, core: Any, service: str, region: str | None, credentials: Any):
        from botocore.model import ServiceId
        from botocore.signers import RequestSigner

        self.meta = types.SimpleNamespace(region_name=region)
        self._request_signer = RequestSigner(
            ServiceId(service), region, service, "v4", credentials, core.get_component("event_emitter"))


class _VercelWebIdentityProvider:
    """A botocore credential provider: Vercel OIDC token → STS AssumeRoleWithWebIdentity.

    botocore's resolver needs only METHOD, CANONICAL_NAME and load(), so this need not
    subclass CredentialProvider (which would mean importing botocore with this module).
    """

    METHOD = "vercel-oidc-web-identity"
    CANONICAL_NAME = "VercelOidcWebIdentity"

    def __init__(self, core: Any, role_arn: str, token_loader: Callable[[], str]):
        from botocore.config import Config
        from botocore.credentials import AssumeRoleWithWebIdentityCredentialFetcher

        options = Config(**STS_CLIENT_OPTIONS)

        def sts_client(service: str, config: Any = None, **kwargs: Any) -> Any:
            return core.create_client(service, config=options.merge(config) if config else options, **kwargs)

        self._fetcher = AssumeRoleWithWebIdentityCredentialFetcher(
            client_creator=sts_client, web_identity_token_loader=token_loader,
            role_arn=role_arn, extra_args={"RoleSessionName": ROLE_SESSION_NAME})

    def load(self) -> Any:
        from botocore.credentials import DeferredRefreshableCredentials

        return DeferredRefreshableCredentials(
            refresh_using=self._fetcher.fetch_credentials, method=self.METHOD)


# --- secrets never leave the process ------------------------------------------------

_secrets: deque[str] = deque(maxlen=64)
# Shapes of secrets that were never registered (another process's token, say).
_SECRET_SHAPES = re.compile(
    r"(X-Amz-(?:Signature|Security-Token|Credential)=)[^&\s\"']+"
    r"|eyJ[\w-]{8,}\.[\w-]{8,}\.[\w-]*"
)


def register_secret(secret: str | None) -> None:
    """Remember a secret so that `redact` scrubs it; short strings are not secrets."""
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
