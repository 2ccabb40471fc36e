"""authz over Envoy's HTTP ext_authz protocol, in-process against a real valkey-server: what
Envoy reads from each answer, one Redis command per Check, and hostile HTTP on its port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import httptools
import pytest
import redis

from atlas.grant import GRANT_HEADER, PROC_HEADER, Grant, ProcMode
from atlas.ledger.redis import RedisLedger
from atlas.local.ports import free_port
from atlas.requestbody import estimate_prompt_tokens
from atlas.settings import Settings
from authz.http_server import MAX_HEADER_BYTES, PATH_PREFIX
from authz.service import serve
from tests.factories import key_record
from tests.integration.test_authz_service import Monitor

SECRET = "sk-atlas-integration-http-0123456789"
CHAT = PATH_PREFIX + "/v1/chat/completions"


class Answer:
    def __init__(self) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.body = b""

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)


class Answers:
    """httptools callbacks: every response on the connection, in order."""

    def __init__(self) -> None:
        self.done: list[Answer] = []
        self.current = Answer()
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self.current = Answer()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.current.headers.append((name.decode().lower(), value.decode()))

    def on_body(self, body: bytes) -> None:
        self.current.body += body

    def on_message_complete(self) -> None:
        self.current.status = self.parser.get_status_code()
        self.done.append(self.current)


class Conn:
    """One keep-alive HTTP/1.1 connection, as Envoy's ext_authz client holds them."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self._answers = Answers()

    async def send_raw(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_answers(self, n: int = 1, wait_s: float = 5.0) -> list[Answer]:
        got = self._answers.done
        async with asyncio.timeout(wait_s):
            while len(got) < n:
                data = await self.reader.read(65536)
                if not data:
                    break
                self._answers.parser.feed_data(data)
        out, self._answers.done[:] = got[:n], got[n:]
        return out

    async def check(
        self, body: object, *, path: str = CHAT, method: str = "POST", **headers: str
    ) -> Answer:
        await self.send_raw(request(body, path=path, method=method, **headers))
        (answer,) = await self.read_answers()
        return answer


def request(body: object, *, path: str = CHAT, method: str = "POST", **headers: str) -> bytes:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    h = {
        "host": "127.0.0.1",
        "authorization": f"Bearer {SECRET}",
        "content-type": "application/json",
        "content-length": str(len(raw)),
        **{k.replace("_", "-"): v for k, v in headers.items()},
    }
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in h.items())
    return head.encode() + b"\r\n" + raw


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[int]:
    port = free_port()
    s = settings.model_copy(update={"authz_port": port, "authz_protocol": "http"})
    ready = asyncio.Event()
    task = asyncio.create_task(serve(s, ready=ready))
    waiter = asyncio.create_task(ready.wait())
    await asyncio.wait({task, waiter}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    assert task.done() or waiter.done(), "authz did not start within 30 s"
    if task.done():
        waiter.cancel()
        task.result()
    try:
        yield port
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            async with asyncio.timeout(10):  # a server that cannot stop is a failure, not a hang
                await task


@contextlib.asynccontextmanager
async def connected(port: int) -> AsyncIterator[Conn]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield Conn(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


PLAIN = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
async def with_key(ledger: RedisLedger) -> None:
    await ledger.create_key(key_record(SECRET, id="key_h"))


async def test_an_admitted_check_says_what_envoy_needs(settings: Settings, with_key: None) -> None:
    async with running(settings) as port, connected(port) as c:
        a = await c.check(PLAIN, x_atlas_key_id="forged", accept_encoding="gzip")
        assert a.status == 200 and a.body == b""
        assert a.header("x-atlas-key-id") == "key_h"  # ours, set over the client's
        grant = Grant.decode(a.header(GRANT_HEADER) or "")
        assert grant is not None and grant.key_id == "key_h"
        prompt = estimate_prompt_tokens(PLAIN)  # 3 a message + role + "hello" + 3 priming
        assert grant.prompt_estimate == prompt and grant.reserved == prompt + 10
        assert grant.route == "chat" and grant.body_parsed and not grant.stream
        assert a.header(PROC_HEADER) == ProcMode.JSON  # authz read it all: body only
        removed = (a.header("x-envoy-auth-headers-to-remove") or "").split(",")
        assert "accept-encoding" in removed and "x-atlas-key-id" not in removed
        assert a.header("x-ratelimit-remaining-requests") is not None
        # A stream whose usage the client did not ask for: Envoy's Lua filter adds it.
        stream = await c.check({**PLAIN, "stream": True})
        assert stream.header(PROC_HEADER) == ProcMode.SPLICE
        # The client's own stream_options are merged by extproc's rewrite, not overwritten.
        own = await c.check({**PLAIN, "stream": True, "stream_options": {"include_usage": 0}})
        assert own.header(PROC_HEADER) == ProcMode.REWRITE
        asked = await c.check({**PLAIN, "stream": True, "stream_options": {"include_usage": 1}})
        assert asked.header(PROC_HEADER) == ProcMode.OBSERVE


async def test_refusals_carry_body_headers_and_a_carrier_for_5xx(
    settings: Settings, with_key: None
) -> None:
    async with running(settings) as port, connected(port) as c:
        bad = await c.check(PLAIN, authorization="Bearer nope")
        assert bad.status == 401 and bad.header("x-atlas-refusal") == "invalid_api_key"
        assert json.loads(bad.body)["error"]["code"] == "invalid_api_key"
        assert bad.header(GRANT_HEADER) is None
        unknown = await c.check(PLAIN, path=PATH_PREFIX + "/v1/batches")
        assert unknown.status == 404
        cut = await c.check(PLAIN, x_envoy_auth_partial_body="true")
        assert cut.status == 413  # Envoy did not let authz see the whole body
    # Redis gone, fail closed: 503 travels as 463 (Envoy would drop a 5xx's body).
    s = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    async with running(s) as port, connected(port) as c:
        down = await c.check(PLAIN)
        assert down.status == 463 and down.header("retry-after") == "1"
        assert json.loads(down.body)["error"]["code"] == "service_unavailable"


async def test_one_redis_command_per_check_over_http(
    settings: Settings, with_key: None, redis_sync: redis.Redis
) -> None:
    async with running(settings) as port, connected(port) as c:
        assert (await c.check(PLAIN)).status == 200  # warms the key cache
        monitor = Monitor(settings.redis_url)
        n = 40
        try:
            for _ in range(n):
                assert (await c.check(PLAIN)).status == 200
            deadline = time.monotonic() + 5
            while len(monitor.commands) < n and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)
        finally:
            monitor.stop()
        assert monitor.commands == ["evalsha"] * n


async def test_pipelined_checks_are_answered_in_order(settings: Settings, with_key: None) -> None:
    async with running(settings) as port, connected(port) as c:
        bodies = [PLAIN, {**PLAIN, "model": 5}, PLAIN]  # the middle one is a 400
        await c.send_raw(b"".join(request(b) for b in bodies))
        answers = await c.read_answers(3)
        assert [a.status for a in answers] == [200, 400, 200]


async def test_probes_and_paths_outside_the_check_prefix(
    settings: Settings, with_key: None
) -> None:
    async with running(settings) as port, connected(port) as c:
        await c.send_raw(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        (health,) = await c.read_answers()
        assert health.status == 200
        # A path Envoy never sends (no /check prefix) is not a Check, whatever it carries.
        other = await c.check(PLAIN, path="/v1/chat/completions")
        assert other.status == 404


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (b"POST /check/v1/chat/completions HTTP/1.1\r\ncontent-length: zz\r\n\r\n", 400),
        (
            b"POST /check/x HTTP/1.1\r\nx: " + b"a" * (MAX_HEADER_BYTES + 10) + b"\r\n\r\n",
            431,
        ),
        (
            b"POST /check/x HTTP/1.1\r\n"
            + b"".join(b"h%d: v\r\n" % i for i in range(300))
            + b"\r\n",
            431,
        ),
        (b"GET / HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n", 400),
    ],
)
async def test_hostile_http_is_answered_and_the_connection_closed(
    settings: Settings, raw: bytes, status: int
) -> None:
    async with running(settings) as port:
        async with connected(port) as c:
            await c.send_raw(raw)
            answers = await c.read_answers()
            assert [a.status for a in answers] == [status]
            assert await c.reader.read() == b""  # closed after the answer
        # The server goes on serving others.
        async with connected(port) as c:
            await c.send_raw(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            assert [a.status for a in await c.read_answers()] == [200]


async def test_a_body_over_the_gateway_limit_is_413(settings: Settings) -> None:
    s = settings.model_copy(update={"max_request_bytes": 1 << 20})
    async with running(s) as port, connected(port) as c:
        size = (1 << 20) + (128 << 10)
        head = f"POST {CHAT} HTTP/1.1\r\nhost: x\r\ncontent-length: {size}\r\n\r\n".encode()
        # Refused on its declared length, before its body: only the start is sent.
        await c.send_raw(head + b"x" * 1024)
        answers = await c.read_answers()
        assert [a.status for a in answers] == [413]


async def test_a_peer_that_hangs_up_mid_check_leaves_the_server_serving(
    settings: Settings, with_key: None
) -> None:
    async with running(settings) as port:
        for cut in (10, 60, len(request(PLAIN)) - 3):
            async with connected(port) as c:
                await c.send_raw(request(PLAIN)[:cut])
        async with connected(port) as c:
            assert (await c.check(PLAIN)).status == 200
