"""Load test for any aurora-todo deployment: a realistic mix of list, create, get, patch, delete.

    locust -f locustfile.py --host https://your-app.vercel.app            # web UI on :8089
    locust -f locustfile.py --host http://127.0.0.1:8000 --headless -u 20 -r 5 -t 1m

Set API_TOKEN when the deployment requires a bearer token. Each simulated user keeps its
own todos, so the mix never touches another user's rows. Creates carry an Idempotency-Key
and are retried once, with the same key, after a 503.
"""

import os
import random
import time
import uuid

from locust import FastHttpUser, between, task

HEADERS = {"Authorization": f"Bearer {os.environ['API_TOKEN']}"} if os.environ.get("API_TOKEN") else {}


class TodoUser(FastHttpUser):
    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        self.mine: list[str] = []
        for _ in range(3):
            self.create()

    @task(6)
    def list_newest(self) -> None:
        self.client.get("/todos?limit=20", headers=HEADERS, name="/todos")

    @task(1)
    def list_open(self) -> None:
        self.client.get("/todos?completed=false&limit=50", headers=HEADERS, name="/todos?completed")

    @task(3)
    def get_one(self) -> None:
        if self.mine:
            self.client.get(f"/todos/{random.choice(self.mine)}", headers=HEADERS, name="/todos/{id}")

    @task(2)
    def create(self) -> None:
        # One Idempotency-Key per todo, reused for its retry: a 503 may hide a stored insert.
        headers = {**HEADERS, "Idempotency-Key": str(uuid.uuid4())}
        body = {"title": f"load test {random.random():.6f}"}
        response = self.client.post("/todos", json=body, headers=headers, name="/todos")
        if response.status_code == 503:
            retry_after = response.headers.get("Retry-After") if response.headers else None
            time.sleep(float(retry_after) if isinstance(retry_after, str) else 1.0)
            response = self.client.post("/todos", json=body, headers=headers, name="/todos (retry)")
        if response.status_code == 201:
            self.mine.append(response.json()["id"])

    @task(2)
    def complete(self) -> None:
        if self.mine:
            self.client.patch(
                f"/todos/{random.choice(self.mine)}",
                json={"completed": True},
                headers=HEADERS,
                name="/todos/{id}",
            )

    @task(1)
    def delete(self) -> None:
        if len(self.mine) > 2:
            self.client.delete(f"/todos/{self.mine.pop(0)}", headers=HEADERS, name="/todos/{id}")
