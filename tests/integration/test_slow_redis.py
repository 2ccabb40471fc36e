"""A slow Redis (latency injected by a local TCP proxy): a Check fails within its budget and
follows the fail mode, instead of holding the request."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from atlas.ledger.redis import RedisLedger
from atlas.settings import Settings
from tests.factories import key_record
from tests.integration.authz_client import check_request, headers_of, running_authz, status_of
from tests.servers import DelayProxy, port_of

SECRET = "sk-atlas-slow-redis-0123456789"


@pytest_asyncio.fixture
async def proxy(settings: Settings, ledger: RedisLedger) -> AsyncIterator[tuple[DelayProxy, str]]:
    p = DelayProxy(port_of(settings.redis_url))
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
