"""Prove tests/standins/vercel_harness.py against a small ASGI app of its own.

The app below is written into a temporary directory, so these tests do not
depend on the real app.py.  Besides showing that the harness works, they pin
down the runtime behaviour the service relies on (or must work around):
where the OIDC token comes from, what the SDK's process-wide token cache
returns outside a request, and when `wait_until` work runs and when it is
silently dropped.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest

from standins.vercel_harness import NO_VERCEL_RUNTIME

pytestmark = pytest.mark.slow  # the Vercel harness's own tests (a runtime process per test)

if NO_VERCEL_RUNTIME:  # named on the command line; a whole run leaves the module out (conftest)
    pytest.skip(NO_VERCEL_RUNTIME, allow_module_level=True)
# Only the package root: importing vercel_runtime.vc_init would start a server.
pytest.importorskip("vercel_runtime", reason="vercel-runtime is not installed")
pytest.importorskip("vercel.functions", reason="the vercel SDK is not installed")
pytest.importorskip("starlette", reason="starlette is not installed")

from standins.vercel_harness import RuntimeFailed, VercelRuntime, fake_oidc_token  # noqa: E402

APP_SOURCE = '''
"""Throwaway app for tests/standins/test_vercel_harness.py."""
import asyncio
import hashlib
import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from vercel.functions import wait_until
from vercel.oidc import get_vercel_oidc_token_sync

WORK_DIR = Path(os.environ["WORK_DIR"])
log = logging.getLogger("harness-app")
_tasks = set()


def describe_token():
    # Never echo the token itself: a length and a digest are enough to compare.
    try:
        token = get_vercel_oidc_token_sync()
    except Exception as exc:
        return {"error": type(exc).__name__}
    return {"len": len(token), "sha": hashlib.sha256(token.encode()).hexdigest()[:16]}


def spawn(coro):
    task = asyncio.create_task(coro)
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


@asynccontextmanager
async def lifespan(app):
    (WORK_DIR / "startup").write_text(str(os.getpid()))
    probes = asyncio.Queue()

    async def outside_requests():
        # Created by lifespan, so it runs in no request's context: this is
        # where a pool-refresh loop would live.
        while True:
            kind, fut = await probes.get()
            if kind == "token":
                fut.set_result(describe_token())
            else:
                ran = asyncio.Event()

                async def job():
                    ran.set()

                wait_until(job())
                await asyncio.sleep(0.2)
                fut.set_result({"ran": ran.is_set()})

    spawn(outside_requests())
    app.state.probes = probes
    yield
    print("lifespan shutdown")


async def probe(request):
    fut = asyncio.get_running_loop().create_future()
    await request.app.state.probes.put((request.path_params["kind"], fut))
    return JSONResponse(await fut)


async def token(request):
    return JSONResponse(describe_token())


async def headers(request):
    return JSONResponse(sorted(request.headers.keys()))


async def header_token(request):
    token = request.headers.get("x-vercel-oidc-token", "")
    return JSONResponse({"sha": hashlib.sha256(token.encode()).hexdigest()[:16]})


async def work(request):
    name = request.query_params["name"]
    delay = float(request.query_params.get("delay", "0.5"))

    async def job():
        await asyncio.sleep(delay)
        (WORK_DIR / name).write_text("done")
        log.warning("wait_until done %s", name)

    wait_until(job())
    return JSONResponse({"registered": name}, status_code=202)


async def late(request):
    name = request.query_params["name"]

    async def after_the_request():
        await asyncio.sleep(0.3)
        try:
            wait_until(asyncio.sleep(0))
            outcome = "accepted"
        except RuntimeError:
            outcome = "RuntimeError"
        (WORK_DIR / name).write_text(outcome)

    spawn(after_the_request())
    return JSONResponse({"spawned": name})


async def chatty(request):
    print("print from", request.url.path)
    log.warning("logging from %s", request.url.path)
    return JSONResponse({})


async def sleep(request):
    await asyncio.sleep(float(request.query_params["s"]))
    return JSONResponse({"pid": os.getpid()})


app = Starlette(
    routes=[
        Route("/token", token),
        Route("/probe/{kind}", probe),
        Route("/headers", headers),
        Route("/header-token", header_token),
        Route("/work", work, methods=["POST"]),
        Route("/late", late, methods=["POST"]),
        Route("/chatty", chatty),
        Route("/sleep", sleep),
    ],
    lifespan=lifespan,
)
'''


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def make_runtime(root: Path) -> VercelRuntime:
    root.mkdir(parents=True, exist_ok=True)
    (root / "app.py").write_text(APP_SOURCE)
    return VercelRuntime(cwd=root, env={"WORK_DIR": str(root)})


@pytest.fixture(scope="module")
def runtime(tmp_path_factory: pytest.TempPathFactory):
    with make_runtime(tmp_path_factory.mktemp("shared")) as rt:
        yield rt


def test_serves_requests_like_the_platform(runtime: VercelRuntime) -> None:
    resp = runtime.request("GET", "/headers")
    assert resp.status == 200
    names = resp.json()
    assert not [n for n in names if n.startswith("x-vercel-internal-")]
    assert "x-vercel-oidc-token" not in names  # none given, none in the env
    assert {"x-forwarded-host", "x-vercel-id", "x-real-ip"} <= set(names)

    end = runtime.wait_for_end(resp.invocation_id)
    assert end["payload"]["context"]["requestId"] == resp.request_id
    started = runtime.wait_for(
        lambda m: (
            m["type"] == "handler-started" and m["payload"]["context"]["invocationId"] == resp.invocation_id
        )
    )
    assert started["payload"]["context"]["requestId"] == resp.request_id


def test_oidc_header_reaches_the_sdk(runtime: VercelRuntime) -> None:
    token = fake_oidc_token(time.time() + 3600)
    resp = runtime.request("GET", "/token", oidc_token=token)
    assert resp.json() == {"len": len(token), "sha": digest(token)}
    names = runtime.request("GET", "/headers", oidc_token=token).json()
    assert "x-vercel-oidc-token" in names
    assert token not in runtime.output()


def test_a_clients_own_oidc_header_wins_over_the_platforms(runtime: VercelRuntime) -> None:
    """The runtime's precedence (vercel_runtime.headers.get_oidc_token_for_request): a request's
    public x-vercel-oidc-token, then the platform's internal one. The service must treat the
    header as untrusted input because of this (README: "What a request's headers can and
    cannot change")."""
    platform = fake_oidc_token(time.time() + 3600)
    client = fake_oidc_token(time.time() + 3600, sub="owner:mallory:project:x:environment:production")
    both = runtime.request(
        "GET", "/header-token", oidc_token=platform, headers={"x-vercel-oidc-token": client}
    )
    assert both.json()["sha"] == digest(client)
    assert runtime.request("GET", "/header-token", oidc_token=platform).json()["sha"] == digest(platform)


def test_sdk_cache_serves_the_latest_token_outside_requests(tmp_path: Path) -> None:
    with make_runtime(tmp_path) as rt:
        # Nothing seen yet and no VERCEL_OIDC_TOKEN: the SDK raises.
        assert rt.request("GET", "/probe/token").json() == {"error": "VercelOidcTokenError"}

        now = time.time()
        first = fake_oidc_token(now + 3600)
        second = fake_oidc_token(now + 7200)
        shorter = fake_oidc_token(now + 1800)
        for token in (first, second):
            assert rt.request("GET", "/token", oidc_token=token).json()["sha"] == digest(token)
        assert rt.request("GET", "/probe/token").json()["sha"] == digest(second)

        # The cache keeps the token that expires last, not the newest one,
        # and it only learns tokens the app asked the SDK for in a request.
        rt.request("GET", "/token", oidc_token=shorter)
        assert rt.request("GET", "/probe/token").json()["sha"] == digest(second)


def test_wait_until_work_finishes_after_the_response(runtime: VercelRuntime) -> None:
    marker = runtime.cwd / "job-1"
    resp = runtime.request("POST", "/work?name=job-1&delay=1.0")
    assert resp.status == 202
    assert not marker.exists()  # the response did not wait for the job

    end = runtime.wait_for_end(resp.invocation_id)
    assert marker.read_text() == "done"
    messages = runtime.messages
    done = next(
        i
        for i, m in enumerate(messages)
        if m["type"] == "log" and m["payload"]["context"]["invocationId"] == resp.invocation_id
    )
    assert done < messages.index(end)  # "end" is the platform's "all work finished"
    log = next(x for x in runtime.logs if x.invocation_id == resp.invocation_id)
    assert (log.text, log.level) == ("wait_until done job-1", "warn")


def test_wait_until_only_works_inside_a_live_request(runtime: VercelRuntime) -> None:
    # From a task that lifespan started, wait_until has no invocation to
    # attach to: the SDK closes the coroutine and it never runs.
    assert runtime.request("GET", "/probe/wait_until").json() == {"ran": False}

    # From a task spawned by a request, after that request ended, the
    # runtime's collector is closed and refuses the work.
    resp = runtime.request("POST", "/late?name=late-1")
    runtime.wait_for_end(resp.invocation_id)
    marker = runtime.cwd / "late-1"
    deadline = time.monotonic() + 5
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.read_text() == "RuntimeError"


def test_logs_travel_over_ipc_with_the_request_context(runtime: VercelRuntime) -> None:
    resp = runtime.request("GET", "/chatty")
    runtime.wait_for_end(resp.invocation_id)
    mine = [x for x in runtime.logs if x.invocation_id == resp.invocation_id]
    assert ("print from /chatty\n", "stdout", None) in [(x.text, x.stream, x.level) for x in mine]
    assert ("logging from /chatty", None, "warn") in [(x.text, x.stream, x.level) for x in mine]
    assert "from /chatty" not in runtime.stdout + runtime.stderr


def test_concurrent_requests_share_one_process(runtime: VercelRuntime) -> None:
    results: list[int] = []

    def call() -> None:
        results.append(runtime.request("GET", "/sleep?s=1").json()["pid"])

    threads = [threading.Thread(target=call) for _ in range(4)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - started < 1.9  # overlapped, not queued
    assert len(results) == 4 and len(set(results)) == 1
    runtime.wait_idle()


def test_lifespan_brackets_serving(tmp_path: Path) -> None:
    rt = make_runtime(tmp_path)
    with rt:
        # start() returns only after the lifespan startup finished.
        assert (tmp_path / "startup").read_text() == str(rt.request("GET", "/sleep?s=0").json()["pid"])
    # stop() sends SIGTERM, and uvicorn runs the lifespan shutdown.
    assert any(x.text == "lifespan shutdown\n" and x.invocation_id == "0" for x in rt.logs)


def test_startup_failures_are_reported(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text("import module_that_does_not_exist\n")
    with pytest.raises(RuntimeFailed, match="could not import"):
        VercelRuntime(cwd=tmp_path, start_timeout=10).start()
