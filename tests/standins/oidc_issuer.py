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
import re
import shutil
import socketserver
import ssl
import tempfile
import threading
import time
import uuid
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from standins.tls import make_tls_files

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

    def jwk(self) -> dict[str, str]:
        """The public half of the key as the issuer publishes it in its JWKS."""
        numbers = self.key.public_key().public_numbers()

        def uint(value: int) -> str:
            return _b64(value.to_bytes((value.bit_length() + 7) // 8, "big"))

        return {
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": self.kid,
            "n": uint(numbers.n),
            "e": uint(numbers.e),
        }

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


def jwks(*issuers: Issuer) -> bytes:
    """The key set published at https://oidc.vercel.com/<team>/.well-known/jwks (`ISSUER`'s)."""
    return json.dumps({"keys": [issuer.jwk() for issuer in issuers or (ISSUER,)]}).encode()


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


class IssuerHost:
    """`https://oidc.vercel.com` on loopback, for a service that reaches it through a proxy.

    A CONNECT proxy that accepts tunnels to oidc.vercel.com:443 only, ends TLS there with a
    certificate from a CA of its own, and answers `GET /<team>/.well-known/jwks` (and the
    global `/.well-known/jwks`) with `jwks(*issuers)`. `environment()` is what a process
    needs to be routed here: HTTPS_PROXY, NO_PROXY for loopback, and SSL_CERT_FILE naming the
    CA. `fetched` records each path asked for.
    """

    def __init__(self, *issuers: Issuer) -> None:
        self.issuers = issuers or (ISSUER,)
        self.fetched: list[str] = []
        self._directory = tempfile.mkdtemp(prefix="oidc-host-")
        self.ca_file, cert_file, key_file = make_tls_files(
            self._directory, ("oidc.vercel.com",), "oidc issuer stand-in CA"
        )
        self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._tls.load_cert_chain(cert_file, key_file)
        self._server = socketserver.ThreadingTCPServer(
            ("127.0.0.1", 0), self._handler(), bind_and_activate=True
        )
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]

    def environment(self) -> dict[str, str]:
        return {
            "HTTPS_PROXY": f"http://127.0.0.1:{self.port}",
            "NO_PROXY": "127.0.0.1,localhost",
            "SSL_CERT_FILE": self.ca_file,
        }

    def __enter__(self) -> IssuerHost:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        shutil.rmtree(self._directory, ignore_errors=True)

    def _handler(self) -> type[socketserver.StreamRequestHandler]:
        host = self

        class Tunnel(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                connect = self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                if not connect.startswith(b"CONNECT oidc.vercel.com:443 "):
                    self.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                    return
                self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                self.wfile.flush()
                with (
                    host._tls.wrap_socket(self.connection, server_side=True) as tls,
                    tls.makefile("rb") as reader,
                ):
                    request = reader.readline().split()
                    while reader.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    path = request[1].decode() if len(request) > 1 else ""
                    host.fetched.append(path)
                    found = re.fullmatch(r"(/[A-Za-z0-9_-]+)?/\.well-known/jwks", path)
                    body = jwks(*host.issuers) if found else b"{}"
                    status = b"200 OK" if found else b"404 Not Found"
                    tls.sendall(
                        b"HTTP/1.1 "
                        + status
                        + b"\r\nContent-Type: application/json\r\nContent-Length: "
                        + str(len(body)).encode()
                        + b"\r\nConnection: close\r\n\r\n"
                        + body
                    )

        return Tunnel
