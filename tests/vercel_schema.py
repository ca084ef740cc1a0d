"""The vercel.json schema, taken from Vercel's own npm packages, for tests.

There is no single vercel.json schema file on npm.  The `vercel` CLI (64.0.2)
validates vercel.json with a schema it assembles at run time inside its
bundle (`validateConfig`): `functions` and `builds` come from
`@vercel/build-utils` (dist/schemas.js), `routes`, `headers`, `redirects`,
`rewrites`, `cleanUrls` and `trailingSlash` from `@vercel/routing-utils`, and
a few CLI-only keys (images, crons, services, ...) are inlined in the bundle.
Its top level allows unknown keys, so it cannot catch a misspelt one; the list
of real top-level keys is the `VercelConfig` interface that Vercel generates
from the public schema into `@vercel/config` (dist/types.d.ts).

The keys it does type are checked strictly, `experimentalServices` and `services` among them,
by a validator the CLI compiles ahead of time into one self-contained file of its package,
`dist/chunks/config-validator.mjs` (`getConfigValidator()`; it imports only
`@vercel/build-utils`). `cli_validation_errors()` runs that very file: it is taken out of the
CLI's tarball (`npm pack vercel@64.0.2`, 2 MB, nothing installed) into the same cache, where
its one import resolves to the build-utils installed below.

So this module installs those two small packages (with their dependencies,
about 11 MB; `@vercel/config` brings `@vercel/routing-utils`) at the versions
the CLI pins into `.cache/npm` (git-ignored), once, and builds a draft-07
schema that is the CLI's, closed at the top level.  npm and node come from
PATH; without them `SchemaUnavailable` is raised and tests skip.
"""

from __future__ import annotations

import fcntl
import json
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO_ROOT / ".cache" / "npm"

# The versions `vercel@64.0.2` depends on, so the schema is the CLI's.
PACKAGES = {
    "@vercel/build-utils": "14.21.0",
    "@vercel/config": "0.7.2",
}

# Top-level keys the CLI 64.0.2 validator knows that `VercelConfig` (0.7.2)
# does not list yet; copied from the bundle's buildVercelConfigSchema.
_CLI_ONLY_KEYS = {"proxy", "services", "experimentalServicesV2", "daemons"}

# Evaluated by node: the parts of the CLI's schema that ship in packages.
_NODE_SCRIPT = """
const b = require("@vercel/build-utils/dist/schemas.js");
const r = require("@vercel/routing-utils");
process.stdout.write(JSON.stringify({
  functions: b.getFunctionsSchema(),
  builds: b.buildsSchema,
  routes: r.routesSchema,
  headers: r.headersSchema,
  redirects: r.redirectsSchema,
  rewrites: r.rewritesSchema,
  cleanUrls: r.cleanUrlsSchema,
  trailingSlash: r.trailingSlashSchema,
}));
"""


CLI_VERSION = "64.0.2"  # the CLI whose validator and pins these are
CLI_VALIDATOR = f"vercel-{CLI_VERSION}-config-validator.mjs"

_VALIDATE_SCRIPT = """
import { readFileSync } from "node:fs";
import { pathToFileURL } from "node:url";
const { getConfigValidator } = await import(pathToFileURL(process.argv[1]).href);
const validate = getConfigValidator();
const configs = JSON.parse(readFileSync(0, "utf8"));
process.stdout.write(JSON.stringify(configs.map((config) =>
  validate(config) ? [] : validate.errors.map((e) => `${e.dataPath || "<root>"}: ${e.message}` +
    (e.params && e.params.additionalProperty ? ` (${e.params.additionalProperty})` : "")))));
"""


class SchemaUnavailable(RuntimeError):
    """npm or node is not on PATH."""


def _installed_version(node_modules: Path, name: str) -> str | None:
    try:
        return json.loads((node_modules / name / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def ensure_packages(cache_dir: Path = CACHE_DIR) -> Path:
    """Install PACKAGES into `cache_dir` unless already there; return node_modules."""
    npm = shutil.which("npm")
    if npm is None:
        raise SchemaUnavailable("npm is not on PATH")
    cache_dir.mkdir(parents=True, exist_ok=True)
    node_modules = cache_dir / "node_modules"
    # Parallel test processes share the cache; one installs, the others wait.
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        missing = [f"{n}@{v}" for n, v in PACKAGES.items() if _installed_version(node_modules, n) != v]
        if missing:
            subprocess.run(
                [
                    npm,
                    "install",
                    "--prefix",
                    str(cache_dir),
                    "--no-save",
                    "--no-package-lock",
                    "--no-audit",
                    "--no-fund",
                    "--ignore-scripts",
                    "--loglevel=error",
                    *missing,
                ],
                check=True,
                capture_output=True,
                text=True,
                timeout=300,
            )
    return node_modules


def ensure_cli_validator(cache_dir: Path = CACHE_DIR) -> Path:
    """The CLI's compiled vercel.json validator, taken from its npm tarball into `cache_dir` once."""
    node_modules = ensure_packages(cache_dir)
    target = cache_dir / CLI_VALIDATOR
    npm = shutil.which("npm")
    assert npm is not None  # ensure_packages found it
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not target.exists():
            with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
                subprocess.run(
                    [npm, "pack", f"vercel@{CLI_VERSION}", "--pack-destination", scratch, "--silent"],
                    check=True,
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                (tarball,) = Path(scratch).glob("vercel-*.tgz")
                with tarfile.open(tarball) as archive:
                    member = archive.extractfile("package/dist/chunks/config-validator.mjs")
                    assert member is not None, "the CLI's tarball has no config-validator.mjs"
                    partial = target.with_suffix(".partial")
                    partial.write_bytes(member.read())
                    partial.rename(target)
    assert node_modules.parent == target.parent  # where its `@vercel/build-utils` import resolves
    return target


def cli_validation_errors(configs: list[dict[str, Any]], cache_dir: Path = CACHE_DIR) -> list[list[str]]:
    """For each config, what the Vercel CLI's own validator says is wrong with it ([] if nothing)."""
    validator = ensure_cli_validator(cache_dir)
    node = shutil.which("node")
    if node is None:
        raise SchemaUnavailable("node is not on PATH")
    out = subprocess.run(
        [node, "--input-type=module", "-e", _VALIDATE_SCRIPT, str(validator)],
        input=json.dumps(configs),
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return json.loads(out.stdout)


def cli_property_schemas(node_modules: Path) -> dict[str, Any]:
    """The per-key schemas the CLI validates with, as plain JSON."""
    node = shutil.which("node")
    if node is None:
        raise SchemaUnavailable("node is not on PATH")
    out = subprocess.run(
        [node, "-e", _NODE_SCRIPT],
        cwd=node_modules.parent,  # `require` in -e scripts resolves from the cwd
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return json.loads(out.stdout)


def _config_types(node_modules: Path) -> str:
    return (node_modules / "@vercel" / "config" / "dist" / "types.d.ts").read_text()


def known_top_level_keys(node_modules: Path) -> set[str]:
    """Every top-level vercel.json key Vercel documents, plus `$schema`."""
    text = _config_types(node_modules)
    body = text[text.index("export interface VercelConfig {") :]
    body = body[: body.index("\n}")]
    # Members sit at exactly four spaces; nested object members are deeper.
    keys = set(re.findall(r"^ {4}([A-Za-z_$][\w$]*)\??:", body, re.MULTILINE))
    # `$schema` is how editors find the public schema; Vercel's docs put it
    # at the top of every example.
    return keys | _CLI_ONLY_KEYS | {"$schema"}


def framework_slugs(node_modules: Path) -> list[str]:
    """The `framework` values Vercel accepts (`Framework` in @vercel/config)."""
    text = _config_types(node_modules)
    line = next(x for x in text.splitlines() if x.startswith("export type Framework ="))
    return re.findall(r"'([^']+)'", line)


def vercel_json_schema(cache_dir: Path = CACHE_DIR) -> dict[str, Any]:
    """The CLI's vercel.json schema with unknown top-level keys rejected.

    Keys the CLI does not type are accepted as anything, except the few this
    project uses, which get the types `VercelConfig` gives them.
    """
    node_modules = ensure_packages(cache_dir)
    properties: dict[str, Any] = {key: {} for key in known_top_level_keys(node_modules)}
    properties.update(cli_property_schemas(node_modules))
    properties["$schema"] = {"type": "string"}
    properties["regions"] = {"type": "array", "items": {"type": "string"}}
    properties["framework"] = {"enum": [*framework_slugs(node_modules), None]}
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "properties": properties,
        "additionalProperties": False,
    }


if __name__ == "__main__":
    print(json.dumps(vercel_json_schema(), indent=2))
