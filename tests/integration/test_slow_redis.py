"""A slow Redis (latency injected by a local TCP proxy): a Check fails within its budget and
follows the fail mode, instead of holding the request."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from atlas.ledger.redis import RedisLedger
from atlas.settings import Settings
from tests.factories import key_record
from tests.integration.authz_client import check_request, headers_of, running_authz, status_of

SECRET = "sk-atlas-slow-redis-0123456789"


class DelayProxy:
    """127.0.0.1 TCP proxy adding `delay_s` before forwarding each chunk upstream->client."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.delay_s = 0.0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, slow: bool) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    if slow and self.delay_s:
                        await asyncio.sleep(self.delay_s)
                    dst.write(data)
                    await dst.drain()
            dst.close()

        tasks = [
            asyncio.create_task(pipe(reader, up_writer, False)),
            asyncio.create_task(pipe(up_reader, writer, True)),
        ]
        self._tasks.update(tasks)
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._tasks.difference_update(tasks)
            for w in (writer, up_writer):
                w.close()
                with contextlib.suppress(Exception):
                    await w.wait_closed()

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for h in list(self._handlers):  # each closes both of its writers
            h.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()


@pytest_asyncio.fixture
async def proxy(settings: Settings, ledger: RedisLedger) -> AsyncIterator[tuple[DelayProxy, str]]:
    port = int(settings.redis_url.rsplit(":", 1)[1].split("/")[0])
    p = DelayProxy(port)
    proxy_port = await p.start()
    await ledger.create_key(key_record(SECRET))
    yield p, f"redis://127.0.0.1:{proxy_port}/0"
    await p.stop()


@pytest.mark.parametrize(("mode", "status"), [("deny", 503), ("local", 200)])
async def test_slow_redis_check_fails_within_budget_and_follows_fail_mode(
    settings: Settings, proxy: tuple[DelayProxy, str], mode: str, status: int
) -> None:
    p, url = proxy
    slow = settings.model_copy(update={"redis_url": url, "redis_timeout_s": 0.1, "fail_mode": mode})
    async with running_authz(slow) as stub:
        assert status_of(await stub.Check(check_request(SECRET))) == 200  # key cached
        p.delay_s = 1.0
        start = time.monotonic()
        resp = await stub.Check(check_request(SECRET))
        elapsed = time.monotonic() - start
        p.delay_s = 0.0
    assert status_of(resp) == status
    assert elapsed < 0.4  # Envoy's ext_authz timeout is 0.5 s
    if mode == "local":
        assert headers_of(resp)["x-atlas-degraded"] == "ledger-unavailable"
