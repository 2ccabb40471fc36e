"""Shared test plumbing: a real valkey-server for integration tests (session-scoped, flushed
per test) and log dumps on failure."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis

from atlas.ledger.redis import RedisLedger
from atlas.settings import Settings
from tests.servers import start_valkey, stop


@pytest.fixture(scope="session")
def valkey_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    proc, url = start_valkey(tmp_path_factory.mktemp("valkey"))
    yield url
    stop(proc)


@pytest.fixture
def redis_sync(valkey_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(valkey_url, decode_responses=True)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def settings(valkey_url: str) -> Settings:
    # A cold client meeting a 200-way burst opens up to redis_max_connections connections at
    # once; on a loaded CI machine that can take longer than the 0.25 s default budget. The
    # tests about timing (slow Redis, fail modes) set their own budget.
    return Settings(redis_url=valkey_url, admin_token="test-admin-token", redis_timeout_s=2.0)


@pytest_asyncio.fixture
async def ledger(settings: Settings, redis_sync: redis.Redis) -> AsyncIterator[RedisLedger]:
    the_ledger = RedisLedger.from_settings(settings)
    yield the_ledger
    await the_ledger.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        stack = getattr(item, "funcargs", {}).get("stack")
        if stack is not None:
            report.sections.append(("atlas stack logs", stack.logs()))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in ("integration", "e2e", "cluster"):
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))
