"""A reverse proxy that serves a backend under a path prefix, stripping it on the way in.

What `uvicorn --root-path /api` is made for: a proxy (nginx's `location /api/ { proxy_pass
http://backend/; }`, Next.js rewrites, a load balancer) forwards `/api/todos` as `/todos`, and
uvicorn, told the prefix, puts it back in the ASGI scope. `StrippingProxy` is that proxy on
loopback: a request under the prefix goes to the backend without it, with its method, headers
and body, and the backend's answer comes back unchanged; anything else is a 404 of its own.
Nothing is rewritten in responses: a URL the backend hands out is exactly what clients get.

Test tooling; nothing in the service imports it.
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Connection-level headers, which a proxy answers for itself (RFC 9110, section 7.6.1).
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}


class StrippingProxy:
    """Serves http://127.0.0.1:{backend_port} at `{url}{prefix}`; a context manager."""

    def __init__(self, backend_port: int, prefix: str):
        self.backend_port, self.prefix = backend_port, prefix.rstrip("/")
        self.forwarded: list[tuple[str, str]] = []  # (method, path the backend was sent)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> StrippingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Forward(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass  # the backend logs every request

            def forward(self) -> None:
                path, _, query = self.path.partition("?")
                if not (path == proxy.prefix or path.startswith(f"{proxy.prefix}/")):
                    self.send_response(404, "Not under the prefix")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                target = (path[len(proxy.prefix) :] or "/") + (f"?{query}" if query else "")
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                proxy.forwarded.append((self.command, target))
                backend = http.client.HTTPConnection("127.0.0.1", proxy.backend_port, timeout=30)
                try:
                    backend.request(self.command, target, body=body, headers=headers)
                    answer = backend.getresponse()
                    content = answer.read()
                    self.send_response(answer.status, answer.reason)
                    for name, value in answer.getheaders():
                        if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                            self.send_header(name, value)
                    if self.command != "HEAD" and answer.status not in (204, 304):
                        self.send_header("Content-Length", str(len(content)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(content)
                finally:
                    backend.close()

            def __getattr__(self, name: str) -> Any:
                if name.startswith("do_"):  # every method, QUERY and made-up ones too: the backend answers
                    return self.forward
                raise AttributeError(name)

        return Forward
