#!/usr/bin/env python3
"""PostgreSQL's CPU per list statement with plan_cache_mode auto and force_generic_plan.

    .venv/bin/python bench/run.py --scale          # once: the databases at 1,000 and 1,000,000 rows
    .venv/bin/python bench/plan_cache.py           # then this (a few seconds)

For each first-page list statement of db.py, at each size (the --scale databases,
<database>_scale_<rows>), one connection runs it prepared 2,000 times per mode after 200
warm-up runs; the backend's CPU comes from Linux's /proc/<pid>/schedstat (the backend runs on
this machine). Median of 3 rounds, modes in turns. db.Settings.server_settings says what the
service sets, and why.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import db  # noqa: E402

SHAPES = {
    "GET /todos": (db.LIST_FIRST_PAGE, (51,)),
    "GET /todos?completed=false": (db.LIST_FIRST_PAGE_BY_COMPLETED, (51, False)),
    "GET /todos?completed=true": (db.LIST_FIRST_PAGE_BY_COMPLETED, (51, True)),
}
MODES = ("auto", "force_generic_plan")


def backend_cpu_ns(pid: int) -> int:
    return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])


async def per_statement_us(dsn: str, mode: str, query: str, args: tuple, runs: int) -> float:
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(f"SET plan_cache_mode = {mode}")
        pid = connection.get_server_pid()
        for _ in range(200):
            await connection.fetch(query, *args)
        before = backend_cpu_ns(pid)
        for _ in range(runs):
            await connection.fetch(query, *args)
        return (backend_cpu_ns(pid) - before) / runs / 1000
    finally:
        await connection.close()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/")
    parser.add_argument("--database", default="aurora_bench")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1_000, 1_000_000])
    parser.add_argument("--runs", type=int, default=2000)
    args = parser.parse_args()
    print("| rows | request | PostgreSQL µs/statement, auto | force_generic_plan | ratio |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for size in args.sizes:
        dsn = f"{args.dsn.rstrip('/')}/{args.database}_scale_{size}"
        for name, (query, query_args) in SHAPES.items():
            found: dict[str, list[float]] = {mode: [] for mode in MODES}
            for _ in range(3):
                for mode in MODES:
                    found[mode].append(await per_statement_us(dsn, mode, query, query_args, args.runs))
            auto, generic = (statistics.median(found[mode]) for mode in MODES)
            print(f"| {size:,} | `{name}` | {auto:.1f} | {generic:.1f} | {generic / auto:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
