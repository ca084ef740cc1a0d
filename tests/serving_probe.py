"""An ASGI entrypoint that serves another app unchanged and says how it is being served.

`SERVING_PROBE_TARGET` names the app, as `path/to/module.py:attribute` relative to the
working directory (the deployment root); unset, there is none (every other request is a
404), so that what the server does is seen without anything the app does. Every request
goes to that app, except `GET /_probe/serving`, which answers what the server really runs:
the event loop's class (uvloop's, or asyncio's), the HTTP protocol implementation whose
code is calling the app (uvicorn's `httptools_impl` or `h11_impl`), found on the call stack
of the request itself, and whether TCP_NODELAY is set on the connection it came in on. `SERVING_PROBE_STARTUP_DELAY` (seconds) holds the app's lifespan startup back, so
that a test can connect while the server listens but has not started the app yet. Served through vercel_runtime.vc_init, that is the runtime's own uvicorn deciding
with whatever the function environment has installed.

Test and benchmark tooling: nothing in the service imports it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import socket
import sys
from pathlib import Path
from types import FrameType
from typing import Any

PROBE_PATH = "/_probe/serving"


def _load(spec: str) -> Any:
    path, _, attribute = spec.partition(":")
    file = Path(path).resolve()
    sys.path.insert(0, str(file.parent))  # its sibling modules (app.py imports db, auth)
    module_spec = importlib.util.spec_from_file_location(file.stem, file)
    assert module_spec is not None and module_spec.loader is not None, spec
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[file.stem] = module
    module_spec.loader.exec_module(module)
    return getattr(module, attribute or "app")


async def no_app(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    await send({"type": "http.response.start", "status": 404, "headers": [(b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})


target = _load(os.environ["SERVING_PROBE_TARGET"]) if os.environ.get("SERVING_PROBE_TARGET") else no_app
STARTUP_DELAY = float(os.environ.get("SERVING_PROBE_STARTUP_DELAY", "0"))


def serving() -> dict[str, Any]:
    loop = type(asyncio.get_running_loop())
    http, nodelay = "unknown", None
    frame: FrameType | None = sys._getframe()
    while frame is not None:
        name = Path(frame.f_code.co_filename).name
        if name in ("httptools_impl.py", "h11_impl.py"):
            http = name.removesuffix("_impl.py")
            transport = getattr(frame.f_locals.get("self"), "transport", None)
            sock = transport.get_extra_info("socket") if transport is not None else None
            if sock is not None:
                nodelay = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            break
        frame = frame.f_back
    return {
        "loop": loop.__module__.split(".")[0],
        "loop_class": f"{loop.__module__}.{loop.__qualname__}",
        "http": http,
        "pid": str(os.getpid()),
        "nodelay": nodelay,
    }


async def app(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] == "http" and scope["path"] == PROBE_PATH:
        body = json.dumps(serving()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
        return
    if scope["type"] == "lifespan" and STARTUP_DELAY:

        async def receive_late() -> dict:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await asyncio.sleep(STARTUP_DELAY)
            return message

        await target(scope, receive_late, send)
        return
    await target(scope, receive, send)
