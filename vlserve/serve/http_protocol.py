"""uvicorn's h11 protocol with a deadline on request headers (against slowloris).

Contract: a connection must deliver a complete request head (request line and headers) within
`header_timeout_s` of being opened, or of its previous response completing (keep-alive); otherwise the server
closes it without answering. The deadline is fixed when armed: bytes trickling in do not move it (uvicorn's own
keep-alive timer restarts on every byte, and plain uvicorn has no deadline at all before the first request).
Once a head has arrived the deadline is off; the time to send the body or produce the response is not bounded
here. A client still sending the body of a request already answered counts against the next deadline.

Use: `uvicorn.Config(app, http=protocol_class(10.0))`.
"""

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderTimeoutProtocol(H11Protocol):
    header_timeout_s: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None
    _scope_when_armed: object = None  # uvicorn sets a new self.scope for every request head it parses

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._head_arrived():
            self._disarm()

    def on_response_complete(self) -> None:
        scope = self.scope
        super().on_response_complete()  # may parse a pipelined request at once
        if self.scope is scope and not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _head_arrived(self) -> bool:
        return self.scope is not self._scope_when_armed

    def _arm(self) -> None:
        self._disarm()
        self._scope_when_armed = self.scope
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._on_header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if not self._head_arrived() and not self.transport.is_closing():
            self.logger.debug("closing a connection that sent no complete request head in %.1f s",
                              self.header_timeout_s)
            self.transport.close()  # connection_lost then settles h11's state


def protocol_class(header_timeout_s: float) -> type[HeaderTimeoutProtocol]:
    """An h11 protocol class for `uvicorn.Config(http=...)` that closes connections slow to send headers."""
    if not header_timeout_s > 0:
        raise ValueError(f"the request header timeout must be > 0 seconds, not {header_timeout_s}")
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": float(header_timeout_s)})
