"""The overload valve: at most ``max_pending`` inference requests in progress per process; the
next one is answered 503 with ``Retry-After`` at once.

It is a plain ASGI middleware in front of the FastAPI app, not a check inside the routes,
because under overload the refusals outnumber the answers (at 4x the sustainable rate, three
of every four requests), and a refusal that goes through FastAPI's routing, exception
handling and JSON rendering costs the CPU the answers need. Worked out from
``bench/serve_overload.py`` (server on one core, load generator on another), a refusal inside
the routes cost about 0.22 ms of CPU, against 1.5-1.7 ms for an answer. Here it costs about
0.07 ms: a path test, the body read and dropped (so the kept-alive connection can carry the
client's next request) and two prebuilt messages.
"""

from __future__ import annotations

import json
from typing import Any, Awaitable, Callable

from dundi.serving.errors import RequestError

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def is_inference(scope: Scope) -> bool:
    """The routes that run the model: the only ones refused under load (health, metadata and
    admin routes always answer)."""
    path = scope.get("path", "")
    return scope.get("method") == "POST" and (path == "/classify" or
                                              (path.startswith("/v2/models/") and path.endswith("/infer")))


def overloaded(max_pending: int) -> RequestError:
    return RequestError(503, "overloaded", f"the service is at capacity ({max_pending} requests in progress)",
                        "a retry after the Retry-After delay", {"Retry-After": "1"})


class Admission:
    """ASGI middleware: admit an inference request while fewer than ``max_pending`` are in
    progress in this process (one event loop: a plain counter), refuse it otherwise."""

    def __init__(self, app: Callable, max_pending: int, max_body_bytes: int):
        self.app = app
        self.max_pending = max_pending
        self.max_body_bytes = max_body_bytes
        self.pending = 0
        refusal = overloaded(max_pending)
        body = json.dumps(refusal.body()).encode()
        self._start = {"type": "http.response.start", "status": refusal.status,
                       "headers": [(b"content-type", b"application/json"),
                                   (b"content-length", str(len(body)).encode()),
                                   *((k.lower().encode(), v.encode()) for k, v in refusal.headers.items())]}
        self._body = {"type": "http.response.body", "body": body}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_inference(scope):
            return await self.app(scope, receive, send)
        if self.pending >= self.max_pending:
            await self._drain(receive)
            await send(self._start)
            await send(self._body)
            return
        self.pending += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.pending -= 1

    async def _drain(self, receive: Receive) -> None:
        """Read and drop the body, at most ``max_body_bytes`` of it."""
        seen = 0
        while seen <= self.max_body_bytes:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return
