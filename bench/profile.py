#!/usr/bin/env python3
"""Profile the project under one wrk workload with py-spy; print where the time goes.

    .venv/bin/python bench/profile.py list            # or get, create, mixed
    .venv/bin/python bench/profile.py list --mode vercel   # through vc_init, function environment
    .venv/bin/python bench/profile.py list --seconds 20 --todos 500 --target ceiling
    .venv/bin/python bench/profile.py get --project-dir /tmp/changed-copy   # any bench/run.py option

Starts the target exactly as bench/run.py does (same uvicorn flags or the same runtime and
function environment with --mode vercel, pool, seeded data),
drives it with wrk while `py-spy record` samples the server process (active samples only,
so the event loop idling in epoll does not count), and prints the functions with the
largest inclusive and self share of samples. The collapsed stacks are written next to the
summary (--out, default a temporary directory) for flame graphs (e.g. `py-spy record
--format speedscope`, or inferno/flamegraph.pl on the .txt).
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (bench/run.py)


def summarize(collapsed: Path, top: int) -> str:
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
            if " (" in f
            else f
            for f in stack.split(";")
        ]
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    lines = [f"{total} samples", "", "inclusive (function and everything it calls):"]
    lines += [f"  {100 * n / total:5.1f} %  {name}" for name, n in inclusive.most_common(top)]
    lines += ["", "self (the function's own code):"]
    lines += [f"  {100 * n / total:5.1f} %  {name}" for name, n in own.most_common(top)]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workload", choices=run.WORKLOADS)
    parser.add_argument("--target", default="project", choices=run.TARGETS)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--todos", type=int, default=20)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--mode", default="uvicorn", choices=run.MODES)
    args, rest = parser.parse_known_args()
    bench_args = run.parse_args(["--quick", *rest])
    run.APPS["project"] = ("app:app", bench_args.project_dir.resolve())
    out = args.out or Path(tempfile.mkdtemp(prefix="aurora-profile-"))
    out.mkdir(parents=True, exist_ok=True)
    run.ensure_wrk()
    db = run.Database(bench_args.dsn, bench_args.database)
    db.open()
    db.seed(args.todos)
    uuids, ints = db.ids()
    ids = out / "ids.txt"
    ids.write_text("\n".join(ints if args.target == "reference" else uuids) + "\n")
    env = {
        "DATABASE_URL": db.dsn,
        "DB_POOL_MIN": str(bench_args.pool_min),
        "DB_POOL_MAX": str(bench_args.pool_max),
        "LOG_LEVEL": bench_args.log_level,
    }
    pythons = run.function_pythons([args.target]) if args.mode == "vercel" else {}
    server = run.Server(
        args.target,
        env if args.mode == "vercel" else run.clean_env(env),
        bench_args,
        out,
        mode=args.mode,
        python=pythons.get(args.target),
    )
    server.start()
    style = "query" if args.target == "reference" else "json"
    proxy = "vercel" if args.mode == "vercel" else ""
    try:
        server.wait_ready()
        run.run_wrk(server.port, args.workload, style, str(ids), 2, bench_args, proxy=proxy)  # warm-up
        collapsed = out / f"{args.target}-{args.workload}.txt"
        spy = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "py-spy"),
                "record",
                "--pid",
                str(server.proc.pid),
                "--rate",
                str(args.rate),
                "--format",
                "raw",
                "--output",
                str(collapsed),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(1.0)
        result = run.run_wrk(
            server.port, args.workload, style, str(ids), args.seconds, bench_args, proxy=proxy
        )
        spy.send_signal(2)
        spy.wait(timeout=30)
    finally:
        server.stop()
        db.seed(args.todos)
        db.close()
    report = (
        f"{args.target} ({args.mode}) {args.workload}, {args.todos} todos: {result['rps']:.0f} req/s "
        "under py-spy\n" + summarize(collapsed, args.top)
    )
    (out / f"{args.target}-{args.workload}-summary.txt").write_text(report)
    print(report)
    print(f"\ncollapsed stacks: {collapsed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
