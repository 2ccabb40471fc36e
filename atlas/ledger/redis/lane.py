"""The fast lane of the hot scripts (admit: one EVALSHA per Check; settle): pre-encoded
commands pipelined over one connection of their own, replies parsed by hiredis straight from
the transport.

redis-py's generic path (Script object, `execute_command`, the blocking pool's condition,
connection probe and observability records, a task per write timeout) cost ~130 µs of CPU
per admit on the 2-core machines (issue 12). Its asyncio `Connection` reads through an
`asyncio.StreamReader` (a waiter future and a wake-up per read) and allows one command at a
time per connection. Here redis-py still opens each connection (same URL, auth, TLS, RESP
version, `CLIENT SETINFO`: its handshake), then the lane takes the transport over with its
own `asyncio.Protocol`: every write is one `transport.write`, every read feeds a
`hiredis.Reader` and resolves the waiting calls in order, so concurrent Checks share one
connection and one read can answer many of them. Measured on the 2-core machines (uvloop,
Valkey 9): one EVALSHA at a time at 700 calls/s, 110–122 µs of client CPU per call through a
redis-py Connection, 85 µs through this protocol (a /tmp script, same server); authz alone
(`python -m bench --only authz --duration 8`, alternating) 7,439–7,584 Checks per CPU-second
before, 8,127–8,529 after; authz CPU per plain completion at 700 req/s 310–318 µs before,
290–298 after.

Faults: every call is bounded by one `asyncio.timeout`; a call that fails or times out closes
the connection, which fails every call waiting on it (their replies would come after a
hung script anyway), and the next call opens a new one. A server that closes the connection
(restart) fails the waiting calls with `ConnectionError`; nothing is retried here (the
caller's journal and retries decide).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, ResponseError

#: What a call waiting on a closed connection gets.
_CLOSED = "Connection closed by server."
_DROPPED = "Connection closed after a call on it failed or timed out."
#: What hiredis (3.2 on) makes of a RESP3 push: never a reply to a command sent.
_PUSH = getattr(hiredis, "PushNotification", None)


class _Replies(asyncio.Protocol):
    """One lane connection once redis-py's handshake is done: replies in order, one future
    per command sent."""

    def __init__(self, transport: Any, reader_kwargs: dict[str, Any], *, keep: Any) -> None:
        self._transport = transport
        self._keep = keep  # the StreamWriter the transport was opened with
        self._reader = hiredis.Reader(
            protocolError=InvalidResponse, replyError=BaseParser.parse_error, **reader_kwargs
        )
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self.closed = False

    def send(self, data: bytes, n: int) -> list[asyncio.Future[Any]]:
        """Write `data` (`n` packed commands); a future per reply, in order."""
        if self.closed:
            raise RedisConnectionError(_CLOSED)
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in range(n)]
        self._waiting.extend(futures)
        self._transport.write(data)
        return futures

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        try:
            while (reply := self._reader.gets()) is not False:
                if _PUSH is not None and isinstance(reply, _PUSH):
                    continue  # RESP3 out-of-band data (no command's reply)
                if not self._waiting:
                    raise InvalidResponse("a reply no command asked for")
                future = self._waiting.popleft()
                if not future.done():  # a cancelled caller's reply is dropped in its turn
                    future.set_result(reply)
        except InvalidResponse as exc:
            self.close(exc)

    def eof_received(self) -> bool:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError(f"{_CLOSED} {exc}" if exc else _CLOSED))

    def close(self, why: BaseException | None = None) -> None:
        """Close the connection; every call still waiting fails."""
        self._transport.close()
        self._fail(why or RedisConnectionError(_DROPPED))

    def _fail(self, exc: BaseException) -> None:
        self.closed = True
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(exc)


def _let_go(futures: list[asyncio.Future[Any]]) -> None:
    """A failed call's replies: those still to come are dropped in their turn, errors already
    there are retrieved (the call's own error says it; asyncio would log each)."""
    for f in futures:
        if not f.done():
            f.cancel()
        elif not f.cancelled():
            f.exception()


class ScriptLane:
    """Pre-encoded commands over one connection of their own, pipelined (module docstring)."""

    def __init__(self, pool: Any, *, timeout_s: float) -> None:
        # (`orig_socket_timeout` is what redis-py restores after a maintenance window.) The
        # lane bounds each call itself.
        no_timeout = {"socket_timeout": None, "orig_socket_timeout": None}
        self._kwargs = {**pool.connection_kwargs, **no_timeout}
        self._connection_class = pool.connection_class
        self._timeout_s = timeout_s
        self._conn: _Replies | None = None
        self._connecting = asyncio.Lock()

    async def call(self, command: bytes) -> Any:
        """The reply to `command` (one packed RESP command).

        :raises TimeoutError: no reply within the timeout.
        :raises ResponseError: the server's error reply (the connection stays usable).
        """
        (reply,) = await self.call_many((command,))
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    async def call_many(self, commands: Sequence[bytes]) -> list[Any]:
        """The replies to `commands`, pipelined: one write, then each reply in order; an
        error reply is its `ResponseError` in the list (the others still ran)."""
        conn: _Replies | None = None
        futures: list[asyncio.Future[Any]] = []
        try:
            async with asyncio.timeout(self._timeout_s):
                conn = self._conn if self._conn is not None and not self._conn.closed else None
                if conn is None:
                    conn = await self._connect()
                futures = conn.send(b"".join(commands), len(commands))
                return [await f for f in futures]
        except asyncio.CancelledError:
            # The caller is gone (not our timeout): its replies are dropped in their turn and
            # the connection goes on serving the other calls.
            _let_go(futures)
            raise
        except BaseException:
            # A timeout (a hung server or network) or a broken connection.
            if conn is not None:
                conn.close()
            _let_go(futures)
            raise

    async def _connect(self) -> _Replies:
        async with self._connecting:  # concurrent calls share one new connection
            if self._conn is not None and not self._conn.closed:
                return self._conn
            rc = self._connection_class(**self._kwargs)
            try:
                await rc.connect()  # redis-py's handshake (AUTH, HELLO, SELECT, SETINFO)
            except BaseException:  # refused, or the call's timeout: no half-open socket left
                await rc.disconnect(nowait=True)
                raise
            # redis-py's asyncio Connection keeps its stream as `_reader`/`_writer` (4.2 on).
            leftover = bytes(rc._reader._buffer)  # nothing after the handshake's replies
            writer = rc._writer
            transport = writer.transport
            encoder = rc.encoder
            kwargs = (
                {"encoding": encoder.encoding, "errors": encoder.encoding_errors}
                if encoder.decode_responses
                else {}
            )
            conn = _Replies(transport, kwargs, keep=writer)
            transport.set_protocol(conn)
            # The transport is the lane's now: redis-py's Connection lets go of it, or its
            # __del__ would close it ("unclosed Connection") under the calls using it; the
            # StreamWriter stays referenced for the same reason (its __del__ closes too).
            rc._writer = rc._reader = None
            if leftover:
                conn.data_received(leftover)
            self._conn = conn
            return conn

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
