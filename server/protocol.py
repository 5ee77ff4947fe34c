"""uvicorn's h11 protocol with a header deadline: a connection that has not delivered a request's headers
within ``header_timeout`` seconds is closed.

uvicorn closes a kept-alive connection that stays silent for ``timeout_keep_alive``, but not one that is
silent from the start, nor one that trickles header lines (each byte it receives cancels its keep-alive
timer): such sockets (slowloris) would stay open for ever. Here the deadline starts when the connection is
made, and on a kept-alive connection when the next request's first byte arrives; it is not moved by more
bytes, and is cancelled once h11 has parsed the headers. The body has its own deadline
(``server/limits.py``, 408 ``body_timeout``). nginx's ``client_header_timeout`` does the same in front of
the server (docs/server.md, "Slow and idle connections").
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger("deepdefense.server")


class HeaderDeadlineProtocol(H11Protocol):
    """:class:`H11Protocol` that closes connections whose request headers do not arrive in time."""

    header_timeout: float = 10.0
    _deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        waiting = self.conn.their_state is h11.IDLE  # before the bytes: for a request's headers
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()  # the headers are in
        elif waiting and self._deadline is None:
            self._arm()  # the first byte of the next request on a kept-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._deadline = self.loop.call_later(self.header_timeout, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            logger.info("closed a connection that sent no complete request headers in %g s", self.header_timeout)
            self.transport.close()


def header_deadline_protocol(header_timeout: float) -> type[HeaderDeadlineProtocol]:
    """The protocol class for uvicorn's ``http`` option, with this header deadline."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout": header_timeout})
