"""What the event loop reports by itself is a JSON log line too, never a plain-text traceback.

asyncio's default exception handler reports what no code caught (for example "Task exception
was never retrieved" for asyncpg's fire-and-forget close of an expired connection that the
server had already cut, seen after a failover in tests/test_connections.py) through the
"asyncio" logger. Here logging is set up as a server's start sets it up
(`app.configure_logging()`), and the loop is handed such a report; every line on stderr must be
one JSON object.
"""

from __future__ import annotations

import json

from support import clean_environment, run_python

REPORT = """
import asyncio
import app

app.configure_logging()

async def close_a_cut_connection():
    raise BrokenPipeError(32, "Broken pipe")

async def main():
    task = asyncio.get_running_loop().create_task(close_a_cut_connection())
    await asyncio.sleep(0.05)
    del task  # never retrieved: the loop reports it when the task is collected

asyncio.run(main())
"""


def test_an_exception_no_task_retrieved_is_logged_as_json():
    done = run_python("-c", REPORT, env=clean_environment())
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines, "the loop reported nothing"
    entries = [json.loads(line) for line in lines]  # a plain-text line fails here
    reports = [e for e in entries if e["logger"] == "asyncio"]
    assert len(reports) == 1, entries
    assert reports[0]["message"].startswith("Task exception was never retrieved")
    assert reports[0]["level"] == "error" and reports[0]["error_type"] == "BrokenPipeError"
