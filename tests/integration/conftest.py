"""Fixtures of the integration tests: the admin API in process (ASGI) on the real ledger."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest_asyncio

from admin.app import create_app
from atlas.ledger.redis import RedisLedger
from atlas.settings import Settings

#: The bootstrap admin token of `tests/conftest.py`'s settings.
ADMIN = {"authorization": "Bearer test-admin-token"}


@pytest_asyncio.fixture
async def api(settings: Settings, ledger: RedisLedger) -> AsyncIterator[httpx.AsyncClient]:
    """The admin API, signed in with the bootstrap token."""
    app = create_app(settings, ledger)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://admin", headers=ADMIN
    ) as client:
        yield client
