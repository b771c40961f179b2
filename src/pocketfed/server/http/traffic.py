"""Count the bytes devices send and receive (request and response bodies of the device routes),
for the console's traffic panel.

The counts go to an in-memory counter (`operations.Traffic`), by round for the routes under
/v1/rounds/{id}/ (uploads, commits, secure-aggregation messages) and otherwise to the newest round;
each lifecycle tick writes them to the store (`operations.flush_traffic`), so a request costs no
SQL. Headers and TLS framing are not counted: the figure is what
the protocol moves (tasks, adapters, uploads, secure-aggregation messages), comparable across
transports. The operator's own routes (/v1/status, /console) are not device traffic.
"""

from __future__ import annotations

import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pocketfed.protocol import wire
from pocketfed.server.operations import Traffic

NOT_DEVICE = (f"{wire.PREFIX}/status",)
ROUND_PATH = re.compile(re.escape(wire.PREFIX) + r"/rounds/(\d{1,18})/")


class CountTraffic:
    def __init__(self, app: ASGIApp, counter: Traffic):
        self.app, self.counter = app, counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not path.startswith(wire.PREFIX + "/") or path.startswith(NOT_DEVICE):
            return await self.app(scope, receive, send)
        up = down = 0

        async def counted_receive() -> Message:
            nonlocal up
            msg = await receive()
            if msg["type"] == "http.request":
                up += len(msg.get("body", b""))
            return msg

        async def counted_send(msg: Message) -> None:
            nonlocal down
            if msg["type"] == "http.response.body":
                down += len(msg.get("body", b""))
            await send(msg)

        try:
            await self.app(scope, counted_receive, counted_send)
        finally:
            m = ROUND_PATH.match(path)
            self.counter.add(int(m.group(1)) if m else None, up, down)
