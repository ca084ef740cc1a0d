"""locustfile.py: the load mix runs headless against the service without a failure.

Once, on the embedded PostgreSQL: it proves the users' tool works. What the server changes
under concurrent writes (DSQL's conflicts included) is proven on every server by
test_todo_routes.py and test_idempotent_creates.py."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest

from support import ROOT, LiveServer


@pytest.mark.slow  # locust runs for a fixed time
def test_locust_mix_runs_headless_without_a_failure(server: LiveServer, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(ROOT / "locustfile.py"),
            "--headless",
            "-u",
            "8",
            "-r",
            "8",
            "-t",
            "6s",
            "--host",
            server.url,
            "--csv",
            str(tmp_path / "run"),
            "--exit-code-on-error",
            "1",
            "--only-summary",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    with open(tmp_path / "run_stats.csv") as stats:
        rows = list(csv.DictReader(stats))
    total = next(row for row in rows if row["Name"] == "Aggregated")
    # 8 users with 0.05-0.5 s between requests; on a busy machine locust's own start takes
    # most of the 6 s, so the floor is a few requests a user, not a throughput.
    assert int(total["Request Count"]) >= 24
    assert int(total["Failure Count"]) == 0
    names = {row["Name"] for row in rows}
    assert {"/todos", "/todos/{id}"} <= names
