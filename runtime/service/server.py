"""uvicorn with deadlines for slow clients: each request's headers must arrive in time, and at shutdown the
bodies still arriving are abandoned instead of waited for (the body deadline itself is in app.py)."""

from __future__ import annotations

from collections.abc import Callable

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol


def header_deadline(timeout_s: float) -> type:
    """uvicorn's HTTP protocol, closing a connection whose request line and headers are not complete within
    ``timeout_s`` of the connection or of the request's first byte: uvicorn arms no timer before a response,
    so a client sending part of a request would hold its connection (and shutdown) forever."""

    class Protocol(AutoHTTPProtocol):
        _timer = None
        _armed_for = None  # the request cycle current when the deadline was armed

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            between_requests = self.cycle is None or self.cycle.response_complete
            if between_requests and (self._timer is None or self._armed_for is not self.cycle):
                self._arm()  # the first bytes of the next request on a kept-alive connection
            super().data_received(data)

        def connection_lost(self, exc) -> None:
            if self._timer is not None:
                self._timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._armed_for = self.cycle
            self._timer = self.loop.call_later(timeout_s, self._expire)

        def _expire(self) -> None:
            self._timer = None
            if self.cycle is self._armed_for and not self.transport.is_closing():  # no new request's headers
                self.transport.close()

    return Protocol


class Server(uvicorn.Server):
    """``on_shutdown`` runs as shutdown begins, before uvicorn waits for the requests in flight."""

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_shutdown = on_shutdown

    async def shutdown(self, sockets=None) -> None:
        self.on_shutdown()
        await super().shutdown(sockets)
