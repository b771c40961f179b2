"""How the coordinator's connections are served: uvicorn with limits on what a client may hold.

uvicorn alone closes an idle connection only after it has answered a request (keep-alive), so a
client that connects and sends nothing, or trickles its request headers a byte at a time
(slowloris), holds its connection, a file descriptor and a buffer for as long as it likes; and
`limit_concurrency` answers the requests of connections beyond the cap with 503 but keeps the
connections. Here (the configuration is the run's deploy section):

    headers     a request's headers must be complete within deploy.read_timeout_s of the
                connection opening or of its last answer, else the connection closes
                (`GuardedH11Protocol`); h11's own cap on an incomplete request head (16 KiB)
                bounds what such a client makes the server hold meanwhile
    body        read by the app's `Gate`: at most read_timeout_s without a byte and
                request_timeout_s in all (408, then the connection closes); an upload's body goes
                to disk, never held whole in memory
    idle        a kept-alive connection with no new request closes after deploy.keep_alive_s
    count       connections beyond deploy.max_connections are closed as they are accepted (the
                process's open-files limit is raised to fit them: `raise_open_files_limit`)

so what a client can make the server hold is bounded by the cap times (16 KiB of headers + one
64 KiB read) plus the upload files on disk (4 MiB each), and none of it outlives the timeouts.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from pocketfed.config import DeployConfig

log = logging.getLogger("pocketfed.server")


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers and a hard connection cap."""

    header_timeout_s: float = 15.0  # set per server by `server_config` (a subclass per config)
    max_connections: int = 512

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:  # this one is past the cap: refuse it now
            self.logger.warning("closing a new connection: %d are open (deploy.max_connections)", len(self.connections) - 1)
            transport.close()
            return
        self._arm_header_timer()

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()  # type: ignore[union-attr]
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.close()  # connection_lost follows, and frees what the connection held

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # a request's headers are complete: the app's Gate times its body
            self._disarm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():  # the next request's headers get the same deadline
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)


FDS_BESIDE_CONNECTIONS = 256  # the database, blobs being read or written, uploads, the thread pool's files


def raise_open_files_limit(connections: int) -> int:
    """Raise this process's soft limit on open files to what `connections` need (up to the hard
    limit; many systems start services at a soft 1024), so the cap, not EMFILE at accept, is what
    turns clients away. -> the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + FDS_BESIDE_CONNECTIONS
    if soft != resource.RLIM_INFINITY and soft < want:
        soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < want:
        log.warning("open files are limited to %d (hard limit): fewer than deploy.max_connections=%d need (%d); "
                    "lower deploy.max_connections or raise the limit (ulimit -Hn)", soft, connections, want)
    return soft


def server_config(app: Any, deploy: DeployConfig, host: str, port: int, **kwargs: Any) -> uvicorn.Config:
    """The uvicorn configuration `pocketfed server` runs `app` under, with deploy's limits
    (`kwargs`: TLS files, log level... as uvicorn.Config takes them). Raises the open-files limit
    to fit deploy.max_connections."""
    raise_open_files_limit(deploy.max_connections)
    protocol = type("GuardedH11Protocol", (GuardedH11Protocol,),
                    {"header_timeout_s": deploy.read_timeout_s, "max_connections": deploy.max_connections})
    return uvicorn.Config(app, host=host, port=port, http=protocol, limit_concurrency=deploy.max_connections + 1,
                          timeout_keep_alive=deploy.keep_alive_s, **kwargs)  # type: ignore[arg-type]
