"""Check vercel.json the way the Vercel CLI and the Python builder read it.

Schema checks use the CLI's own schema pieces (see tests/vercel_schema.py)
and skip without npm.  The entrypoint check needs nothing: it replays how
@vercel/python 25.0.0 (the builder `vercel@64.0.2` ships) finds a
zero-config entrypoint and matches `functions` patterns against it.  That
matters because with the Python framework preset the CLI does *not* report
a `functions` pattern that matches nothing: a wrong key is silently ignored
and the function runs with default limits.
"""

from __future__ import annotations

import fnmatch
import json
import re
from pathlib import Path

import pytest

import vercel_schema

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG = json.loads((REPO_ROOT / "vercel.json").read_text())

# @vercel/python src/entrypoint.ts: file names tried in each directory, in order.
ENTRYPOINT_NAMES = ["app", "index", "server", "main", "wsgi", "asgi"]
ENTRYPOINT_DIRS = ["", "src", "app", "api"]
# What findAppOrHandler accepts: a top-level app, application or handler.
TOP_LEVEL_APP = re.compile(
    r"^(?:(app|application|handler)\s*(?::[^=]*)?=|(?:async\s+)?def\s+(app|application|handler)\b|class\s+(handler)\b)",
    re.MULTILINE,
)


@pytest.fixture(scope="module")
def schema() -> dict:
    try:
        return vercel_schema.vercel_json_schema()
    except vercel_schema.SchemaUnavailable as exc:
        pytest.skip(f"cannot load Vercel's schema: {exc}")


def test_vercel_json_matches_the_cli_schema(schema: dict) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft7Validator(schema)
    errors = [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(CONFIG)
    ]
    assert errors == []


def test_the_schema_is_not_vacuous(schema: dict) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    validator = jsonschema.Draft7Validator(schema)
    assert not validator.is_valid({**CONFIG, "function": {}})
    assert not validator.is_valid({**CONFIG, "functions": {"app.py": {"maxDuration": "30"}}})
    assert not validator.is_valid({**CONFIG, "functions": {"app.py": {"maxDurations": 30}}})
    assert not validator.is_valid({**CONFIG, "framework": "starlette"})


def test_no_unknown_top_level_keys(schema: dict) -> None:
    # Also covered by the schema; spelt out so a typo reads plainly.
    assert set(CONFIG) - set(schema["properties"]) == set()


def detected_entrypoint(root: Path) -> str | None:
    for directory in ENTRYPOINT_DIRS:
        for name in ENTRYPOINT_NAMES:
            path = root / directory / f"{name}.py"
            if path.is_file() and TOP_LEVEL_APP.search(path.read_text()):
                return path.relative_to(root).as_posix()
    return None


def test_functions_pattern_matches_the_python_entrypoint() -> None:
    entrypoint = detected_entrypoint(REPO_ROOT)
    assert entrypoint == "app.py"
    # The builder tries the file and the file without ".py", exact or glob.
    candidates = [entrypoint, entrypoint.removesuffix(".py")]
    for pattern in CONFIG.get("functions", {}):
        assert not pattern.startswith("/"), "the CLI rejects absolute function paths"
        assert any(c == pattern or fnmatch.fnmatchcase(c, pattern) for c in candidates), pattern


def test_preset_and_limits() -> None:
    # Pinning the preset keeps the root app.py a function even if the
    # project's dashboard preset says "Other" (then only api/ is scanned and
    # the CLI rejects the app.py pattern).
    assert CONFIG["framework"] == "python"
    assert CONFIG["$schema"] == "https://openapi.vercel.sh/vercel.json"
    (settings,) = CONFIG["functions"].values()
    # Above the 10 s the SPEC allows for a 503 and the pool's drain, and
    # within Hobby's 300 s ceiling so the file deploys on every plan.
    assert isinstance(settings["maxDuration"], int) and 10 < settings["maxDuration"] <= 300
    assert all(re.fullmatch(r"[a-z]{3}\d", r) for r in CONFIG["regions"])


# --- the README's Vercel Services recipe ------------------------------------------------------

SERVICES_SECTION = "## Behind a Next.js frontend (Vercel Services)"


def readme_services_config() -> dict:
    """The one JSON block of the README's Vercel Services section, parsed."""
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index(SERVICES_SECTION) :]
    section = section[: section.find("\n## ", len(SERVICES_SECTION))]
    (block,) = re.findall(r"```json\n(.*?)```", section, re.DOTALL)
    return json.loads(block)


def cli_errors(*configs: dict) -> list[list[str]]:
    try:
        return vercel_schema.cli_validation_errors(list(configs))
    except vercel_schema.SchemaUnavailable as exc:
        pytest.skip(f"cannot load the Vercel CLI's validator: {exc}")


def test_the_readme_services_recipe_passes_the_cli_validator_and_the_schema(schema: dict) -> None:
    """The README's vercel.json for a Next.js frontend beside this service at /api: what the
    CLI's own validator accepts (strict on every service field), with no top-level key Vercel
    does not know, and the backend served from this repository's files at the prefix the
    end-to-end tests use."""
    jsonschema = pytest.importorskip("jsonschema")
    config = readme_services_config()
    assert cli_errors(config, CONFIG) == [[], []]  # the project's own vercel.json too
    assert list(jsonschema.Draft7Validator(schema).iter_errors(config)) == []
    backend = config["experimentalServices"]["backend"]
    assert backend["routePrefix"] == "/api" and backend["entrypoint"] == detected_entrypoint(REPO_ROOT)
    assert backend["framework"] == CONFIG["framework"]
    assert 10 < backend["maxDuration"] <= 300
    frontend = config["experimentalServices"]["frontend"]
    assert (frontend["root"], frontend["routePrefix"]) == ("frontend", "/")


def test_the_cli_validator_refuses_what_vercel_refuses() -> None:
    """Not vacuous: a misspelt service field, a wrong type, a service name the CLI refuses."""
    config = readme_services_config()
    services = config["experimentalServices"]
    backend = services["backend"]
    wrong = [
        {**config, "experimentalServices": {**services, "backend": {**backend, "routePrefx": "/api"}}},
        {**config, "experimentalServices": {**services, "backend": {**backend, "maxDuration": "30"}}},
        {**config, "experimentalServices": {**services, "back end": backend}},
        {**config, "services": {"Backend": {"root": "backend"}}},
    ]
    assert all(errors for errors in cli_errors(*wrong)), cli_errors(*wrong)
