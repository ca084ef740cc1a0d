"""A TypeScript client of the live service, as a Next.js frontend would write one.

openapi-typescript generates types from the live /openapi.json; tsc --strict checks a client
that calls every route with minimal bodies (tests/typescript/client.ts: its type-level checks
pin which fields and headers are optional) and the README's own snippet; Node runs both
against the service. The npm packages are pinned in tests/typescript/package-lock.json and
installed once under .cache/typescript.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import ROOT, LiveServer, clean_environment, free_port

pytestmark = pytest.mark.slow  # a TypeScript compile and two services

README_BASE_URL = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def services(embedded_database: str) -> Iterator[tuple[LiveServer, LiveServer]]:
    """The service, and a second one whose database does not answer (503)."""
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    with (
        LiveServer(clean_environment(DATABASE_URL=embedded_database)) as service,
        LiveServer(clean_environment(DATABASE_URL=closed)) as down,
    ):
        yield service, down


def readme_snippet() -> str:
    """The TypeScript block of the README's "Call it from TypeScript" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Call it from TypeScript\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```ts\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 1, "the section has one TypeScript snippet"
    return blocks[0]


def test_a_typescript_client_generated_from_the_live_openapi_type_checks_strictly_and_works(
    typescript_toolchain: Path, services: tuple[LiveServer, LiveServer], tmp_path: Path
):
    """POST with only a title, PATCH with only completed, the Idempotency-Key header, Location,
    Link and Retry-After read as the types say, a problem's detail read from `error`: it
    compiles under tsc --strict and runs against the service; so does the README's snippet."""
    service, down = services
    tools = typescript_toolchain / "node_modules" / ".bin"
    # Below the cache folder, so that Node and tsc find its node_modules.
    work = typescript_toolchain / "runs" / tmp_path.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        for name in ("client.ts", "tsconfig.json"):
            shutil.copyfile(ROOT / "tests" / "typescript" / name, work / name)
        snippet = readme_snippet()
        assert snippet.count(README_BASE_URL) == 1
        (work / "readme.ts").write_text(snippet.replace(README_BASE_URL, service.url))

        def run(*command: str | Path, env: dict[str, str] | None = None) -> str:
            result = subprocess.run(
                [str(part) for part in command],
                cwd=work,
                capture_output=True,
                text=True,
                timeout=300,
                env=env,
            )
            assert result.returncode == 0, f"{command[0]} failed:\n{result.stdout}\n{result.stderr}"
            return result.stdout

        # The README's command, against the live service.
        run(tools / "openapi-typescript", f"{service.url}/openapi.json", "-o", "api.d.ts")
        run(tools / "tsc", "--project", "tsconfig.json", "--strict")

        env = {**os.environ, "API_URL": service.url, "DOWN_URL": down.url}
        steps = run("node", "out/client.js", env=env).splitlines()
        assert steps == [
            "ok healthz",
            "ok readyz",
            "ok openapi",
            "ok create, and retry with the same Idempotency-Key",
            "ok create completed",
            "ok list, follow Link, filter",
            "ok get",
            "ok patch",
            "ok a 422 problem's detail",
            "ok a 404 problem",
            "ok a 503 with Retry-After",
            "ok delete",
        ]
        assert re.fullmatch(r"/todos/[0-9a-f-]{36} false\n", run("node", "out/readme.js"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
