"""The STS stand-in: moto's STS on loopback, recording and faulting AssumeRoleWithWebIdentity."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

from moto.server import ThreadedMotoServer
from moto.sts.exceptions import STSClientError
from moto.sts.responses import TokenResponse

from standins.oidc_issuer import ISSUER, claims_of
from support import free_port

OUTAGE_ERROR = (
    '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Receiver</Type>'
    "<Code>ServiceUnavailable</Code><Message>stand-in outage</Message></Error>"
    "<RequestId>00000000-0000-0000-0000-000000000000</RequestId></ErrorResponse>"
)


class Sts:
    """moto's STS on loopback, with a record of every AssumeRoleWithWebIdentity call.

    `credential_lifetime` shortens the credentials moto issues; `delay` makes STS slow;
    `stop()` / `start()` take it down and bring it back on the same port; while `outage` is
    set it answers every call 503 ServiceUnavailable. Like real STS, it refuses a web identity
    token that the issuer (standins/oidc_issuer.py) did not sign (InvalidIdentityToken) or
    that has expired (ExpiredTokenException). `attempts` counts every HTTP request for
    AssumeRoleWithWebIdentity, answered or refused; `presented` holds the token of each
    call STS looked at, `refused` those it refused, `web_identity_tokens` those it issued
    credentials for.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.web_identity_tokens: list[str] = []
        self.presented: list[str] = []
        self.refused: list[str] = []
        self.credential_lifetime: int | None = None
        self.delay = 0.0
        self.outage = False
        self.attempts = 0
        self._server: ThreadedMotoServer | None = None

    def start(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def calls(self) -> int:
        return len(self.web_identity_tokens)

    def secrets(self) -> list[str]:
        """Every secret key and session token moto has issued."""
        from moto.sts.models import sts_backends

        found = []
        for per_account in list(dict.values(sts_backends)):
            for backend in list(dict.values(per_account)):
                for role in backend.assumed_roles:
                    found += [role.secret_access_key, role.session_token]
        return found


@contextmanager
def recording_sts() -> Iterator[Sts]:
    """moto's STS started on loopback, every AssumeRoleWithWebIdentity recorded into the `Sts`
    it yields and subject to its faults; moto is restored on the way out."""
    from moto.sts.models import STSBackend

    recorder = Sts()
    original_response = TokenResponse.assume_role_with_web_identity
    original_backend = STSBackend.assume_role_with_web_identity

    def recording(self: TokenResponse):
        recorder.attempts += 1
        if recorder.outage:
            return 503, {}, OUTAGE_ERROR
        token = self._get_param("WebIdentityToken")
        recorder.presented.append(token)
        if not ISSUER.signed(token):
            recorder.refused.append(token)
            raise STSClientError("InvalidIdentityToken", "The web identity token signature is not valid")
        if claims_of(token)["exp"] <= time.time():
            recorder.refused.append(token)
            raise STSClientError("ExpiredTokenException", "Token expired")
        recorder.web_identity_tokens.append(token)
        time.sleep(recorder.delay)
        return original_response(self)

    def issuing(self: STSBackend, **kwargs):
        if recorder.credential_lifetime is not None:
            kwargs["duration"] = recorder.credential_lifetime
        return original_backend(self, **kwargs)

    with (
        mock.patch.object(TokenResponse, "assume_role_with_web_identity", recording),
        mock.patch.object(STSBackend, "assume_role_with_web_identity", issuing),
    ):
        recorder.start()
        try:
            yield recorder
        finally:
            recorder.stop()
