"""Schemathesis hooks for tests/test_generated_requests.py (loaded through SCHEMATHESIS_HOOKS).

Idempotency-Key ties requests together: a key reused with a different todo is a 422, by
design. A per-request schema cannot say "use each key once", and generated keys repeat (the
smallest examples come up again and again), so every key in a positive (schema-valid) case
is made unique here, keeping its shape: unique across runs too (a run's own prefix), since
deterministic runs generate the same keys and may meet one database. Negative cases are left as generated: they must be
refused whatever their key.
"""

import itertools
import re
import uuid

import schemathesis

WELL_FORMED = re.compile(r"[!-~](?:[ -~]{0,253}[!-~])?")
numbers = itertools.count(1)
RUN = uuid.uuid4().hex[:8]


@schemathesis.hook
def before_call(context, case, **kwargs):
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return  # a negative case is refused anyway; its headers are what is being tested
    headers = case.headers or {}
    for name in list(headers):
        if (
            name.lower() == "idempotency-key"
            and isinstance(headers[name], str)
            and WELL_FORMED.fullmatch(headers[name])
        ):
            headers[name] = f"{RUN}{next(numbers):08x}-{headers[name]}"[:255].rstrip()
