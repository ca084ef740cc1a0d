"""Python environments built the way Vercel builds a function's: only its requirements.

Vercel installs a function's `requirements.txt` (with uv) next to its code and bundles
`vercel-runtime` beside it; nothing else is importable there. `function_env()` builds
that environment locally so tests and the benchmark run the app with exactly what a
deploy would have, not with the test venv's packages (pytest, locust, FastAPI, …).

Building one takes tens of seconds, so each is cached under `.cache/function-env/`, keyed
by a hash of the requirement lines, the vercel-runtime pin and the Python version; a
changed requirements.txt simply gets a new directory.

Nothing in the service imports this; it is test and benchmark tooling.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE = REPO_ROOT / ".cache" / "function-env"
RUNTIME_PIN = "0.23.2"  # the vercel-runtime the Vercel CLI bundles (tests/standins/vercel_harness.py)


def requirement_lines(path: Path) -> list[str]:
    """The requirement lines of a requirements file, comments and blank lines dropped."""
    lines = []
    for raw in path.read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def function_env(
    requirements: Iterable[str], *, python: str = sys.executable, runtime: str | None = RUNTIME_PIN
) -> Path:
    """The interpreter of a venv holding `requirements` (plus vercel-runtime), built once.

    `requirements` are requirement lines (see `requirement_lines`). With `runtime=None` no
    vercel-runtime is added (a plain-uvicorn environment).
    """
    lines = list(requirements) + ([f"vercel-runtime=={runtime}"] if runtime else [])
    version = subprocess.run(
        [python, "-c", "import sys, sysconfig; print(sys.version, sysconfig.get_platform())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    key = hashlib.sha256("\n".join([version, *lines]).encode()).hexdigest()[:16]
    target = CACHE / key
    interpreter = target / "bin" / "python"
    if interpreter.exists():
        return interpreter
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a concurrent build of the same env waits for this one
        if interpreter.exists():
            return interpreter
        building = CACHE / f"{key}.building"
        shutil.rmtree(building, ignore_errors=True)
        (CACHE / f"{key}.in").write_text("\n".join(lines) + "\n")
        try:
            _build(building, lines, python)
            building.rename(target)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
    return interpreter


def _build(directory: Path, lines: list[str], python: str) -> None:
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    requirements = directory.with_suffix(".in")
    env = {**os.environ, "VIRTUAL_ENV": str(directory)}
    if uv:
        # uv is what Vercel's build installs requirements with, and it is quick.
        _run([uv, "venv", "-q", "--python", python, str(directory)], env)
        _run(
            [
                uv,
                "pip",
                "install",
                "-q",
                "--python",
                str(directory / "bin" / "python"),
                "-r",
                str(requirements),
            ],
            env,
        )
    else:
        _run([python, "-m", "venv", str(directory)], env)
        _run([str(directory / "bin" / "python"), "-m", "pip", "install", "-q", "-r", str(requirements)], env)


def _run(command: list[str], env: dict[str, str]) -> None:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def installed(interpreter: Path) -> dict[str, str]:
    """name → version of every distribution in that environment."""
    code = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({d.metadata['Name'].lower(): d.version for d in m.distributions()}))"
    )
    return json.loads(
        subprocess.run([str(interpreter), "-c", code], capture_output=True, text=True, check=True).stdout
    )
