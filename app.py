"""The HTTP side of aurora-todo: the Starlette app `app`, and `python app.py` for local runs.

Sections, in order:

- routes: the endpoints, and `routes`, the one list of every path and method;
- the app: its middleware layers, each absent when off (RequestContext: request ids, the
  request's log line, problem+json for every error; CORS when CORS_ORIGINS is set; the
  bearer token when API_TOKEN is set), the lifespan, and `app`;
- messages: the msgspec Structs of every body, the encoder and decoders built once;
- request parsing: bodies, query strings, titles, limits, cursors, Idempotency-Key;
- responses and errors: JSON and problem+json (RFC 9457) responses;
- logs: one JSON object per line, set up by one call, configure_logging();
- OpenAPI: the document, generated from the Structs;
- under Vercel's runtime: TCP_NODELAY on its connections (RuntimeNoDelay);
- local runs: main(), for `python app.py`.

Importing this module does no I/O and changes no logging: the database pool is created on the
first request that needs it (db.py), credentials come from auth.py, and logging is set up by
whatever starts serving (configure_logging says who).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hashlib
import hmac
import itertools
import logging
import os
import re
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from types import FrameType, ModuleType
from typing import Annotated, Any, TypeVar
from urllib.parse import quote, unquote_to_bytes, urlencode

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.endpoints import HTTPEndpoint
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import auth
import db

MAX_BODY_BYTES = 64 * 1024
BODY_READ_TIMEOUT = 10.0  # a body that trickles in slower than this is cut off (408)
DEFAULT_LIMIT, MAX_LIMIT = 50, 100
MAX_TITLE = 500
JSON = "application/json"
PROBLEM_JSON = "application/problem+json"
IDEMPOTENCY_KEY = "Idempotency-Key"


# --- routes ----------------------------------------------------------------------------


class TodoCollection(HTTPEndpoint):
    async def get(self, request: Request) -> Response:
        query = query_fields(request)
        limit = parse_limit(query.get("limit"))
        completed = parse_bool("completed", query.get("completed"))
        after = decode_cursor(query.get("cursor"))
        rows = await db.list_todos(limit + 1, completed, after)
        todos = [Todo(*row) for row in rows[:limit]]
        headers = None
        if len(rows) > limit:
            next_query = {"limit": limit, "cursor": encode_cursor(todos[-1])}
            if completed is not None:
                next_query["completed"] = "true" if completed else "false"
            headers = {"Link": f'<{prefix(request)}/todos?{urlencode(next_query)}>; rel="next"'}
        return json_response(todos, headers=headers)

    async def post(self, request: Request) -> Response:
        key = idempotency_key(request)
        new = await read_message(request, new_todo_decoder)
        title = clean_title(new.title)
        row = await db.create_todo(uuid.uuid4() if key is None else keyed_todo_id(key), title, new.completed)
        todo = Todo(*row)
        # With a key, the row may be one an earlier request stored (a retry): the same todo
        # fields are the same request. A todo changed since (PATCH) no longer shows what it
        # was created with, so it is answered as it is now rather than refused.
        if (
            key is not None
            and (todo.title, todo.completed) != (title, new.completed)
            and todo.updated_at == todo.created_at
        ):
            raise unprocessable(
                IDEMPOTENCY_KEY, "was used for a different todo; send a new key for a new todo"
            )
        return json_response(todo, 201, {"Location": f"{prefix(request)}/todos/{todo.id}"})


class TodoItem(HTTPEndpoint):
    async def get(self, request: Request) -> Response:
        row = await db.get_todo(todo_id(request))
        if row is None:
            raise HTTPException(404, f"no todo with id {request.path_params['todo_id']}")
        return json_response(Todo(*row))

    async def patch(self, request: Request) -> Response:
        wanted = todo_id(request)
        changes = await read_message(request, todo_changes_decoder)
        if changes.title is UNSET and changes.completed is UNSET:
            raise unprocessable("body", "give at least one of title, completed")
        title = None if changes.title is UNSET else clean_title(changes.title)
        completed = None if changes.completed is UNSET else changes.completed
        row = await db.update_todo(wanted, title, completed)
        if row is None:
            raise HTTPException(404, f"no todo with id {wanted}")
        return json_response(Todo(*row))

    async def delete(self, request: Request) -> Response:
        wanted = todo_id(request)
        if not await db.delete_todo(wanted):
            raise HTTPException(404, f"no todo with id {wanted}")
        return Response(status_code=204)


async def healthz(request: Request) -> Response:
    return Response(HEALTHY, media_type=JSON)


async def readyz(request: Request) -> Response:
    ready, report = await db.readiness()
    body = msgspec.convert(report, Readiness)
    if ready:
        return json_response(body)
    backing_off = body.state == db.PoolState.BACKING_OFF.value
    retry_in = body.replacement.retry_in_seconds if backing_off and body.replacement else None
    return json_response(body, 503, {"Retry-After": str(db.retry_after(retry_in))})


async def openapi(request: Request) -> Response:
    return Response(openapi_document(prefix(request)), media_type=JSON)


routes = [
    Route("/todos", TodoCollection),
    Route("/todos/{todo_id}", TodoItem),
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]


# --- the app: its middleware layers, the lifespan --------------------------------------

SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Request ids made here: a random per-process prefix and a counter (uuid4 per request costs
# more than the id is worth); unique across instances in practice, and sortable within one.
REQUEST_ID_PREFIX = f"{uuid.uuid4().hex[:12]}-"
request_numbers = itertools.count(1)


class RequestContext:
    """The outermost layer, a pure ASGI callable: what every response has, preflights included.

    Gives each request an id (the caller's, if sane) and logs the request's line (RequestLog
    says when). Without CORS it also renders every error as problem+json (error_response): here
    rather than in a layer of its own, which every request would pay for. With CORS, `Problems`
    renders them inside CORS, and what reaches this layer is the last resort.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if runtime_nodelay.state == "listener_done":
            runtime_nodelay.on_first_request()
        started = time.perf_counter()
        if scope.get("root_path"):
            scope = under_prefix(scope)
        headers = dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = (
            given if SANE_REQUEST_ID.fullmatch(given) else f"{REQUEST_ID_PREFIX}{next(request_numbers):x}"
        )
        request_id_var.set(request_id)
        id_header = (b"x-request-id", request_id.encode())
        status, response_started = 500, False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as error:
            answer = error_response(scope["method"], error)
            if not response_started:
                await answer(scope, receive, send_with_id)
        finally:
            duration = time.perf_counter() - started
            if log.isEnabledFor(logging.INFO) and request_log.wanted(status, duration):
                vercel_id = headers.get(b"x-vercel-id")
                request_log.write(
                    scope["method"],
                    scope["path"],
                    status,
                    round(duration * 1000, 2),
                    vercel_id.decode("latin-1") if vercel_id is not None else None,
                )


class Problems:
    """Renders the errors of what it wraps as problem+json (error_response). Only inside CORS,
    so that an error's answer passes through it and carries its headers; without CORS,
    RequestContext renders them."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        response_started = False

        async def watched_send(message: Message) -> None:
            nonlocal response_started
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception as error:
            if response_started:
                raise  # too late for an answer: RequestContext logs it
            await error_response(scope["method"], error)(scope, receive, send)


class BearerToken:
    """Present only when API_TOKEN is set: every /todos request without `Authorization: Bearer
    <API_TOKEN>` gets a 401 problem. Inside CORS: a preflight (browsers send no token with
    it) is answered before this, and the 401 carries the CORS headers."""

    def __init__(self, app: ASGIApp, token: str):
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and route_path(scope).startswith("/todos"):
            given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
            if not bearer_token_ok(given, self.token):
                refusal = problem(
                    401,
                    "send Authorization: Bearer <API_TOKEN>",
                    {"WWW-Authenticate": 'Bearer realm="todos"'},
                )
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)


def bearer_token_ok(given: bytes, expected: bytes) -> bool:
    """Whether an Authorization value is `Bearer <expected>` (the scheme in any case, RFC 9110),
    compared in constant time."""
    scheme, _, token = given.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), expected)


def error_response(method: str, error: Exception) -> Response:
    """The problem+json answer to what a request raised: its HTTPException; a 503 when the
    database or the configuration is unavailable; anything else a 500 that carries the request
    id but no traceback (which goes to the log)."""
    if isinstance(error, HTTPException):
        return http_error(method, error)
    if isinstance(error, db.Unavailable):
        return database_unavailable(error)
    if isinstance(error, db.ConfigError):
        return configuration_error(error)
    log.error("unhandled error", exc_info=error, extra={"error": auth.redact(str(error))[:300]})
    return problem(500, f"internal error; request id {request_id_var.get()}")


def under_prefix(scope: Scope) -> Scope:
    """A request under a path prefix (the ASGI root_path): its scope in Starlette's convention.

    Starlette (since 0.33) and `uvicorn --root-path` keep the prefix in `path` as well as in
    `root_path`; Vercel's runtime, stripping its service route prefix, takes it out of `path`
    and `raw_path`. Put back, the router, redirects and `request.url` see one convention, and
    every URL built from `root_path` (prefix()) carries the prefix exactly once. A stripped
    path that itself starts with the prefix (/api/api/…) reads as unstripped, as Starlette's
    router reads it too.
    """
    root_path, path = scope["root_path"].rstrip("/"), scope["path"]
    if path == root_path or path.startswith(f"{root_path}/"):
        return scope if root_path == scope["root_path"] else {**scope, "root_path": root_path}
    scope = {**scope, "root_path": root_path, "path": root_path + path}
    if (raw_path := scope.get("raw_path")) is not None:
        scope["raw_path"] = quote(root_path).encode("ascii") + raw_path
    return scope


def prefix(request: Request) -> str:
    """The path prefix the service is mounted under (ASGI root_path, set by under_prefix), or "".

    What Starlette's url_for puts before a route's path too (request.base_url); url_for itself
    is not used because it makes an absolute URL (scheme and host, which Location and Link
    leave out) and costs more per request than the rest of building the response header.
    """
    return request.scope.get("root_path", "")


def route_path(scope: Scope) -> str:
    """The path the routes match: the scope's path without the prefix (root_path) it carries."""
    root_path = scope.get("root_path", "")
    return scope["path"][len(root_path) :] if root_path else scope["path"]


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    # Nothing to start: on Vercel a failing startup kills the instance and no OIDC token
    # exists yet, so the pool is created on the first request that needs it.
    configure_logging()
    runtime_nodelay.on_listener()
    yield
    request_log.flush()
    await db.close()


class TodoApp(Starlette):
    """Starlette with its middleware stack made of layers that each do one thing, and are
    absent when off: RequestContext (request id, request line, errors) outermost; CORS
    when CORS_ORIGINS is set; the bearer token when API_TOKEN is set; then the router.

    Starlette wraps the router in ServerErrorMiddleware and ExceptionMiddleware; here
    RequestContext already renders every error and the 500, so those two layers only cost
    time (README, "Benchmarks", says how much). A preflight is answered by CORS, inside
    RequestContext (it has an id and a line) and before the bearer token is asked for
    (browsers send none with it); errors are rendered inside CORS (`Problems`), so that a
    page can read them. Built on the first request (or lifespan), not at import.
    """

    def build_middleware_stack(self) -> ASGIApp:
        stack: ASGIApp = self.router
        try:
            origins = cors_origins(os.environ)
        except db.ConfigError as error:
            stack, origins = Misconfigured(stack, error), None
        if token := os.environ.get("API_TOKEN"):
            stack = BearerToken(stack, token)
        if origins is not None:
            stack = Cors(Problems(stack), origins)
        return RequestContext(stack)


# CORS (opt-in): what a browser page on another origin may send and read. No credentials:
# the API authenticates with a bearer token, never a cookie.
CORS_METHODS = ["GET", "HEAD", "POST", "PATCH", "DELETE"]
CORS_REQUEST_HEADERS = ["Content-Type", "Authorization", IDEMPOTENCY_KEY, "X-Request-ID"]
CORS_EXPOSED_HEADERS = ["Link", "Location", "X-Request-ID", "Retry-After"]
CORS_MAX_AGE = 600  # seconds a browser may reuse a preflight's answer
# An origin as a browser sends it: scheme://host[:port], lower case, no path, no trailing slash.
_origin_shape = re.compile(r"([a-z][a-z0-9+.-]*)://(?:[a-z0-9_.-]+|\[[0-9a-f:.]+\])(?::([0-9]{1,5}))?")
_default_ports = {"http": "80", "https": "443"}


def cors_origins(env: Mapping[str, str]) -> list[str] | None:
    """The origins in CORS_ORIGINS (["*"] for any), or None when it is unset: CORS off.

    An entry that no browser would send as its Origin (a trailing slash, a path, upper case,
    a default port) would match nothing and fail only in the browser's console: it is a
    configuration error instead.
    """
    text = env.get("CORS_ORIGINS", "").strip()
    if not text:
        return None
    origins = [origin.strip() for origin in text.split(",") if origin.strip()]
    if origins == ["*"]:
        return origins
    for origin in origins:
        if origin == "*":
            raise db.ConfigError("CORS_ORIGINS", "* allows every origin; give it alone")
        shape = _origin_shape.fullmatch(origin)
        if shape is None:
            raise db.ConfigError(
                "CORS_ORIGINS",
                f"{origin[:100]!r} is not an origin as browsers send it: "
                "scheme://host[:port] in lower case, with no path or trailing /",
            )
        if shape.group(2) is not None and _default_ports.get(shape.group(1)) == shape.group(2):
            raise db.ConfigError("CORS_ORIGINS", f"{origin[:100]!r}: browsers leave out the default port")
    return origins


class Cors(CORSMiddleware):
    """Starlette's CORSMiddleware with this API's policy; a preflight it refuses is a 400
    problem (Starlette answers text/plain), like every error."""

    def __init__(self, app: ASGIApp, origins: list[str]):
        super().__init__(
            app,
            allow_origins=origins,
            allow_methods=CORS_METHODS,
            allow_headers=CORS_REQUEST_HEADERS,
            expose_headers=CORS_EXPOSED_HEADERS,
            max_age=CORS_MAX_AGE,
        )

    def preflight_response(self, request_headers: Headers) -> Response:
        answer = super().preflight_response(request_headers)
        if answer.status_code < 400:
            return answer
        headers = {
            name: value
            for name, value in answer.headers.items()
            if name not in ("content-type", "content-length")
        }
        return problem(answer.status_code, bytes(answer.body).decode(), headers)


class Misconfigured:
    """In front of the router when the HTTP side's own configuration cannot work: every request
    but /healthz (the process is alive) is a 503 naming the variable, like db.ConfigError."""

    def __init__(self, app: ASGIApp, error: db.ConfigError):
        self.app = app
        self.variable, self.message = error.variable, str(error).removeprefix(f"{error.variable}: ")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and route_path(scope) != "/healthz":
            raise db.ConfigError(self.variable, self.message)  # a fresh one: no traceback piles up
        await self.app(scope, receive, send)


app = TodoApp(routes=routes, lifespan=lifespan)


# --- messages ------------------------------------------------------------------------

# A title is trimmed (str.strip) and then 1–500 characters without NUL, which PostgreSQL text
# cannot hold. msgspec checks only the type: its length limits would count the white space
# that trimming removes. clean_title() holds the rule; TITLE_PATTERN says the same thing for
# the OpenAPI document. It spells out str.strip's white space (str.isspace) instead of \s,
# whose meaning differs between Python and ECMAScript, the dialect of JSON Schema patterns.
WHITE_SPACE = r"\t-\r\x1c- \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
TITLE_PATTERN = (
    rf"^[{WHITE_SPACE}]*[^{WHITE_SPACE}\x00]"
    rf"(?:[^\x00]{{0,{MAX_TITLE - 2}}}[^{WHITE_SPACE}\x00])?[{WHITE_SPACE}]*$"
)
Title = Annotated[
    str,
    Meta(
        description=f"Trimmed of surrounding white space, then 1–{MAX_TITLE} characters; no NUL.",
        extra_json_schema={"pattern": TITLE_PATTERN},
    ),
]


class Todo(Struct):
    id: uuid.UUID
    title: str
    completed: bool
    created_at: datetime
    updated_at: datetime


class NewTodo(Struct, forbid_unknown_fields=True):
    """Body of POST /todos."""

    title: Title
    completed: bool = False


class TodoChanges(Struct, forbid_unknown_fields=True):
    """Body of PATCH /todos/{id}: at least one field."""

    title: Title | UnsetType = UNSET
    completed: bool | UnsetType = UNSET


class Problem(Struct, kw_only=True):
    """An RFC 9457 problem detail: the body of every error."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str


class Health(Struct):
    status: str


class PoolStatus(Struct):
    size: int
    idle: int
    min: int
    max: int


class TokenStatus(Struct):
    age_seconds: float
    ttl_seconds: int
    seconds_left: float
    replacements: int


class ReplacementStatus(Struct):
    failures: int
    last_error: str | None
    retry_in_seconds: float = 0.0  # the backoff: no attempt (no STS call) before then


class IdleReleaseStatus(Struct):
    """On Vercel: idle connections close after this long, and invocations wait for them."""

    idle_timeout_seconds: int
    invocations_kept_alive: int


class Readiness(Struct, omit_defaults=True):
    """Body of /readyz: never a secret."""

    status: str
    database: str
    auth: str | None = None
    state: str | None = None  # db.PoolState: empty, connecting, serving, backing off, retrying
    detail: str | None = None
    pool: PoolStatus | None = None
    token: TokenStatus | None = None
    replacement: ReplacementStatus | None = None
    idle_release: IdleReleaseStatus | None = None


# Every message, by its schema name (OpenAPI's components); the ones clients send.
MESSAGES: dict[str, type[Struct]] = {
    cls.__name__: cls
    for cls in (
        Todo,
        NewTodo,
        TodoChanges,
        Problem,
        Health,
        PoolStatus,
        TokenStatus,
        ReplacementStatus,
        IdleReleaseStatus,
        Readiness,
    )
}
REQUEST_MESSAGES = (NewTodo, TodoChanges)

encoder = msgspec.json.Encoder()
BodyT = TypeVar("BodyT", NewTodo, TodoChanges)  # what a POST or PATCH sends
new_todo_decoder = msgspec.json.Decoder(NewTodo)
todo_changes_decoder = msgspec.json.Decoder(TodoChanges)
HEALTHY = encoder.encode(Health(status="ok"))


# --- request parsing -------------------------------------------------------------------


async def read_message(request: Request, decoder: msgspec.json.Decoder[BodyT]) -> BodyT:
    """The request's JSON body as the decoder's Struct; with no body, the same fields from the
    query string (clients of the FastAPI service: POST /todos?title=…, PATCH /todos/{id}?completed=true).
    Given beside a body, a title or completed in the query is held to its rules too."""
    body = await read_body(request)
    query = query_fields(request)
    if not body:
        return from_query(query, decoder.type)
    message = decode(body, decoder)
    from_query(query, TodoChanges)
    return message


async def read_body(request: Request) -> bytes:
    """The request body, refusing non-JSON or encoded (415), oversized (413) and stalled (408) bodies."""
    headers = request.headers
    length = headers.get("content-length")
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    if not chunked and length in (None, "0"):
        return b""
    if length is not None:
        if not length.isdigit():
            raise HTTPException(400, "Content-Length is not a number")
        if int(length) > MAX_BODY_BYTES:
            raise HTTPException(413, f"the body may be at most {MAX_BODY_BYTES} bytes")
    media_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != JSON and not (media_type.startswith("application/") and media_type.endswith("+json")):
        raise HTTPException(415, "send the body as application/json")
    coding = headers.get("content-encoding")
    if coding is not None and coding.strip().lower() not in ("", "identity"):
        # Decoding gzip here would only move the size limit's problem (a small body that
        # inflates to gigabytes); RFC 9110 names 415 for a content coding that is not accepted.
        raise HTTPException(415, "send the body without a Content-Encoding")
    body = bytearray()
    try:
        async with asyncio.timeout(BODY_READ_TIMEOUT):
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise HTTPException(413, f"the body may be at most {MAX_BODY_BYTES} bytes")
    except TimeoutError:
        # Close the connection too (RFC 9110, 408): bytes still trickling in would otherwise
        # keep re-arming the keep-alive timer and pin the connection.
        raise HTTPException(408, "the body arrived too slowly", {"Connection": "close"}) from None
    except ClientDisconnect:
        # The client hung up mid-body: nobody to answer, and not a server error.
        raise HTTPException(400, "the body ended before its announced length") from None
    return bytes(body)


def decode(body: bytes, decoder: msgspec.json.Decoder[BodyT]) -> BodyT:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as error:
        raise HTTPException(422, _field_error(str(error))) from None
    except msgspec.DecodeError as error:
        raise HTTPException(400, f"malformed JSON: {error}") from None
    except UnicodeDecodeError:
        # msgspec raises this, not DecodeError, for bad bytes inside a JSON string; its
        # offset counts from the string's start, so find the body's own offset (error path only).
        raise HTTPException(400, f"the body is not valid UTF-8{_first_bad_byte(body)}") from None


def _first_bad_byte(body: bytes) -> str:
    try:
        body.decode()
    except UnicodeDecodeError as error:
        return f" (byte {error.start})"
    return ""


def query_fields(request: Request) -> dict[str, str]:
    """The query string's fields (the last value of each name), decoded strictly as UTF-8.

    Starlette's `request.query_params` replaces bytes that are not UTF-8 with U+FFFD, so a
    title would be stored altered; here such a value is a 422 naming its field.
    """
    raw: bytes = request.scope["query_string"]
    fields: dict[str, str] = {}
    if not raw:
        return fields
    for pair in raw.split(b"&"):
        if not pair:
            continue
        raw_name, _, raw_value = pair.partition(b"=")
        name_bytes = unquote_to_bytes(raw_name.replace(b"+", b" "))
        try:
            name = name_bytes.decode()
        except UnicodeDecodeError:
            raise unprocessable("query", "a parameter name is not valid UTF-8") from None
        try:
            fields[name] = unquote_to_bytes(raw_value.replace(b"+", b" ")).decode()
        except UnicodeDecodeError:
            raise unprocessable(name[:64], "is not valid UTF-8") from None
    return fields


def from_query(query: dict[str, str], struct_type: type[BodyT]) -> BodyT:
    """A body Struct from `?title=…&completed=…`, held to the same rules as a JSON body."""
    fields: dict[str, Any] = {}
    if "title" in query:
        fields["title"] = clean_title(query["title"])
    if "completed" in query:
        fields["completed"] = parse_bool("completed", query["completed"])
    try:
        return msgspec.convert(fields, struct_type)
    except msgspec.ValidationError as error:
        raise HTTPException(422, _field_error(str(error))) from None


def _field_error(message: str) -> str:
    """msgspec says "Expected `str`, got `int` - at `$.title`"; lead with the field."""
    match = re.search(r"^(.*) - at `\$\.?([^`]*)`$", message)
    if match:
        return f"{match.group(2) or 'body'}: {match.group(1)}"
    match = re.search(r"field `([^`]+)`", message)
    return f"{match.group(1)}: {message}" if match else f"body: {message}"


def clean_title(title: str) -> str:
    """The title trimmed, then held to its rule (1–500 characters, no NUL, valid Unicode)."""
    title = title.strip()
    if not 1 <= len(title) <= MAX_TITLE:
        raise unprocessable("title", f"must be 1 to {MAX_TITLE} characters once trimmed (got {len(title)})")
    if "\x00" in title:
        raise unprocessable("title", "must not contain NUL characters")
    try:
        title.encode()
    except UnicodeEncodeError:
        raise unprocessable("title", "must be valid Unicode (no lone surrogates)") from None
    return title


TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_bool(field: str, text: str | None) -> bool | None:
    if text is None:
        return None
    if text.lower() in TRUE_WORDS:
        return True
    if text.lower() in FALSE_WORDS:
        return False
    raise unprocessable(field, "must be true or false")


def parse_limit(text: str | None) -> int:
    if text is None:
        return DEFAULT_LIMIT
    # isdigit() alone takes "²" (int() then fails: a 500) and "１０"; only ASCII digits count.
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
        raise unprocessable("limit", f"must be a whole number from 1 to {MAX_LIMIT}")
    return int(text)


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# A cursor is the (created_at, id) of the last todo of a page: its microseconds since 1970
# as 14 hex digits, then the id's 32. Every string of this shape is a position a listing can
# start after (14 hex digits reach the year 4253), so the pattern is exactly what is accepted.
CURSOR_PATTERN = "^[0-9a-f]{46}$"
_cursor_shape = re.compile(CURSOR_PATTERN)


def encode_cursor(todo: Todo) -> str:
    micros = (todo.created_at - EPOCH) // timedelta(microseconds=1)
    return f"{micros:014x}{todo.id.hex}"  # created_at is the database's now(): after 1970


def decode_cursor(text: str | None) -> tuple[datetime, uuid.UUID] | None:
    """The (created_at, id) of the last todo of the previous page."""
    if text is None:
        return None
    if not _cursor_shape.fullmatch(text):
        raise unprocessable("cursor", "is not a cursor this API handed out")
    return EPOCH + timedelta(microseconds=int(text[:14], 16)), uuid.UUID(hex=text[14:])


# Idempotency-Key (draft-ietf-httpapi-idempotency-key-header): 1–255 printable ASCII
# characters, taken verbatim (a quoted sf-string keeps its quotes). HTTP parsers strip white
# space around a header value, so a key neither starts nor ends with a space.
IDEMPOTENCY_KEY_PATTERN = r"^[!-~](?:[ -~]{0,253}[!-~])?$"
_idempotency_key_shape = re.compile(IDEMPOTENCY_KEY_PATTERN)
IDEMPOTENT_IDS = uuid.UUID("7d1f4c52-3c4e-4f63-9a59-0f8b2e61b7a4")  # uuid5 namespace of keyed todos


def idempotency_key(request: Request) -> str | None:
    """The request's Idempotency-Key, if it sent one; a malformed or repeated key is a 422."""
    keys = [value for name, value in request.scope["headers"] if name == b"idempotency-key"]
    if not keys:
        return None
    if len(keys) > 1:
        raise unprocessable(IDEMPOTENCY_KEY, "send it once")
    key = keys[0].decode("latin-1")
    if not _idempotency_key_shape.fullmatch(key):
        raise unprocessable(IDEMPOTENCY_KEY, "must be 1 to 255 printable ASCII characters")
    return key


def keyed_todo_id(key: str) -> uuid.UUID:
    """The id of the todo that creates with this key make: one key, one todo, no lookup table.

    When API_TOKEN is set the key is scoped by it (by its hash: ids reveal nothing), so two
    deployments with different tokens on one database never share a todo through a key.
    """
    token = os.environ.get("API_TOKEN")
    scope = hashlib.sha256(token.encode()).hexdigest() if token else ""
    return uuid.uuid5(IDEMPOTENT_IDS, f"{scope}:{key}")


def todo_id(request: Request) -> uuid.UUID:
    text = request.path_params["todo_id"]
    try:
        return uuid.UUID(text)
    except ValueError:
        raise HTTPException(404, f"no todo with id {text[:64]!r}") from None


# --- responses and errors -------------------------------------------------------------


def problem(status: int, detail: str = "", headers: Mapping[str, str] | None = None) -> Response:
    body = Problem(title=HTTPStatus(status).phrase, status=status, detail=detail)
    return Response(encoder.encode(body), status, headers, media_type=PROBLEM_JSON)


def unprocessable(field: str, message: str) -> HTTPException:
    return HTTPException(422, f"{field}: {message}")


def http_error(method: str, error: HTTPException) -> Response:
    detail = error.detail
    if error.status_code == 405 and error.headers:
        detail = f"{method} is not allowed here; use {error.headers.get('Allow')}"
    return problem(error.status_code, detail, error.headers)


def database_unavailable(error: db.Unavailable) -> Response:
    detail = auth.redact(str(error))
    log.warning("database unavailable", extra={"error_type": type(error).__name__, "error": detail})
    return problem(503, detail, {"Retry-After": str(error.retry_after)})


def configuration_error(error: db.ConfigError) -> Response:
    """A configuration that cannot work: a 503 naming the variable, logged as what it is (the
    message says what is wrong with the value, never the value of a secret)."""
    detail = auth.redact(str(error))
    log.error("configuration error", extra={"variable": error.variable, "error": detail})
    return problem(503, f"configuration error: {detail}", {"Retry-After": str(db.RETRY_AFTER_SECONDS)})


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(encoder.encode(content), status, headers, media_type=JSON)


# --- logs ------------------------------------------------------------------------------
#
# Every line is one JSON object with the request id, scrubbed by auth.redact. Under Vercel's
# runtime the lines go through its root handler, which carries each record's level to the
# platform; elsewhere to stderr. The request line, which every request pays for, takes a
# short path (RequestLog) to the same place; everything else goes through `logging`.

log = logging.getLogger("aurora_todo")
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
_RECORD_FIELDS = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}
_second_text: tuple[int, str] = (-1, "")  # (epoch second, its ISO text), swapped whole


def log_time(created: float) -> str:
    """`created` as 2026-11-24T17:25:14.483+00:00, the date and time formatted once a second."""
    global _second_text
    second, text = _second_text
    if int(created) != second:
        second = int(created)
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _second_text = (second, text)
    return f"{text}.{int((created - second) * 1000):03d}+00:00"


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the request id, scrubbed of every known secret."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": log_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _RECORD_FIELDS:
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            entry["error_type"] = record.exc_info[0].__name__
        return auth.redact(msgspec.json.encode(entry, enc_hook=str).decode())


class JsonMessages(logging.Filter):
    """For a handler that sends `record.getMessage()` as it is (Vercel's runtime's): the message
    becomes the record's JSON line (in place: a copy costs more than the line; any other handler
    sees the same JSON). The exception is summed up as error_type, as in every JSON line.
    """

    def __init__(self) -> None:
        super().__init__()
        self.formatter = JsonFormatter()

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "json_line", False):  # RequestLog's records are JSON already
            record.msg = self.formatter.format(record)
            record.args, record.exc_info, record.exc_text = None, None, None
        return True


class RequestLine(Struct, omit_defaults=True):
    """The line a request logs; the same fields, in the same order, as log.info would give.
    On Vercel it also names the platform's own record of the request (`x-vercel-id`)."""

    time: str
    level: str
    logger: str
    message: str
    request_id: str
    method: str
    path: str
    status: int
    duration_ms: float
    vercel_id: str | None = None


# On Vercel a request slower than this is logged even when it succeeded.
SLOW_REQUEST = 0.5  # seconds


class RequestLog:
    """Writes the request line straight to the handlers `configure_logging` chose.

    Outside Vercel every request gets its line. On Vercel the platform already records every
    request (method, path, status, duration), and each line costs a message on the runtime's
    IPC socket, a large share of a request's CPU (bench/RESULTS.md). There the line is written
    only when it adds something: for an error (4xx, 5xx), for a request slower than
    SLOW_REQUEST, and for every request at LOG_LEVEL=debug; it carries the request id beside
    the platform's `x-vercel-id`, so that either finds the other.

    `log.info("request", extra=…)` walks the logger tree, builds a dict of the record's
    attributes and formats it, for every request (README, "A cheap request line", counts the
    difference). Here one Struct is encoded, redacted, and handed to each handler under its
    lock: to our stderr stream, or as a ready record to the runtime's handler (still its
    logging, so the platform gets the level). Logger-level filters do not see it. Lines for
    the stream are written once per turn of the event loop, together: under load one write
    carries the lines of every request that ended in that turn, not one system call each.
    """

    def __init__(self) -> None:
        self.stream_handlers: list[logging.StreamHandler] = []
        self.record_handlers: list[logging.Handler] = []
        self.every_request = True  # configure_logging: False on Vercel unless LOG_LEVEL=debug
        self._unwritten: list[str] = []  # stream lines of this turn of the event loop

    def wanted(self, status: int, duration: float) -> bool:
        """Whether a request that answered `status` after `duration` seconds gets its line."""
        return self.every_request or status >= 400 or duration >= SLOW_REQUEST

    def write(
        self, method: str, path: str, status: int, duration_ms: float, vercel_id: str | None = None
    ) -> None:
        line = auth.redact(
            encoder.encode(
                RequestLine(
                    log_time(time.time()),
                    "info",
                    "aurora_todo",
                    "request",
                    request_id_var.get() or "",
                    method,
                    path,
                    status,
                    duration_ms,
                    vercel_id,
                )
            ).decode()
        )
        if self.stream_handlers:
            if not self._unwritten:
                try:
                    asyncio.get_running_loop().call_soon(self.flush)
                except RuntimeError:  # no event loop: nothing to wait for
                    self._unwritten.append(line)
                    self.flush()
                    return
            self._unwritten.append(line)
        if self.record_handlers:
            record = logging.makeLogRecord(
                {
                    "name": log.name,
                    "msg": line,
                    "levelno": logging.INFO,
                    "levelname": "INFO",
                    "json_line": True,
                }
            )
            for record_handler in self.record_handlers:
                record_handler.handle(record)

    def flush(self) -> None:
        """Write the stream lines not yet written, in one write per handler."""
        if not self._unwritten:
            return
        text = "\n".join(self._unwritten) + "\n"
        self._unwritten.clear()
        for stream_handler in self.stream_handlers:
            stream_handler.acquire()
            try:
                stream_handler.stream.write(text)
                stream_handler.stream.flush()
            finally:
                stream_handler.release()


request_log = RequestLog()


VERCEL_RUNTIME = "vercel_runtime.vc_init"  # the module that serves the app on Vercel


def runtime_log_handlers() -> list[logging.Handler]:
    """The handlers Vercel's runtime put on the root logger (they carry each record's level to
    the platform over its IPC socket); none when the app is not served by that runtime."""
    return [h for h in logging.getLogger().handlers if type(h).__module__ == VERCEL_RUNTIME]


def uvicorn_text_logging() -> bool:
    """Whether uvicorn's default, plain-text logging is installed: uvicorn's command line
    (`uvicorn app:app`) installs it before it imports the app."""
    return any(
        type(h.formatter).__module__ == "uvicorn.logging" for h in logging.getLogger("uvicorn").handlers
    )


# Logged at LOG_LEVEL. asyncio's: it reports a failed background task of asyncpg's (closing a
# connection that the server already dropped, after expire_connections) as a multi-line text
# otherwise. py.warnings: Python's warnings, once logging.captureWarnings routes them there.
JSON_LOGGERS = ("aurora_todo", "asyncpg", "asyncio", "py.warnings")
# uvicorn's own lines (startup, "Invalid HTTP request received", access lines), at the levels
# uvicorn was told (its --log-level; LOG_LEVEL under `python app.py`). Access lines stay off
# when uvicorn turned them off (`--no-access-log`): the app logs every request itself.
UVICORN_LOGGERS = ("uvicorn", "uvicorn.access")


def log_level() -> int:
    """LOG_LEVEL as a logging level; INFO when unset or not a level's name."""
    return logging.getLevelNamesMapping().get(os.environ.get("LOG_LEVEL", "info").upper(), logging.INFO)


def configure_logging() -> None:
    """Make every line this process logs one JSON object: ours, asyncpg's, asyncio's, uvicorn's,
    and Python's warnings. Importing this module changes no logging; this call does, and calling
    it again changes nothing more.

    Whatever starts serving calls it: main() for `python app.py`, before the embedded PostgreSQL
    starts; the lifespan startup for any ASGI server (Vercel's runtime included); and, at
    import, uvicorn's command line, which writes "Started server process" before any lifespan.
    Under Vercel's runtime the lines go through its root handler, which gets a JsonMessages
    filter and carries each record's level to the platform; elsewhere they go to stderr.
    """
    # Records skip what no line here shows (thread, process and task names, the caller's file
    # and line): the logging HOWTO's "Optimization" switches.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    if sys.version_info >= (3, 12):
        logging.logAsyncioTasks = False
    logging._srcfile = None  # documented there: no findCaller() stack walk per record
    logging.captureWarnings(True)
    runtime_handlers = runtime_log_handlers()
    for handler in runtime_handlers:
        if not any(isinstance(f, JsonMessages) for f in handler.filters):
            handler.addFilter(JsonMessages())
    stderr_handlers: list[logging.StreamHandler] = []
    if not runtime_handlers:
        stderr_handlers.append(logging.StreamHandler(sys.stderr))
        stderr_handlers[0].setFormatter(JsonFormatter())
    request_log.stream_handlers, request_log.record_handlers = stderr_handlers, runtime_handlers
    request_log.every_request = not db.on_vercel() or log_level() <= logging.DEBUG
    for name in (*JSON_LOGGERS, *UVICORN_LOGGERS):
        logger = logging.getLogger(name)
        if name == "uvicorn.access" and not logger.handlers:
            continue  # access lines are off
        logger.handlers[:] = stderr_handlers
        logger.propagate = bool(runtime_handlers)
    for name in JSON_LOGGERS:
        logging.getLogger(name).setLevel(log_level())
    # botocore says at INFO where it found each endpoint: noise, in plain text under Vercel's runtime.
    logging.getLogger("botocore").setLevel(logging.WARNING)


# --- OpenAPI ---------------------------------------------------------------------------
#
# Built once, on first use: the schemas come from the Structs (msgspec), the paths from
# openapi_paths() below. The document is as strict as the API, so that every request it
# allows is accepted, and it says which fields a message always has in the way that client
# generators read (openapi-typescript among them).

_openapi: dict[str, bytes] = {}  # by path prefix: a server is mounted under one or two


def openapi_document(prefix: str = "") -> bytes:
    """OpenAPI 3.1 for every route, built on first use from the Structs; under a path
    prefix, its `servers` tells clients that prefix."""
    document = _openapi.get(prefix)
    if document is None:
        document = encoder.encode(build_openapi(prefix))
        if len(_openapi) < 4:
            _openapi[prefix] = document
    return document


def build_openapi(prefix: str = "") -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "aurora-todo",
            "version": "1.0.0",
            "description": "A todo API on Aurora PostgreSQL / Aurora DSQL with IAM authentication.",
        },
        **({"servers": [{"url": prefix}]} if prefix else {}),
        "paths": openapi_paths(prefix),
        "components": {
            "schemas": openapi_schemas(),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Needed only when the server sets API_TOKEN.",
                }
            },
        },
    }


def openapi_paths(prefix: str) -> dict[str, Any]:
    todo, todos = ref("Todo"), {"type": "array", "items": ref("Todo")}
    location = {
        "Location": {"required": True, "schema": {"type": "string"}, "description": f"{prefix}/todos/{{id}}"}
    }
    body_errors = (400, 408, 413, 415, 422)  # a request with a body: malformed, slow, big, not JSON, wrong
    return {
        "/todos": {
            "get": operation(
                "listTodos",
                "List todos, newest first",
                {"200": json_response_spec("A page of todos", todos, LINK_HEADER), **problems(422)},
                parameters=[LIMIT_QUERY, COMPLETED_QUERY, CURSOR_QUERY],
            ),
            "post": operation(
                "createTodo",
                "Create a todo",
                {
                    "201": json_response_spec(
                        "Created (or, for a repeated Idempotency-Key, the todo its first request created)",
                        todo,
                        location,
                    ),
                    **problems(
                        *body_errors,
                        described={
                            422: "A field is wrong (the detail names it), or Idempotency-Key "
                            "is malformed or was used for a different todo"
                        },
                    ),
                },
                parameters=[IDEMPOTENCY_KEY_HEADER],
                request_body=json_body_spec(ref("NewTodo"), "`title` (and `completed`)"),
            ),
        },
        "/todos/{todo_id}": {
            "get": operation(
                "getTodo",
                "Get one todo",
                {"200": json_response_spec("The todo", todo), **problems(404)},
                parameters=[TODO_ID_PATH],
            ),
            "patch": operation(
                "updateTodo",
                "Change a todo's title or completion",
                {"200": json_response_spec("The updated todo", todo), **problems(404, *body_errors)},
                parameters=[TODO_ID_PATH],
                request_body=json_body_spec(ref("TodoChanges"), "`title` and/or `completed`"),
            ),
            "delete": operation(
                "deleteTodo",
                "Delete a todo",
                {"204": {"description": "Deleted"}, **problems(404)},
                parameters=[TODO_ID_PATH],
            ),
        },
        "/healthz": {
            "get": operation(
                "healthz",
                "Liveness; never touches the database",
                {"200": json_response_spec("Alive", ref("Health"))},
                secured=False,
            )
        },
        "/readyz": {
            "get": operation(
                "readyz",
                "Readiness: database, pool and token",
                {
                    "200": json_response_spec("Ready", ref("Readiness")),
                    "503": json_response_spec("Not ready", ref("Readiness"), ERROR_HEADERS[503]),
                },
                secured=False,
            )
        },
        "/openapi.json": {
            "get": operation(
                "openapi",
                "This document",
                {"200": json_response_spec("OpenAPI 3.1", {"type": "object"})},
                secured=False,
            )
        },
    }


def openapi_schemas() -> dict[str, Any]:
    """The Structs' JSON Schemas, held to what the API checks beyond their types."""
    named_in_paths = (Todo, NewTodo, TodoChanges, Problem, Health, Readiness)  # msgspec adds what they hold
    _, schemas = msgspec.json.schema_components(named_in_paths, ref_template=REF_TEMPLATE)
    schemas["TodoChanges"]["minProperties"] = 1  # a PATCH body names at least one field
    for name, schema in schemas.items():
        mark_presence(MESSAGES[name], schema)
    return schemas


def mark_presence(struct: type[Struct], schema: dict[str, Any]) -> None:
    """Say through `required` alone which fields a message always has, as generators read it.

    msgspec lists a field with a default as optional and gives its `default`; openapi-typescript
    (with its default `defaultNonNullable`) makes every property with a default required, and
    other generators make it optional. So: in a request body a default goes into the
    description (the client may omit the field); in a response every field that is always
    sent is required, and one that is left out when it has its default (omit_defaults) has no
    `default`, so that it is optional everywhere.
    """
    properties = schema["properties"]
    if struct in REQUEST_MESSAGES:
        for field in properties.values():
            if "default" in field:
                default = encoder.encode(field.pop("default")).decode()
                field["description"] = (
                    f"{field.get('description', '')} Optional: {default} when left out.".lstrip()
                )
    elif struct.__struct_config__.omit_defaults:
        for field in properties.values():
            field.pop("default", None)
    else:
        schema["required"] = list(properties)


REF_TEMPLATE = "#/components/schemas/{name}"


def ref(name: str) -> dict[str, str]:
    return {"$ref": REF_TEMPLATE.format(name=name)}


def operation(
    operation_id: str,
    summary: str,
    responses: dict[str, Any],
    *,
    parameters: list[dict[str, Any]] | None = None,
    request_body: dict[str, Any] | None = None,
    secured: bool = True,
) -> dict[str, Any]:
    """One operation; `secured`: it needs the bearer token when the server sets API_TOKEN."""
    spec: dict[str, Any] = {"operationId": operation_id, "summary": summary}
    if secured:
        spec["security"] = [{"bearer": []}]
    if parameters:
        spec["parameters"] = parameters
    if request_body:
        spec["requestBody"] = request_body
    spec["responses"] = responses
    return spec


def json_response_spec(
    description: str, schema: dict[str, Any], headers: dict[str, Any] | None = None
) -> dict:
    response: dict[str, Any] = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def json_body_spec(schema: dict[str, Any], query_form: str) -> dict[str, Any]:
    """A required JSON body. Clients of the FastAPI service send none and put the fields in the
    query string instead; that form is described, not listed as parameters: "a title in the
    body or in the query" cannot be said in OpenAPI (parameters are independent of each
    other), and listing both would allow a request with neither."""
    return {
        "required": True,
        "content": {JSON: {"schema": schema}},
        "description": f"Clients of the FastAPI service may send no body and {query_form} "
        "in the query string instead, held to the same rules; given beside a "
        "body, those query fields are checked too.",
    }


# What any /todos request may get besides its own errors: no or a wrong bearer token, a
# method the path does not have, an unexpected error, the database unavailable.
TODOS_PROBLEMS = (401, 405, 500, 503)


def problems(*statuses: int, described: dict[int, str] | None = None) -> dict[str, Any]:
    """problem+json responses for these statuses and TODOS_PROBLEMS, with the headers the
    SPEC promises beside them; `described` replaces a status's generic description."""
    responses = {}
    for status in sorted({*statuses, *TODOS_PROBLEMS}):
        response: dict[str, Any] = {
            "description": (described or {}).get(status, HTTPStatus(status).phrase),
            "content": {PROBLEM_JSON: {"schema": ref("Problem")}},
        }
        if status in ERROR_HEADERS:
            response["headers"] = ERROR_HEADERS[status]
        responses[str(status)] = response
    return responses


# The headers the SPEC promises with these errors; documented, so that clients (and
# schemathesis) can rely on them.
ERROR_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}, "description": "Bearer"}},
    405: {"Allow": {"required": True, "schema": {"type": "string"}, "description": "The methods allowed"}},
    503: {
        "Retry-After": {
            "required": True,
            "schema": {"type": "integer", "minimum": 1},
            "description": "Seconds to wait before retrying",
        }
    },
}
LINK_HEADER = {
    "Link": {"schema": {"type": "string"}, "description": 'RFC 8288 link to the next page: <…>; rel="next"'}
}
TODO_ID_PATH = {
    "name": "todo_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "format": "uuid"},
}
LIMIT_QUERY = {
    "name": "limit",
    "in": "query",
    "required": False,
    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT},
}
COMPLETED_QUERY = {"name": "completed", "in": "query", "required": False, "schema": {"type": "boolean"}}
CURSOR_QUERY = {
    "name": "cursor",
    "in": "query",
    "required": False,
    "schema": {"type": "string", "pattern": CURSOR_PATTERN},
    "description": "Opaque; from the Link header of the previous page.",
}
IDEMPOTENCY_KEY_HEADER = {
    "name": IDEMPOTENCY_KEY,
    "in": "header",
    "required": False,
    "description": "draft-ietf-httpapi-idempotency-key-header. Repeating a create with the same key "
    "and the same todo answers 201 with the todo the first one stored, and stores "
    "nothing new; the same key with a different todo is a 422. Use a fresh random "
    "key (a UUID) per todo, and the same key for its retries.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": IDEMPOTENCY_KEY_PATTERN},
}


# --- under Vercel's runtime: no Nagle stall ----------------------------------------------


class RuntimeNoDelay:
    """TCP_NODELAY on the connections Vercel's runtime serves. Workaround for uvicorn #3149:
    delete this class once Vercel's builder installs vercel-runtime 0.23.3 or later, which
    hands uvicorn its socket with sockets= and so gets TCP_NODELAY on every connection (where
    it does, this sets it a second time, harmlessly).

    vercel_runtime.vc_init (up to 0.23.2) binds 127.0.0.1:0 itself (its module-level `sock`)
    and hands the socket to its uvicorn (`uvicorn_server`) with fd=; uvicorn wraps an fd as AF_UNIX, so
    neither asyncio nor uvloop sets TCP_NODELAY on the connections it accepts, and each
    keep-alive response body waits for Nagle's algorithm and the peer's delayed ACK.
    Linux copies TCP_NODELAY from a listening socket to every connection whose handshake
    completes after it was set, not to those already queued (both checked). The runtime
    announces its port before uvicorn runs the lifespan, and the platform connects at once;
    so lifespan startup fixes the listener, and the first request the connections that
    uvicorn accepted before that.

    States: `pending` (not under the runtime, or lifespan not run) → `listener_done` (lifespan
    set it on the listener) → `done` (first request set it on the early connections).
    """

    def __init__(self) -> None:
        self.state = "pending"

    def on_listener(self) -> None:
        runtime = serving_runtime()
        if runtime is None:
            return
        listener = getattr(runtime, "sock", None)
        if not isinstance(listener, socket.socket) or not self._nodelay(listener):
            log.warning(
                "Vercel runtime: its listening socket was not found; keep-alive responses "
                "may wait for Nagle's algorithm (uvicorn #3149)"
            )
            return
        self.state = "listener_done"

    def on_first_request(self) -> None:
        self.state = "done"
        server = getattr(serving_runtime(), "uvicorn_server", None)
        for connection in list(getattr(getattr(server, "server_state", None), "connections", ())):
            transport = getattr(connection, "transport", None)
            if transport is not None and (sock := transport.get_extra_info("socket")) is not None:
                self._nodelay(sock)

    @staticmethod
    def _nodelay(sock: Any) -> bool:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return True
        except OSError:  # not TCP after all
            return False


runtime_nodelay = RuntimeNoDelay()


def serving_runtime() -> ModuleType | None:
    """vercel_runtime.vc_init when it is the server running this app, else None. A different
    fact from db.on_vercel() (is this deployment on Vercel?): which server serves the app."""
    return sys.modules.get(VERCEL_RUNTIME)


# --- local runs ------------------------------------------------------------------------


def main() -> None:
    """Serve on 127.0.0.1:$PORT; with no database configured, on an embedded PostgreSQL."""
    import uvicorn

    configure_logging()
    if not db.database_configured():
        stop_embedded_postgres = db.use_embedded_postgres()
        log.info("using the embedded PostgreSQL under .data/postgres")
        # uvicorn, its graceful shutdown done, raises SIGTERM again under the handler it found:
        # the default one ends the process before exit handlers run, pgserver's (which stops
        # this PostgreSQL, as after Ctrl-C) among them. This one stops it first.
        signal.signal(signal.SIGTERM, functools.partial(stop_then_terminate, stop_embedded_postgres))
    uvicorn.run(
        app,
        host=os.environ.get("HOST", "127.0.0.1"),
        port=int(os.environ.get("PORT", "8000")),
        log_config=None,
        log_level=log_level(),
        access_log=False,
    )


def stop_then_terminate(stop: Callable[[], None], signum: int, frame: FrameType | None) -> None:
    """A signal handler: call `stop`, then let the signal end the process as it would have."""
    stop()
    log.info("the embedded PostgreSQL stopped")
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)


# `uvicorn app:app` installed its plain-text logging before importing this module, and logs
# "Started server process" before the lifespan startup: under it, logging is set up now.
if uvicorn_text_logging():
    configure_logging()

if __name__ == "__main__":
    main()
