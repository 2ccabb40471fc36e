"""One client connection: an ``asyncio.Protocol`` that parses, dispatches and streams."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from atlas.local.demo.protocol import _HttpError, _Parser
from atlas.local.demo.responses import (
    _DONE,
    _error_body,
    _frame,
    _json_response,
    _Stream,
    _stream_head,
)

if TYPE_CHECKING:  # the server owns its connections
    from atlas.local.demo.server import DemoUpstream

log = logging.getLogger(__name__)


class _Connection(asyncio.Protocol):
    __slots__ = (
        "_app",
        "_closing",
        "_drain_waiter",
        "_parser",
        "_task",
        "_transport",
        "_write_paused",
    )

    def __init__(self, app: DemoUpstream) -> None:
        self._app = app
        self._parser = _Parser()
        self._transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    # asyncio.Protocol callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._app._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._app._connection_gone(self)
        if self._task is not None:
            self._task.cancel()
        self._wake_drain()

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._parser.buf += data
        if self._task is None:
            self._process()

    def pause_writing(self) -> None:
        self._write_paused = True
        # Stop taking pipelined requests from a client that does not read its answers.
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake_drain()
        if self._transport is not None and self._task is None and not self._closing:
            self._transport.resume_reading()

    # internals -----------------------------------------------------------------------------

    def _wake_drain(self) -> None:
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self._drain_waiter = None

    async def _drain(self) -> None:
        if self._write_paused and not self._closing:
            self._drain_waiter = asyncio.get_running_loop().create_future()
            await self._drain_waiter
        if self._closing:
            raise ConnectionResetError("client went away")

    def _close(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    def shutdown(self) -> None:
        """Used when the server stops: drop the connection whatever it is doing."""
        if self._task is not None:
            self._task.cancel()
        if self._transport is not None:
            self._transport.abort()

    def _process(self) -> None:
        transport = self._transport
        assert transport is not None
        while not self._closing:
            try:
                req = self._parser.next_request()
            except _HttpError as e:
                transport.write(_json_response(e.status, _error_body(e.status, e.message), False))
                self._close()
                return
            if req is None:
                if self._parser.wants_continue():
                    transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                return
            try:
                result = self._app._dispatch(req)
            except Exception:
                log.exception("demo upstream: unhandled error for %s %s", req.method, req.path)
                transport.write(_json_response(500, _error_body(500, "internal error"), False))
                self._close()
                return
            if isinstance(result, _Stream):
                transport.pause_reading()
                self._task = asyncio.get_running_loop().create_task(
                    self._run_stream(result, req.keep_alive, req.version == "HTTP/1.1")
                )
                return
            transport.write(result)
            if not req.keep_alive:
                self._close()
                return

    async def _run_stream(self, stream: _Stream, keep_alive: bool, chunked: bool) -> None:
        transport = self._transport
        assert transport is not None
        try:
            transport.write(_stream_head(keep_alive, chunked))
            sent_content = 0
            for event, is_content in stream.events:
                if is_content and stream.abort_after is not None:
                    if sent_content >= stream.abort_after:
                        await self._abort_after_flush()
                        return
                    sent_content += 1
                transport.write(_frame(event).encode() if chunked else event.encode())
                await self._drain()
                if stream.delay_s > 0:
                    await asyncio.sleep(stream.delay_s)
            tail = _DONE if stream.done_marker else ""
            if chunked:
                transport.write(((_frame(tail) if tail else "") + "0\r\n\r\n").encode())
            elif tail:
                transport.write(tail.encode())
            await self._drain()
        except (ConnectionError, asyncio.CancelledError):
            transport.abort()
            return
        except Exception:
            log.exception("demo upstream: stream failed")
            transport.abort()
            return
        finally:
            self._task = None
        if not keep_alive:
            self._close()
            return
        if not self._write_paused:
            transport.resume_reading()
        self._process()

    async def _abort_after_flush(self) -> None:
        transport = self._transport
        assert transport is not None
        # abort() discards unsent bytes; let the events before the fault reach the client.
        for _ in range(200):
            if transport.get_write_buffer_size() == 0 or self._closing:
                break
            await asyncio.sleep(0.005)
        self._closing = True
        transport.abort()
