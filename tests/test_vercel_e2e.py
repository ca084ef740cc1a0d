"""The real app.py served by Vercel's production Python runtime, end to end.

Every test here runs the service through `VercelRuntime` (tests/standins/vercel_harness.py): the
PyPI `vercel-runtime` that Vercel bundles, started the way the platform starts it, with the
IPC socket the platform reads. Requests arrive the way Vercel's proxy forwards them, the
OIDC token in `x-vercel-internal-oidc-token`; logs, `handler-started` and the per-invocation
`end` (sent only once the invocation's `wait_until` work finished) come back over IPC, in
order, so the tests can tell what happened inside a request and what happened between them.

In IAM mode, STS is moto on loopback (the `sts`/`fresh_sts` fixtures) and Aurora is
`AuroraGateway` in front of the embedded PostgreSQL: it checks every connection's password
as a SigV4 token signed with credentials moto issued, and refuses tokens older than the TTL.
VERCEL_OIDC_TOKEN is never set: the only OIDC tokens are the ones requests carry, as on Vercel.

What is proved:
1. password mode: the API works through the runtime, errors are problem+json, logs are JSON
   lines over IPC carrying the request id;
2. IAM mode: the request's OIDC token is what STS receives, and CRUD works;
3. a replacement that the timer runs between requests presents the newest OIDC token a
   request carried (one request with it is enough), and Aurora accepts its pool; one STS
   call per new token;
4. an OIDC token in its last 15 minutes, which the SDK's full getter would refuse, is used;
5. after a freeze, the replacement's old pool drains inside `wait_until`: the request that
   waited for the replacement does not `end` before the old pool has closed;
6. no OIDC token, STS secret or IAM token shape appears anywhere the runtime wrote.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import json
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest

from standins.vercel_harness import NO_VERCEL_RUNTIME

if NO_VERCEL_RUNTIME:  # named on the command line; a whole run leaves the module out (conftest)
    pytest.skip(NO_VERCEL_RUNTIME, allow_module_level=True)
try:  # only the package root: importing vercel_runtime.vc_init would start a server
    importlib.import_module("vercel_runtime")
except ImportError as error:
    pytest.skip(f"vercel-runtime cannot be imported: {error}", allow_module_level=True)

import asyncpg  # noqa: E402

from iam_support import aurora, oidc_token, vercel_iam_environment  # noqa: E402
from standins.aurora_gateway import AuroraGateway  # noqa: E402
from standins.sts import Sts  # noqa: E402
from standins.vercel_harness import Response, VercelRuntime  # noqa: E402
from support import create_database, drop_database, run_sql, waiting_on_lock  # noqa: E402

pytestmark = pytest.mark.slow  # Vercel's runtime end to end, with token lifetimes and idle timeouts

PROBLEM = "application/problem+json"
SECRET_SHAPES = ("X-Amz-Signature", "X-Amz-Security-Token", "Amz-Credential", "Action=connect")

# Everything each runtime wrote, and every OIDC token handed to one, for test 6's scan.
CAPTURED: list[tuple[str, str]] = []
OIDC_TOKENS: list[str] = []


# --- helpers -----------------------------------------------------------------------------


def new_oidc_token(lifetime: float) -> str:
    token = oidc_token(lifetime)
    OIDC_TOKENS.append(token)
    return token


def token_exp(token: str) -> float:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"]


@contextmanager
def serve(label: str, env: dict[str, str]) -> Iterator[VercelRuntime]:
    """app.py under the Vercel runtime; what it wrote is kept for test 6 once it stops."""
    runtime = VercelRuntime(env=env)
    runtime.start()
    try:
        yield runtime
    finally:
        runtime.stop()
        CAPTURED.append((label, runtime.output()))


@contextmanager
def serve_iam(
    label: str, sts: Sts, database_url: str, ttl: int
) -> Iterator[tuple[AuroraGateway, VercelRuntime]]:
    """serve() in IAM mode, behind Aurora's stand-in for `database_url` (tokens live `ttl` s)."""
    with (
        aurora(database_url, ttl) as gateway,
        serve(label, vercel_iam_environment(gateway, sts, database_url, ttl)) as runtime,
    ):
        yield gateway, runtime


@dataclass(frozen=True)
class Event:
    """One IPC message, in the order the runtime sent it."""

    index: int
    kind: str  # "start" (handler-started), "end" or "log"
    invocation: str
    entry: dict[str, Any] | None  # a log line, parsed, when it is one JSON object
    text: str = ""


def timeline(runtime: VercelRuntime) -> list[Event]:
    events = []
    for index, message in enumerate(runtime.messages):
        kind, payload = message["type"], message.get("payload", {})
        invocation = str(payload.get("context", {}).get("invocationId", ""))
        if kind in ("handler-started", "end"):
            events.append(Event(index, "start" if kind == "handler-started" else "end", invocation, None))
        elif kind == "log":
            text = base64.b64decode(payload.get("message", "")).decode("utf-8", "replace")
            try:
                entry = json.loads(text)
            except ValueError:
                entry = None
            events.append(Event(index, "log", invocation, entry if isinstance(entry, dict) else None, text))
    return events


def logged(events: list[Event], message: str, since: int = 0) -> list[Event]:
    """The log lines whose message is `message`, from IPC index `since` on."""
    return [
        e
        for e in events
        if e.kind == "log" and e.entry is not None and e.entry.get("message") == message and e.index >= since
    ]


def in_flight_at(events: list[Event], index: int) -> set[str]:
    """Invocations started and not yet ended when IPC message `index` was sent."""
    open_ = set()
    for event in events:
        if event.index >= index:
            break
        if event.kind == "start":
            open_.add(event.invocation)
        elif event.kind == "end":
            open_.discard(event.invocation)
    return open_


def describe(events: list[Event]) -> str:
    """The timeline, one line per event, for failure messages (a log's message, no fields)."""

    def what(e: Event) -> str:
        return e.entry.get("message", "") if e.entry else e.text.strip()[:80]

    return "\n".join(f"{e.index:4} {e.kind:5} {e.invocation[:8]:8} {what(e)}" for e in events)


def wait_for_log(runtime: VercelRuntime, message: str, since: int, timeout: float) -> Event:
    deadline = time.monotonic() + timeout
    while True:
        found = logged(timeline(runtime), message, since)
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no {message!r} log within {timeout} s"
        time.sleep(0.02)


def assert_problem(response: Response, status: int, field: str | None = None) -> dict:
    assert response.status == status, response.text
    assert response.header("content-type") == PROBLEM
    body = response.json()
    assert body["type"] == "about:blank" and body["status"] == status and body["title"]
    if field is not None:
        assert field in body["detail"], body
    return body


def crud_round_trip(runtime: VercelRuntime, token: str | None = None) -> dict:
    """Create, read, update, list and delete one todo; every step's status checked."""
    made = runtime.request("POST", "/todos", json={"title": "  e2e round trip "}, oidc_token=token)
    assert made.status == 201, made.text
    todo = made.json()
    assert todo["title"] == "e2e round trip" and made.location == f"/todos/{todo['id']}"
    got = runtime.request("GET", made.location, oidc_token=token)
    assert got.status == 200 and got.json() == todo
    patched = runtime.request("PATCH", f"/todos/{todo['id']}", json={"completed": True}, oidc_token=token)
    assert patched.status == 200 and patched.json()["completed"] is True
    assert patched.json()["updated_at"] > todo["updated_at"]
    listed = runtime.request("GET", "/todos?limit=100", oidc_token=token)
    assert listed.status == 200 and todo["id"] in [t["id"] for t in listed.json()]
    deleted = runtime.request("DELETE", f"/todos/{todo['id']}", oidc_token=token)
    assert deleted.status == 204 and deleted.body == b""
    assert_problem(runtime.request("GET", f"/todos/{todo['id']}", oidc_token=token), 404)
    return todo


class StampedList(list):
    """`Sts.web_identity_tokens` with the wall-clock time each token reached STS."""

    def __init__(self) -> None:
        super().__init__()
        self.times: list[float] = []

    def append(self, token: str) -> None:
        self.times.append(time.time())
        super().append(token)


# --- 1. password mode ------------------------------------------------------------------------


def test_password_mode_api_through_the_vercel_runtime(embedded_postgres: str):
    url = create_database(embedded_postgres)
    try:
        with serve("password", {"DATABASE_URL": url, "LOG_LEVEL": "info"}) as runtime:
            made = runtime.request(
                "POST", "/todos", json={"title": " first "}, headers={"X-Request-ID": "e2e-first-post"}
            )
            assert made.status == 201, made.text
            assert made.header("x-request-id") == "e2e-first-post"
            crud_round_trip(runtime)

            # Three todos, two per page: the Link header leads to the rest, newest first.
            for title in ("second", "third"):
                assert runtime.request("POST", "/todos", json={"title": title}).status == 201
            page = runtime.request("GET", "/todos?limit=2")
            assert page.status == 200 and [t["title"] for t in page.json()] == ["third", "second"]
            link = page.header("link")
            assert link and link.endswith('>; rel="next"') and link.startswith("</todos?")
            rest = runtime.request("GET", link[1 : link.index(">")])
            assert rest.status == 200 and [t["title"] for t in rest.json()] == ["first"]
            assert rest.header("link") is None

            missing = uuid.uuid4()
            assert_problem(runtime.request("GET", f"/todos/{missing}"), 404)
            assert_problem(runtime.request("GET", "/todos/not-a-uuid"), 404)
            assert_problem(runtime.request("POST", "/todos", json={"title": "   "}), 422, "title")
            assert_problem(runtime.request("GET", "/todos?limit=0"), 422, "limit")
            health = runtime.request("GET", "/healthz")
            assert health.status == 200 and health.header("x-request-id")  # one made up for it
            runtime.wait_idle()

            # Logs arrive over IPC, one JSON object per line, tagged with the invocation
            # they belong to and carrying the request id.
            events = timeline(runtime)
            lines = [e for e in events if e.kind == "log"]
            assert lines and [e.text for e in lines if e.entry is None] == []
            entries = [(e.invocation, e.entry) for e in lines if e.entry is not None]
            # The platform records every request; the service's own line adds the errors.
            mine = [entry for invocation, entry in entries if invocation == made.invocation_id]
            assert [entry for entry in mine if entry["message"] == "request"] == []
            access = [entry for _, entry in entries if entry["message"] == "request"]
            assert all(e["status"] >= 400 and e["vercel_id"] and e["request_id"] for e in access), access
            assert {
                ("GET", f"/todos/{missing}", 404),
                ("GET", "/todos/not-a-uuid", 404),
                ("POST", "/todos", 422),
                ("GET", "/todos", 422),
            } <= {(e["method"], e["path"], e["status"]) for e in access}
            assert logged(events, "pool created")
    finally:
        drop_database(embedded_postgres, url)


# --- 2. IAM mode: the OIDC token travels as Vercel sends it ------------------------------------


def test_iam_mode_uses_the_request_oidc_token(fresh_sts: Sts, embedded_database: str):
    token = new_oidc_token(3600)
    with serve_iam("iam", fresh_sts, embedded_database, 60) as (gateway, runtime):
        crud_round_trip(runtime, token)
        ready = runtime.request("GET", "/readyz", oidc_token=token)
        assert ready.status == 200 and ready.json()["auth"] == "iam"

        # No VERCEL_OIDC_TOKEN anywhere: STS can only have had it from the request header.
        assert fresh_sts.web_identity_tokens and fresh_sts.web_identity_tokens[0] == token
        assert set(fresh_sts.web_identity_tokens) == {token}
        assert gateway.accepted and gateway.refused == []


# --- 3. the background replacement finds a valid OIDC token ------------------------------------


def test_background_replacement_uses_the_latest_oidc_token(
    fresh_sts: Sts, embedded_database: str, monkeypatch: pytest.MonkeyPatch
):
    ttl = 5  # the timer replaces the pool every 3.5 s
    # Credentials shorter than botocore's refresh window: every replacement calls STS.
    fresh_sts.credential_lifetime = 15
    presented = StampedList()
    monkeypatch.setattr(fresh_sts, "web_identity_tokens", presented)

    with serve_iam("iam-background", fresh_sts, embedded_database, ttl) as (gateway, runtime):
        # Token A expires a few seconds after B arrives, during the quiet phase, so that a
        # replacement reading a stale request context would find an expired token there.
        token_a = new_oidc_token(6)
        started = time.monotonic()
        made = runtime.request("POST", "/todos", json={"title": "with A"}, oidc_token=token_a)
        assert made.status == 201, made.text
        assert runtime.request("GET", "/todos", oidc_token=token_a).status == 200
        assert (
            runtime.request("PATCH", made.location, json={"completed": True}, oidc_token=token_a).status
            == 200
        )
        a_done = time.monotonic()
        assert a_done - started < 4, "setup too slow for token A's short life"
        assert fresh_sts.web_identity_tokens[0] == token_a

        # One request with B is enough: the next replacement, between requests, presents it.
        token_b = new_oidc_token(3600)
        assert runtime.request("GET", "/todos", oidc_token=token_b).status == 200
        runtime.wait_idle()
        quiet_from = time.time()
        quiet_index = len(runtime.messages)
        accepted_before = len(gateway.accepted)

        # No requests now: only the timer can replace the pool.
        time.sleep(8)
        idle_end_index = len(runtime.messages)
        events = timeline(runtime)
        background = [e for e in logged(events, "pool replaced", quiet_index) if e.index < idle_end_index]
        assert len(background) >= 2, "the timer did not keep replacing the pool while idle"
        for event in background:
            assert in_flight_at(events, event.index) == set()  # no request was running
        assert not logged(events, "pool replacement failed", quiet_index)

        # What STS received while idle: B, the latest token requests carried, each time
        # unexpired, including after A (still in the old request context) had expired.
        idle_calls = [
            (t, token) for t, token in zip(presented.times, presented, strict=True) if t > quiet_from
        ]
        assert idle_calls, "no STS call during the idle replacements"
        assert all(token == token_b for _, token in idle_calls)
        assert all(token_exp(token) > t for t, token in idle_calls)
        assert any(t > token_exp(token_a) for t, _ in idle_calls)
        # One STS call per new token (credentials this short-lived need one for each).
        tokens = len(logged(events, "pool created")) + len(logged(events, "pool replaced"))
        assert fresh_sts.calls <= tokens, f"{fresh_sts.calls} STS calls for {tokens} tokens"
        # Aurora accepted the new pools' connections, refused nothing.
        assert len(gateway.accepted) > accepted_before and gateway.refused == []

        after = runtime.request("GET", made.location, oidc_token=token_b)
        assert after.status == 200 and after.json()["completed"] is True


# --- 4. an OIDC token in its last 15 minutes is still good -------------------------------------


def test_oidc_token_in_its_last_15_minutes_is_used(fresh_sts: Sts, embedded_database: str):
    from vercel.oidc.utils import get_token_payload, is_expired

    token = new_oidc_token(600)
    # The SDK's full getter (get_vercel_oidc_token) treats this token as expired and would
    # try to refresh it through the Vercel CLI; the service must use it as it is.
    assert is_expired(get_token_payload(token))
    ttl = 3
    fresh_sts.credential_lifetime = 15
    with serve_iam("iam-last-15-minutes", fresh_sts, embedded_database, ttl) as (gateway, runtime):
        crud_round_trip(runtime, token)
        runtime.wait_idle()
        calls = fresh_sts.calls
        time.sleep(ttl * 0.7 + 1)  # one timer-driven replacement, outside any request
        assert fresh_sts.calls > calls
        assert runtime.request("GET", "/todos", oidc_token=token).status == 200
        assert set(fresh_sts.web_identity_tokens) == {token}
        assert not logged(timeline(runtime), "pool replacement failed")
        assert gateway.refused == []


# --- 5. a replacement's old pool drains inside wait_until --------------------------------------


class RowLock:
    """Holds `SELECT … FOR UPDATE` on one todo from outside the service, until released.

    A PATCH of that todo then waits in the database, keeping one connection of the pool it
    came from busy: that pool cannot finish draining before the lock is released.
    """

    def __init__(self, database_url: str, todo_id: str):
        self.database_url, self.todo_id = database_url, uuid.UUID(todo_id)
        self._locked, self._release = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._hold()), daemon=True)

    async def _hold(self) -> None:
        connection = await asyncpg.connect(self.database_url)
        try:
            async with connection.transaction():
                await connection.execute("SELECT 1 FROM todos WHERE id = $1 FOR UPDATE", self.todo_id)
                self._locked.set()
                await asyncio.to_thread(self._release.wait)
        finally:
            await connection.close()

    def __enter__(self) -> RowLock:
        self._thread.start()
        assert self._locked.wait(10), "could not lock the row"
        return self

    def release(self) -> None:
        self._release.set()
        self._thread.join(10)

    def __exit__(self, *exc: object) -> None:
        self.release()


def in_thread(call: Any, *args: Any, **kwargs: Any) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(call(*args, **kwargs)), daemon=True)
    thread.start()
    return thread, result


def patch_held_by_the_row_lock(
    runtime: VercelRuntime, database_url: str, location: str, title: str, token: str, deadline: float
) -> tuple[threading.Thread, list]:
    """PATCH the todo at `location` from a thread, and return once the PATCH waits in the
    database behind a RowLock, failing if it does not by `deadline` (time.monotonic()): its
    connection stays busy until the lock is released. The thread and its answer, as in_thread()."""
    patch, patched = in_thread(runtime.request, "PATCH", location, json={"title": title}, oidc_token=token)
    while waiting_on_lock(database_url) == 0:
        assert time.monotonic() < deadline, "the PATCH never reached the row lock"
        time.sleep(0.02)
    return patch, patched


def test_thawed_request_keeps_the_instance_alive_until_the_old_pool_closed(
    fresh_sts: Sts, embedded_database: str
):
    """A request that wakes a frozen instance with a due pool `end`s only after the old pool closed.

    Vercel freezes an instance between invocations, so the pool's timer cannot fire; on the
    thaw the overdue timer and the waking request meet, the request waits for the
    replacement, and the instance may be frozen again as soon as that request's `end` is
    sent. The old pool must have drained (its in-flight queries finished) and closed by then.
    A PATCH held in the database by a row lock keeps one old-pool connection busy, so the
    drain lasts until the test releases the lock, after the GET's response: without that,
    the old pool closes within milliseconds and the order of `end` and "replaced pool
    closed" would be a coin toss. The PATCH waits ~3.5 s, well inside the service's deadline
    for one database operation (db.OPERATION_DEADLINE).
    """
    ttl = 3  # timer at 2.1 s, due at 2.4 s, expired at 2.85 s, from the second the token is dated
    token = new_oidc_token(3600)
    with serve_iam("iam-wait-until", fresh_sts, embedded_database, ttl) as (gateway, runtime):
        made = runtime.request("POST", "/todos", json={"title": "locked"}, oidc_token=token)
        assert made.status == 201, made.text
        with RowLock(embedded_database, made.json()["id"]) as lock:
            # Start right after a replacement, so the next one is over a second away (2.1 s
            # after the second its token is dated: 1.1 to 2.1 s after it was made).
            wait_for_log(runtime, "pool replaced", len(runtime.messages), ttl)
            anchor = time.monotonic()
            patch, patched = patch_held_by_the_row_lock(
                runtime, embedded_database, made.location, "after the thaw", token, anchor + 1.5
            )

            # Freeze the instance, as Vercel does between invocations, until its pool is due;
            # its timer cannot fire meanwhile. A request arrives while it is frozen and waits
            # in the socket backlog, as the platform's next invocation would.
            runtime.signal(signal.SIGSTOP)
            try:
                assert time.monotonic() - anchor < 0.8, "froze too late: the timer may have fired"
                time.sleep(max(0.0, anchor + ttl * 0.8 + 0.4 - time.monotonic()))
                frozen_at = len(runtime.messages)
                get, got = in_thread(runtime.request, "GET", "/todos", oidc_token=token)
                time.sleep(0.3)
            finally:
                runtime.signal(signal.SIGCONT)
            get.join(15)
            assert got and got[0].status == 200, got and got[0].text
            # The old pool still has the PATCH's connection; only now may it finish.
            time.sleep(0.3)
            lock.release()
            patch.join(15)
        assert patched and patched[0].status == 200, patched and patched[0].text
        assert patched[0].json()["title"] == "after the thaw"  # the in-flight query finished

        runtime.wait_for_end(got[0].invocation_id, timeout=15)
        wait_for_log(runtime, "replaced pool closed", frozen_at, 15)
        runtime.wait_idle(15)
        events = timeline(runtime)
        (get_end,) = [e for e in events if e.kind == "end" and e.invocation == got[0].invocation_id]
        replaced = logged(events, "pool replaced", frozen_at)
        assert replaced and replaced[0].index < get_end.index, "no replacement while the GET was in flight"
        closed = logged(events, "replaced pool closed", replaced[0].index)
        assert closed, "the replaced pool never closed\n" + describe(events)
        # The platform may freeze the instance as soon as `end` is sent: the old pool's
        # drain must have finished by then, i.e. it ran inside this invocation's wait_until.
        assert closed[0].index < get_end.index, (
            f"the GET's invocation {get_end.invocation[:8]} ended before the old pool closed: the "
            f"drain was not inside its wait_until\n{describe(events)}"
        )
        assert "wait_until task failed" not in runtime.output()
        assert gateway.refused == []


# --- 6. no secret in anything the runtime wrote --------------------------------------------------


def test_no_secret_in_runtime_output(fresh_sts: Sts, embedded_database: str):
    # A short scenario of its own, with errors, /readyz and STS-driven replacements, so that
    # this test proves something when it runs alone; then every runtime of this module.
    ttl = 2
    token = new_oidc_token(3600)
    fresh_sts.credential_lifetime = 15
    bodies = []
    with serve_iam("iam-secrets", fresh_sts, embedded_database, ttl) as (gateway, runtime):
        crud_round_trip(runtime, token)
        for method, path, body in (
            ("POST", "/todos", "{not json"),
            ("POST", "/todos", '{"title": 5}'),
            ("GET", "/readyz", None),
            ("GET", "/openapi.json", None),
        ):
            response = runtime.request(
                method, path, body=body, oidc_token=token, headers={"content-type": "application/json"}
            )
            assert response.status < 500, response.text
            bodies.append(response.text + json.dumps(response.headers))
        time.sleep(ttl * 0.7 + 0.8)
        assert runtime.request("GET", "/readyz", oidc_token=token).status == 200
        assert gateway.refused == []
    assert fresh_sts.calls >= 2

    secrets = [("OIDC token", t) for t in OIDC_TOKENS] + [("STS secret", s) for s in fresh_sts.secrets() if s]
    assert len(secrets) > 2
    hits = []
    for label, text in CAPTURED + [("response", b) for b in bodies]:
        assert text, f"{label}: nothing captured"
        hits += [f"{kind} in {label}" for kind, secret in secrets if secret in text]
        hits += [f"{shape!r} in {label}" for shape in SECRET_SHAPES if shape in text]
    # Only names in the message: never print a secret, even a test one.
    assert hits == []


# --- 7. idle release: a suspended instance holds no connection ---------------------------------


def backends(admin_url: str, database: str) -> int:
    """Connections to `database` that PostgreSQL has open now."""
    return run_sql(admin_url, f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{database}'")[0][0]


def test_idle_connections_close_before_the_invocation_ends(embedded_postgres: str):
    """Vercel's `attachDatabasePool`, for Python: after a burst, the invocations that leave
    idle connections behind end only once those have closed, so an instance frozen right
    after its last `end` holds nothing open on the database."""
    url = create_database(embedded_postgres)
    database = urlsplit(url).path.lstrip("/")
    idle = 2  # DB_IDLE_TIMEOUT; on Vercel DB_POOL_MIN defaults to 0
    try:
        with serve(
            "idle-release", {"DATABASE_URL": url, "DB_IDLE_TIMEOUT": str(idle), "LOG_LEVEL": "info"}
        ) as runtime:
            assert runtime.request("GET", "/todos").status == 200  # the pool and the schema
            runtime.wait_idle(idle + 5)

            burst_at = len(runtime.messages)
            with ThreadPoolExecutor(20) as pool:
                answers = list(
                    pool.map(
                        lambda i: runtime.request("POST", "/todos", json={"title": f"burst {i}"}), range(20)
                    )
                )
            answered = time.monotonic()
            assert [a.status for a in answers] == [201] * 20
            assert backends(embedded_postgres, database) >= 1, "the burst should have left connections open"
            for answer in answers:
                runtime.wait_for_end(answer.invocation_id, timeout=idle + 5)
            ended = time.monotonic()
            # The platform may freeze the instance as soon as the last `end` is sent.
            runtime.signal(signal.SIGSTOP)
            try:
                counts = []
                for _ in range(15):  # 1.5 s, frozen: nothing can close a connection now
                    counts.append(backends(embedded_postgres, database))
                    time.sleep(0.1)
            finally:
                runtime.signal(signal.SIGCONT)
            # A backend notices its client's close within milliseconds; allow it 0.5 s.
            assert counts[5:] == [0] * 10, f"a suspended instance kept connections open: {counts}"
            assert ended - answered < idle + 3, "idle connections outlived DB_IDLE_TIMEOUT + margin"

            events = timeline(runtime)
            closed = logged(events, "idle connections closed", burst_at)
            assert closed, describe(events[-40:])
            ends = [e.index for e in events if e.kind == "end" and e.index > burst_at]
            assert max(ends) > closed[0].index, "the last invocation ended before its idle connections closed"

            ready = runtime.request("GET", "/readyz")
            assert ready.status == 200
            assert ready.json()["idle_release"]["idle_timeout_seconds"] == idle
            assert ready.json()["pool"]["min"] == 0
    finally:
        drop_database(embedded_postgres, url)


# --- 8. a drain never outlives the invocation's deadline ---------------------------------------


def test_drain_is_terminated_at_the_invocation_deadline(fresh_sts: Sts, embedded_database: str):
    """A replaced pool whose last query is stuck behind a row lock cannot drain; the
    invocation that waits for it must still end before its deadline (Vercel would cut it
    there and freeze the instance with the old pool open): the rest is terminated, and the
    stuck query is retried on the new pool, losing nothing."""
    from datetime import UTC, datetime, timedelta

    import db

    ttl = 3  # the timer replaces the pool 2.1 s after the second its token is dated
    token = new_oidc_token(3600)
    with serve_iam("iam-drain-deadline", fresh_sts, embedded_database, ttl) as (gateway, runtime):
        made = runtime.request("POST", "/todos", json={"title": "locked"}, oidc_token=token)
        assert made.status == 201, made.text
        with RowLock(embedded_database, made.json()["id"]) as lock:
            since = len(runtime.messages)
            patch, patched = patch_held_by_the_row_lock(
                runtime,
                embedded_database,
                made.location,
                "after the drain",
                token,
                time.monotonic() + 2,
            )
            wait_for_log(runtime, "pool replaced", since, ttl + 2)  # the PATCH's pool now drains

            budget = 2.5
            asked = time.monotonic()
            got = runtime.request(
                "GET", "/todos", oidc_token=token, deadline=datetime.now(UTC) + timedelta(seconds=budget)
            )
            assert got.status == 200, got.text
            runtime.wait_for_end(got.invocation_id, timeout=budget + 2)
            ended = time.monotonic() - asked
            assert waiting_on_lock(embedded_database) >= 1, "the lock was meant to outlast the GET"
            assert ended < budget, f"the GET ended {ended:.2f} s after it was sent, past its deadline"
            assert ended > budget - db.DEADLINE_MARGIN - 0.5, "the GET did not wait for the drain at all"
            lock.release()
            patch.join(15)
        assert patched and patched[0].status == 200, patched and patched[0].text
        assert patched[0].json()["title"] == "after the drain"
        assert logged(
            timeline(runtime), "invocation deadline: replaced pool terminated before it drained", since
        )
        assert gateway.refused == []
