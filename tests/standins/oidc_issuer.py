"""The OIDC issuer stand-in: Vercel-shaped tokens signed with a key of its own, and forgeries.

Real STS accepts a web identity token only when the issuer's published key (its JWKS)
verifies the signature; moto's STS checks nothing. `ISSUER` owns an RSA key: `ISSUER.token()`
mints what Vercel's platform would send a function, `forged_token()` mints a token of the same
shape and claims signed by a key the issuer never published (what an attacker can make), and
`ISSUER.signed(token)` is the check the STS stand-in (standins/sts.py) makes before it issues
credentials.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

TEAM = "acme"
SUBJECT = f"owner:{TEAM}:project:todo:environment:production"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def claims_of(token: str) -> dict[str, Any]:
    """The token's payload, unverified (for tests' own bookkeeping)."""
    return json.loads(_unb64(token.split(".")[1]))


class Issuer:
    """An RS256 issuer like `https://oidc.vercel.com/<team>`; its key is made on first use."""

    def __init__(self, kid: str) -> None:
        self.kid = kid
        self._key: rsa.RSAPrivateKey | None = None
        self._lock = threading.Lock()

    @property
    def key(self) -> rsa.RSAPrivateKey:
        with self._lock:
            if self._key is None:
                self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            return self._key

    def token(
        self,
        lifetime: float = 3600,
        subject: str = SUBJECT,
        team: str = TEAM,
        issued_at: float | None = None,
        **claims: Any,
    ) -> str:
        """A token as Vercel mints it: team issuer, team audience, `subject`, unique `jti`."""
        now = time.time() if issued_at is None else issued_at
        payload = {
            "iss": f"https://oidc.vercel.com/{team}",
            "aud": f"https://vercel.com/{team}",
            "sub": subject,
            "iat": int(now),
            "nbf": int(now),
            "exp": int(now + lifetime),
            "jti": str(uuid.uuid4()),
            **claims,
        }
        header = {"alg": "RS256", "typ": "JWT", "kid": self.kid}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(payload).encode())}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64(signature)}"

    def signed(self, token: str) -> bool:
        """Whether this issuer's key made `token`'s signature (what STS checks via the JWKS)."""
        try:
            signing_input, signature = token.rsplit(".", 1)
            self.key.public_key().verify(
                _unb64(signature), signing_input.encode(), padding.PKCS1v15(), hashes.SHA256()
            )
        except (ValueError, InvalidSignature):
            return False
        return True


ISSUER = Issuer("vercel-oidc-1")
# Same kid, same claims, another key: everything a client can put in a header but the signature.
_FORGER = Issuer("vercel-oidc-1")


def forged_token(
    lifetime: float = 3600,
    subject: str = SUBJECT,
    team: str = TEAM,
    issued_at: float | None = None,
    **claims: Any,
) -> str:
    """A token with the platform's shape and claims, signed by a key the issuer never published."""
    return _FORGER.token(lifetime, subject, team, issued_at, **claims)
