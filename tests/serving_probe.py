"""An ASGI entrypoint that serves another app unchanged and says how it is being served.

`SERVING_PROBE_TARGET` names the app, as `path/to/module.py:attribute` relative to the
working directory (the deployment root). Every request goes to that app, except
`GET /_probe/serving`, which answers what the server really runs: the event loop's class
(uvloop's, or asyncio's) and the HTTP protocol implementation whose code is calling the
app (uvicorn's `httptools_impl` or `h11_impl`), found on the call stack of the request
itself. `SERVING_PROBE_STARTUP_DELAY` (seconds) holds the app's lifespan startup back, so
that a test can connect while the server listens but has not started the app yet. Served through vercel_runtime.vc_init, that is the runtime's own uvicorn deciding
with whatever the function environment has installed.

Test and benchmark tooling: nothing in the service imports it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

PROBE_PATH = "/_probe/serving"


def _load(spec: str) -> Any:
    path, _, attribute = spec.partition(":")
    file = Path(path).resolve()
    sys.path.insert(0, str(file.parent))  # its sibling modules (app.py imports db, auth)
    module_spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[file.stem] = module
    module_spec.loader.exec_module(module)
    return getattr(module, attribute or "app")


target = _load(os.environ["SERVING_PROBE_TARGET"])
STARTUP_DELAY = float(os.environ.get("SERVING_PROBE_STARTUP_DELAY", "0"))


def serving() -> dict[str, str]:
    loop = type(asyncio.get_running_loop())
    http = "unknown"
    frame = sys._getframe()
    while frame is not None:
        name = Path(frame.f_code.co_filename).name
        if name in ("httptools_impl.py", "h11_impl.py"):
            http = name.removesuffix("_impl.py")
            break
        frame = frame.f_back
    return {"loop": loop.__module__.split(".")[0], "loop_class": f"{loop.__module__}.{loop.__qualname__}",
            "http": http, "pid": str(os.getpid())}


async def app(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] == "http" and scope["path"] == PROBE_PATH:
        body = json.dumps(serving()).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
        return
    if scope["type"] == "lifespan" and STARTUP_DELAY:
        async def receive_late() -> dict:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await asyncio.sleep(STARTUP_DELAY)
            return message
        return await target(scope, receive_late, send)
    await target(scope, receive, send)
