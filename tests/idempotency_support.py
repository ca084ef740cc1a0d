"""Helpers the Idempotency-Key tests share (in process and on every server): rows counted
in the database, the 422 a bad key gets, and fresh keys."""

from __future__ import annotations

import uuid

from support import PROBLEM, Response, run_sql


def count(url: str) -> int:
    return run_sql(url, "SELECT count(*) FROM todos")[0][0]


def rows_titled(url: str, title: str) -> int:
    return run_sql(url, "SELECT count(*) FROM todos WHERE title = '{}'".format(title.replace("'", "''")))[0][
        0
    ]


def assert_key_problem(response: Response) -> None:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["detail"].startswith("Idempotency-Key:"), response.json()


def key() -> str:
    return str(uuid.uuid4())
