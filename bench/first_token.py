#!/usr/bin/env python3
"""What the first IAM token costs a cold process, per way of making it (CPU only, no network).

    .venv/bin/python bench/first_token.py                       # 7 fresh processes per option
    .venv/bin/python bench/first_token.py --python .cache/function-env/<hash>/bin/python

Each run is a fresh interpreter that has already imported `app` (as a serving process has),
then makes an Aurora IAM token the option's way and prints the milliseconds that took:
imports included, the STS call itself left out (the same HTTP round trip for every option).

  botocore-session   what auth.py did before: botocore's session, an STS client (its model
                     loaded), botocore's request signer and generate_db_auth_token
  botocore-signer    the STS call with the standard library, botocore.auth's SigV4QueryAuth
                     without any client
  awscrt             the STS call with the standard library, auth.presigned_token (awscrt):
                     what auth.py does now
  stdlib-floor       only the standard library modules a hand-written signer would need
                     (hmac, hashlib, http.client, ElementTree): the floor, not an option taken
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CREDENTIALS = '"AKIDEXAMPLE", "secret", "session-token"'
OPTIONS = {
    "botocore-session": f"""
import types
import botocore.session
from botocore import signers
from botocore.credentials import Credentials
from botocore.model import ServiceId
from botocore.signers import RequestSigner
core = botocore.session.get_session()
core.set_config_variable("region", "us-east-1")
core.create_client("sts", region_name="us-east-1", aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="x")
client = types.SimpleNamespace(meta=types.SimpleNamespace(region_name="us-east-1"))
client._request_signer = RequestSigner(ServiceId("rds"), "us-east-1", "rds", "v4", Credentials({CREDENTIALS}),
                                       core.get_component("event_emitter"))
signers.generate_db_auth_token(client, DBHostname="db.example.com", Port=5432, DBUsername="todo_app",
                               Region="us-east-1")
""",
    "botocore-signer": f"""
import http.client, urllib.parse, xml.etree.ElementTree
from botocore.auth import SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
request = AWSRequest(method="GET", url="https://db.example.com:5432/",
                     params={{"Action": "connect", "DBUser": "todo_app"}})
SigV4QueryAuth(Credentials({CREDENTIALS}), "rds-db", "us-east-1", expires=900).add_auth(request)
request.prepare().url
""",
    "awscrt": f"""
import http.client, urllib.parse, xml.etree.ElementTree
from types import SimpleNamespace
settings = SimpleNamespace(auth="iam", host="db.example.com", port=5432, user="todo_app", region="us-east-1",
                           token_ttl=900)
auth.presigned_token(settings, auth.AwsCredentials({CREDENTIALS}, 0.0))
""",
    "stdlib-floor": """
import datetime, hashlib, hmac, http.client, urllib.parse, xml.etree.ElementTree
""",
}
RUN = """
import sys, time
sys.path.insert(0, {root!r})
import app, auth  # a serving process has imported these already
started = time.perf_counter()
exec({code!r})
print((time.perf_counter() - started) * 1000)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter (a function environment's)")
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in OPTIONS}
    for _ in range(args.runs):  # options take turns, so drift on a shared machine hits all alike
        for name, code in OPTIONS.items():
            done = subprocess.run(
                [args.python, "-c", RUN.format(root=str(ROOT), code=code)],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            )
            times[name].append(float(done.stdout))
    base = statistics.median(times["botocore-session"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:17} median {median:7.1f} ms  min {min(values):7.1f} ms  ({median / base:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
