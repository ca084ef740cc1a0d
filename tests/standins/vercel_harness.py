"""Serve an ASGI module the way Vercel's production Python runtime does.

Vercel deploys `app.py` by bundling PyPI's `vercel-runtime` (the CLI pins
0.23.2) next to it and starting it through a generated trampoline that sets
the `__VC_HANDLER_*` variables and imports `vercel_runtime.vc_init`.  The
platform side is not public, but the runtime's half of the contract is:

* The platform listens on a Unix socket and passes its path in
  `VERCEL_IPC_PATH`.  The runtime connects at import time and only ever
  *writes* to it: JSON objects, each terminated by a NUL byte.  Message types:
  `server-started` (payload `httpPort`, `initDuration`, `userInitDuration`),
  `handler-started` and `end` (payload `context.invocationId` /
  `context.requestId`), `log` (base64 `message` plus `stream` for
  stdout/stderr or `level` for the logging module), `metric` (urllib3 fetch
  timings) and `unrecoverable-error` (import failures).  Nothing is read back.
* For an ASGI app the runtime binds 127.0.0.1 on an ephemeral port, announces
  it with `server-started`, and only then runs the vendored uvicorn (lifespan
  "auto", one event loop, no concurrency limit).  Requests are plain HTTP/1.1
  to that port.  The proxy adds `x-vercel-internal-*` headers: invocation id,
  request id, span/trace ids, deadline and the OIDC token; the runtime strips
  all of them and re-adds the token as the public `x-vercel-oidc-token`.
* Since 0.24, when the IPC socket is at `/opt/vercel/ipc.sock` (Vercel's newer
  host, "Hive"), the runtime sends `server-started` only once lifespan startup has
  finished, and a failed startup is fatal; elsewhere it still announces the port
  first.  `hive=True` plays that host: the runtime runs in a private mount
  namespace of its own where the harness's socket directory is mounted on
  /opt/vercel, so parallel runs never share the path (needs root).
* `vercel.functions.wait_until()` lands in a per-request collector; after the
  app returns, the runtime awaits everything registered and only then sends
  the `end` message.  So "end arrived" means "wait_until work finished".

`VercelRuntime` plays the platform's side of all that so tests can run the
real runtime code path locally.  It lives under tests/ because it is only a
test utility; nothing in the service imports it.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import itertools
import json as jsonlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]

# The version `vercel` CLI 64 pins for production builds; tests should run
# against the same code the platform bundles.
RUNTIME_PIN = "0.23.2"
# The newest on PyPI: the builder moves to it without asking, so the serving tests run on it too.
NEWEST_RUNTIME = "0.24.1"
HIVE_IPC_PATH = "/opt/vercel/ipc.sock"
# Why Vercel's runtime cannot serve here, or None: it needs Python 3.12 or later. A value
# rather than a version check at each use, so that the type checker (set to 3.11, the oldest
# Python the service runs on) still reads what follows such a check.
NO_VERCEL_RUNTIME = (
    f"vercel-runtime needs Python 3.12 or later (this is {sys.version.split()[0]})"
    if sys.version_info < (3, 12)
    else None
)


@dataclass(frozen=True)
class RuntimeVariant:
    """A vercel-runtime version, and whether it runs as on Hive (IPC at HIVE_IPC_PATH)."""

    version: str
    hive: bool = False

    def __str__(self) -> str:
        return f"runtime-{self.version}{'-hive' if self.hive else ''}"


BUILDER_RUNTIME = RuntimeVariant(RUNTIME_PIN)
# The builder's pin, and the newest in both of its modes.
RUNTIME_VARIANTS = [
    BUILDER_RUNTIME,
    RuntimeVariant(NEWEST_RUNTIME),
    RuntimeVariant(NEWEST_RUNTIME, hive=True),
]


def hive_unavailable() -> str | None:
    """Why `hive=True` cannot run here, or None: it needs root and unshare(1) for a private
    mount namespace, and a directory /opt/vercel to mount over (made here if missing)."""
    if os.geteuid() != 0:
        return "playing Vercel's Hive host needs root (a private mount namespace on /opt/vercel)"
    if shutil.which("unshare") is None:
        return "no unshare(1) on PATH (util-linux)"
    try:
        os.makedirs(os.path.dirname(HIVE_IPC_PATH), exist_ok=True)
    except OSError as error:
        return f"cannot make {os.path.dirname(HIVE_IPC_PATH)}: {error}"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"unshare --mount failed: {probe.stderr.decode(errors='replace').strip()}"
    return None


# Header names are the runtime's own constants (vercel_runtime.headers,
# vercel_runtime.deadline, vc_init.ASGIMiddleware).
INTERNAL_INVOCATION_ID = "x-vercel-internal-invocation-id"
INTERNAL_REQUEST_ID = "x-vercel-internal-request-id"
INTERNAL_SPAN_ID = "x-vercel-internal-span-id"
INTERNAL_TRACE_ID = "x-vercel-internal-trace-id"
INTERNAL_DEADLINE = "x-vercel-internal-deadline"
INTERNAL_OIDC_TOKEN = "x-vercel-internal-oidc-token"
PING_PATH = "/_vercel/ping"

# Vercel region -> AWS region the function runs in; Lambda exports it as
# AWS_REGION/AWS_DEFAULT_REGION, which boto3 (and so auth.py) will see.
_AWS_REGION_OF = {
    "iad1": "us-east-1",
    "cle1": "us-east-2",
    "pdx1": "us-west-2",
    "sfo1": "us-west-1",
    "fra1": "eu-central-1",
    "dub1": "eu-west-1",
}


@dataclass(frozen=True)
class IpcLog:
    """One `log` message the runtime forwarded over IPC."""

    text: str
    stream: str | None  # "stdout" / "stderr" for print() and raw writes
    level: str | None  # "debug".."fatal" for the logging module
    invocation_id: str  # "0" when logged outside any request
    request_id: int


@dataclass
class Response:
    """What the proxy got back for one request."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    invocation_id: str
    request_id: int
    elapsed: float

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    @property
    def location(self) -> str:
        """The Location header, which a test reading it expects the response to carry."""
        location = self.header("location")
        assert location is not None, f"no Location header: {self.status} {self.text[:300]}"
        return location

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self) -> Any:
        return jsonlib.loads(self.body)


@dataclass
class _Collected:
    """State shared between the reader threads and the test thread."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)


class RuntimeFailed(RuntimeError):
    """The runtime exited or never became ready; the message carries its logs."""


class VercelRuntime:
    """Run `entrypoint` under `vercel_runtime.vc_init` with a fake platform.

    Use as a context manager (or call start()/stop()).  `cwd` is the
    deployment root, like /var/task: the entrypoint path is relative to it and
    it is the process's working directory.  `env` is added on top of a
    Lambda-like environment; with `inherit_env=False` (the default) nothing
    else from the test process leaks in, so a missing variable shows up here
    the way it would in production.  With `record=False` (for load tests)
    messages after `server-started` are counted by type, not kept.
    `ready_poll` is the interval of the readiness ping during start().
    With `hive=True` the runtime finds its IPC socket at HIVE_IPC_PATH (see the module
    docstring) and announces its port only after lifespan startup.
    """

    def __init__(
        self,
        entrypoint: str = "app.py",
        *,
        cwd: str | os.PathLike[str] = REPO_ROOT,
        env: Mapping[str, str] | None = None,
        variable: str = "app",
        python: str | None = None,
        inherit_env: bool = False,
        region: str = "iad1",
        host: str = "aurora-todo.vercel.app",
        max_duration: float = 30.0,
        start_timeout: float = 30.0,
        record: bool = True,
        ready_poll: float = 0.05,
        hive: bool = False,
    ) -> None:
        self.cwd = Path(cwd).resolve()
        self.entrypoint = entrypoint
        self.variable = variable
        self.python = python or sys.executable
        self.region = region
        self.host = host
        self.max_duration = max_duration
        self.start_timeout = start_timeout
        self._extra_env = dict(env or {})
        self._inherit_env = inherit_env
        self.record = record
        self.ready_poll = ready_poll
        self.hive = hive
        self.counts: dict[str, int] = {}  # messages by type, with record=False
        self.launched_at: float | None = None  # time.perf_counter() just before the process launch

        self.port: int | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._c = _Collected()
        self._tmpdir: str | None = None
        self._listener: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._ipc_thread: threading.Thread | None = None
        self._request_ids = itertools.count(1)
        self._ids_lock = threading.Lock()
        self._answered: set[str] = set()  # invocations whose response `request` has read
        self._stopping = threading.Event()

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> VercelRuntime:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def build_env(self) -> dict[str, str]:
        """The subprocess environment (less VERCEL_IPC_PATH): a Vercel function's, plus `env`."""
        module = self.entrypoint.removesuffix(".py").replace("/", ".")
        module = module.removesuffix(".__init__")
        base = (
            dict(os.environ)
            if self._inherit_env
            else {
                "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
                "LANG": "en_US.UTF-8",
            }
        )
        aws_region = _AWS_REGION_OF.get(self.region, "us-east-1")
        env = {
            **base,
            "VERCEL": "1",
            "VERCEL_ENV": "production",
            "VERCEL_TARGET_ENV": "production",
            "VERCEL_REGION": self.region,
            "VERCEL_URL": self.host,
            "AWS_REGION": aws_region,
            "AWS_DEFAULT_REGION": aws_region,
            "TZ": ":UTC",
            "PYTHONDONTWRITEBYTECODE": "1",
            # What the generated trampoline (@vercel/python) exports.
            "__VC_HANDLER_MODULE_NAME": module,
            "__VC_HANDLER_ENTRYPOINT": self.entrypoint,
            "__VC_HANDLER_ENTRYPOINT_ABS": str(self.cwd / self.entrypoint),
            "__VC_HANDLER_VARIABLE_NAME": self.variable,
            "__VC_HANDLER_VENDOR_DIR": "_vendor",
            **self._extra_env,
        }
        return env

    def start(self) -> VercelRuntime:
        if self.proc is not None:
            raise RuntimeError("already started")
        # AF_UNIX paths are limited to ~108 bytes, so keep it short and in /tmp.
        self._tmpdir = tempfile.mkdtemp(prefix="vcipc-", dir="/tmp")
        socket_path = os.path.join(self._tmpdir, "ipc.sock")
        env = {**self.build_env(), "VERCEL_IPC_PATH": HIVE_IPC_PATH if self.hive else socket_path}
        command = [self.python, "-c", "import vercel_runtime.vc_init"]
        if self.hive:
            # The same socket, seen at Hive's path inside a mount namespace of the runtime's own.
            command = [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                'mount --bind "$0" /opt/vercel && exec "$@"',
                self._tmpdir,
                *command,
            ]
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(socket_path)
        listener.listen(1)
        # The runtime connects once, at import time, and silently drops every
        # message if that fails, so the listener must exist before it starts.
        self._listener = listener
        self._ipc_thread = self._spawn_thread(self._ipc_loop)

        boot_ms = str(int(time.monotonic() * 1000))
        self.launched_at = time.perf_counter()
        self.proc = subprocess.Popen(
            command,
            cwd=self.cwd,
            env={**env, "__VC_PY_BOOT_START_MS": boot_ms},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._spawn_thread(self._pipe_loop, self.proc.stdout, self._c.stdout)
        self._spawn_thread(self._pipe_loop, self.proc.stderr, self._c.stderr)

        try:
            started = self.wait_for(
                lambda m: m["type"] in ("server-started", "unrecoverable-error"),
                timeout=self.start_timeout,
            )
            if started["type"] != "server-started":
                # It exits right after reporting; wait so the code is in the message.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
                raise RuntimeFailed(self._failure("runtime reported an unrecoverable error"))
            self.port = int(started["payload"]["httpPort"])
            self._wait_until_serving()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_until_serving(self) -> None:
        # server-started is sent *before* uvicorn runs the lifespan startup
        # (except on Hive, from 0.24); the port already listens, so
        # connections queue in the backlog.  A ping is answered only once
        # startup finished, as the platform's readiness probe would be.
        deadline = time.monotonic() + self.start_timeout
        while True:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.start_timeout)
            try:
                conn.request("GET", PING_PATH)
                if conn.getresponse().status == 200:
                    return
            except (OSError, http.client.HTTPException):
                pass
            finally:
                conn.close()
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeFailed(self._failure("runtime exited during startup"))
            if time.monotonic() > deadline:
                raise RuntimeFailed(self._failure("runtime did not answer the readiness ping"))
            time.sleep(self.ready_poll)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (uvicorn then runs lifespan shutdown), SIGKILL after `timeout`."""
        self._stopping.set()
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            code = self.proc.returncode
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        # The IPC reader ends at EOF, i.e. once the runtime's process is gone.
        for t in self._threads:
            t.join(5)
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        return code

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def signal(self, signum: int) -> None:
        """Send the started runtime a signal (SIGSTOP and SIGCONT: a frozen instance)."""
        assert self.proc is not None, "the runtime was never started"
        self.proc.send_signal(signum)

    # -- platform side: reading what the runtime says ------------------------

    def _spawn_thread(self, target: Callable[..., None], *args: Any) -> threading.Thread:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self._threads.append(t)
        return t

    def _ipc_loop(self) -> None:
        assert self._listener is not None
        self._listener.settimeout(0.2)
        conn = None
        while conn is None and not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
        if conn is None:
            return
        buf = b""
        with conn:
            while chunk := conn.recv(262144):
                if not self.record and self.port is not None:
                    # A load test: count messages in C (bytes.count), parse nothing, so that the
                    # stand-in's own work competes as little as possible with the server's.
                    data = buf + chunk
                    end = data.rfind(b"\0") + 1
                    done, buf = data[:end], data[end:]
                    for kind in ("log", "handler-started", "end"):
                        self.counts[kind] = self.counts.get(kind, 0) + done.count(
                            b'{"type": "%s"' % kind.encode()
                        )
                    continue
                buf += chunk
                *frames, buf = buf.split(b"\0")
                with self._c.cond:
                    for frame in frames:
                        if frame:
                            self._c.messages.append(jsonlib.loads(frame))
                    self._c.cond.notify_all()
        with self._c.cond:
            self._c.cond.notify_all()

    def _pipe_loop(self, pipe: Any, sink: list[str]) -> None:
        for line in iter(pipe.readline, b""):
            with self._c.cond:
                sink.append(line.decode("utf-8", errors="replace"))
                self._c.cond.notify_all()
        pipe.close()

    @property
    def messages(self) -> list[dict[str, Any]]:
        """Every IPC message so far, in the order the runtime sent them."""
        with self._c.cond:
            return list(self._c.messages)

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        """The first IPC message matching `predicate`, waiting up to `timeout`."""
        end = time.monotonic() + timeout
        with self._c.cond:
            while True:
                for m in self._c.messages:
                    if predicate(m):
                        return m
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(self._failure("no matching IPC message"))
                if self.proc is not None and self.proc.poll() is not None and not self._ipc_open():
                    raise RuntimeFailed(self._failure("runtime exited"))
                self._c.cond.wait(min(left, 0.2))

    def _ipc_open(self) -> bool:
        return self._ipc_thread is not None and self._ipc_thread.is_alive()

    def wait_for_end(self, invocation_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """The `end` message of one request.

        The runtime sends it only after every awaitable registered with
        `wait_until` during that request has finished (or failed, which it
        logs as "wait_until task failed").
        """
        return self.wait_for(
            lambda m: m["type"] == "end" and m["payload"]["context"]["invocationId"] == invocation_id,
            timeout,
        )

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Wait until every started invocation, and every one `request` has the response of,
        has sent `end`.

        A client has its response before `end` arrives (wait_until work and
        bookkeeping run after the body), so check this, not the responses. It may have it
        before even `handler-started` was read here (another socket, another thread): the
        answered invocations count too.
        """
        end = time.monotonic() + timeout
        while pending := self.unended():
            if time.monotonic() > end:
                raise TimeoutError(self._failure(f"invocations never ended: {sorted(pending)}"))
            with self._c.cond:
                self._c.cond.wait(0.05)

    def unended(self) -> set[str]:
        """Invocations that started or were answered, but whose `end` has not arrived."""
        with self._ids_lock:
            begun: set[str] = set(self._answered)  # answered, whether or not handler-started was read
        ended: set[str] = set()
        for m in self.messages:
            if m["type"] in ("handler-started", "end"):
                inv = m["payload"]["context"]["invocationId"]
                (begun if m["type"] == "handler-started" else ended).add(inv)
        return begun - ended

    @property
    def logs(self) -> list[IpcLog]:
        out = []
        for m in self.messages:
            if m["type"] != "log":
                continue
            p = m["payload"]
            out.append(
                IpcLog(
                    text=base64.b64decode(p.get("message", "")).decode("utf-8", errors="replace"),
                    stream=p.get("stream"),
                    level=p.get("level"),
                    invocation_id=str(p["context"]["invocationId"]),
                    request_id=int(p["context"]["requestId"]),
                )
            )
        return out

    @property
    def stdout(self) -> str:
        """Raw process stdout.  Mostly empty: the runtime redirects print()/sys.stdout to IPC."""
        with self._c.cond:
            return "".join(self._c.stdout)

    @property
    def stderr(self) -> str:
        """Raw process stderr: fatal import errors and pre-handshake leftovers."""
        with self._c.cond:
            return "".join(self._c.stderr)

    def output(self) -> str:
        """Everything the function printed or logged, by any route, for scanning."""
        return "".join(log.text for log in self.logs) + self.stdout + self.stderr

    def _failure(self, what: str) -> str:
        errors = [
            m["payload"].get("message", "") for m in self.messages if m["type"] == "unrecoverable-error"
        ]
        return (
            f"{what} (exit code {self.returncode})\n"
            + "".join(f"unrecoverable-error: {e}\n" for e in errors)
            + f"--- logs ---\n{self.output()[-8000:]}"
        )

    # -- platform side: sending requests ---------------------------------------

    def request(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
        body: bytes | str | None = None,
        oidc_token: str | None = None,
        *,
        json: Any = None,
        deadline: datetime | None = None,
        timeout: float | None = None,
        connection: http.client.HTTPConnection | None = None,
    ) -> Response:
        """Send one request the way Vercel's proxy forwards it to the function.

        `oidc_token` travels as `x-vercel-internal-oidc-token`, as on the
        platform; the runtime turns it into `x-vercel-oidc-token`.  `json`
        is a shortcut for a JSON body with its content type.  Each call is
        its own invocation (fresh invocation id, next request id).  Each uses
        a new connection, unless `connection` (from `connect()`) is given: the
        proxy keeps connections alive across invocations, and so can a test.
        """
        if self.port is None:
            raise RuntimeError("runtime not started")
        with self._ids_lock:
            request_id = next(self._request_ids)
        invocation_id = str(uuid.uuid4())
        if deadline is None:
            deadline = datetime.now(UTC) + timedelta(seconds=self.max_duration)

        if json is not None:
            body = jsonlib.dumps(json)
        payload = body.encode() if isinstance(body, str) else body

        hdrs: dict[str, tuple[str, str]] = {}

        def put(name: str, value: str) -> None:
            hdrs[name.lower()] = (name, value)

        # What the edge adds for every request (public, visible to the app).
        client_ip = "203.0.113.7"  # TEST-NET-3: never routed
        put("host", self.host)
        put("x-forwarded-host", self.host)
        put("x-forwarded-proto", "https")
        put("x-forwarded-for", client_ip)
        put("x-real-ip", client_ip)
        put("x-vercel-forwarded-for", client_ip)
        put("x-vercel-deployment-url", self.host)
        put("x-vercel-id", f"{self.region}::{self.region}::{secrets.token_hex(6)}-{int(time.time() * 1000)}")
        if json is not None:
            put("content-type", "application/json")
        items = headers.items() if isinstance(headers, Mapping) else (headers or ())
        for name, value in items:
            put(name, value)
        # The proxy's own headers come last so a caller cannot shadow them,
        # which is also how the platform treats client-supplied copies.
        put(INTERNAL_INVOCATION_ID, invocation_id)
        put(INTERNAL_REQUEST_ID, str(request_id))
        put(INTERNAL_SPAN_ID, secrets.token_hex(8))
        put(INTERNAL_TRACE_ID, secrets.token_hex(16))
        put(
            INTERNAL_DEADLINE,
            deadline.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        )
        if oidc_token is not None:
            put(INTERNAL_OIDC_TOKEN, oidc_token)

        conn = connection or http.client.HTTPConnection(
            "127.0.0.1", self.port, timeout=timeout if timeout is not None else self.max_duration + 5
        )
        started = time.monotonic()
        try:
            conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
            for name, value in hdrs.values():
                conn.putheader(name, value)
            if payload is not None and "content-length" not in hdrs:
                conn.putheader("content-length", str(len(payload)))
            conn.endheaders(payload)
            resp = conn.getresponse()
            data = resp.read()
            if self.record:  # without records, `end` is only counted
                with self._ids_lock:
                    self._answered.add(invocation_id)
            return Response(
                status=resp.status,
                headers=resp.getheaders(),
                body=data,
                invocation_id=invocation_id,
                request_id=request_id,
                elapsed=time.monotonic() - started,
            )
        finally:
            if connection is None:
                conn.close()

    def connect(self, timeout: float | None = None) -> http.client.HTTPConnection:
        """A keep-alive connection to the function's port, for `request(connection=…)`."""
        if self.port is None:
            raise RuntimeError("runtime not started")
        conn = http.client.HTTPConnection(
            "127.0.0.1", self.port, timeout=timeout if timeout is not None else self.max_duration + 5
        )
        conn.connect()
        return conn


def runtime_version() -> str | None:
    """The installed vercel-runtime version, or None when it is missing."""
    from importlib import metadata

    try:
        return metadata.version("vercel-runtime")
    except metadata.PackageNotFoundError:
        return None


def fake_oidc_token(exp: float, **claims: Any) -> str:
    """An unsigned JWT shaped like Vercel's OIDC token.

    The SDK never verifies the signature; it decodes the payload to decide
    which token to cache (the one that expires last), so tests need a real
    `exp`.  Useless against a real STS, which is the point.
    """

    def b64(obj: dict[str, Any]) -> str:
        raw = jsonlib.dumps(obj, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    payload = {
        "iss": "https://oidc.vercel.com/aurora",
        "sub": "owner:aurora:project:aurora-todo:environment:production",
        "aud": "https://vercel.com/aurora",
        "iat": int(time.time()),
        "exp": int(exp),
        **claims,
    }
    return f"{b64({'alg': 'RS256', 'typ': 'JWT'})}.{b64(payload)}.{secrets.token_urlsafe(32)}"
