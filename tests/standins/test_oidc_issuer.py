"""Prove the OIDC issuer stand-in (standins/oidc_issuer.py) and what the STS stand-in makes of it.

Real STS accepts a web identity token only when the issuer's published key verifies its
signature and it has not expired; the STS stand-in (standins/sts.py) must do the same, or a
test of forged tokens proves nothing. `IssuerHost` must look like https://oidc.vercel.com to a
process routed through it, and to nothing else.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from iam_support import REGION, ROLE_ARN
from standins.oidc_issuer import ISSUER, IssuerHost, claims_of, forged_token
from standins.sts import Sts

pytestmark = pytest.mark.slow  # proves a stand-in, not the service


def test_the_issuer_signs_its_tokens_and_a_forgery_or_a_tampered_token_does_not_verify():
    token = ISSUER.token(lifetime=600)
    assert ISSUER.signed(token)
    assert claims_of(token)["exp"] - claims_of(token)["iat"] == 600
    assert not ISSUER.signed(forged_token())
    header, payload, signature = token.split(".")
    other = ISSUER.token(subject="owner:acme:project:billing:environment:production").split(".")[1]
    assert not ISSUER.signed(f"{header}.{other}.{signature}")
    assert not ISSUER.signed("not.a.token")


def assume(sts: Sts, token: str) -> dict:
    client = boto3.client(
        "sts",
        endpoint_url=sts.url,
        region_name=REGION,
        aws_access_key_id="x",
        aws_secret_access_key="x",
        config=Config(retries={"total_max_attempts": 1}),
    )
    return client.assume_role_with_web_identity(
        RoleArn=ROLE_ARN, RoleSessionName="stand-in", WebIdentityToken=token
    )


def test_sts_issues_credentials_only_for_unexpired_tokens_the_issuer_signed(fresh_sts: Sts):
    good = ISSUER.token()
    assert assume(fresh_sts, good)["Credentials"]["SessionToken"]
    for token, code in (
        (forged_token(), "InvalidIdentityToken"),
        (ISSUER.token(lifetime=-5), "ExpiredTokenException"),
    ):
        with pytest.raises(ClientError) as refused:
            assume(fresh_sts, token)
        assert refused.value.response["Error"]["Code"] == code
    assert fresh_sts.web_identity_tokens == [good]
    assert len(fresh_sts.presented) == 3 and len(fresh_sts.refused) == 2 and fresh_sts.attempts == 3


FETCH = """
import sys, urllib.request
try:
    print(urllib.request.urlopen(sys.argv[1], timeout=5).read()[:40].decode())
except Exception as error:
    print(type(error).__name__)
"""


def fetch_through(host: IssuerHost, url: str) -> str:
    env = {**os.environ, **host.environment()}
    return subprocess.run(
        [sys.executable, "-c", FETCH, url], env=env, capture_output=True, text=True, timeout=30
    ).stdout.strip()


def test_the_issuer_host_serves_the_key_set_as_oidc_vercel_com_and_nothing_else():
    with IssuerHost() as host:
        started = time.monotonic()
        assert fetch_through(host, "https://oidc.vercel.com/acme/.well-known/jwks").startswith('{"keys": [')
        assert fetch_through(host, "https://oidc.vercel.com/.well-known/jwks").startswith('{"keys": [')
        assert fetch_through(host, "https://oidc.vercel.com/acme/other") == "HTTPError"
        assert fetch_through(host, "https://example.com/.well-known/jwks") in ("URLError", "OSError")
        assert host.fetched == ["/acme/.well-known/jwks", "/.well-known/jwks", "/acme/other"]
        assert time.monotonic() - started < 20
