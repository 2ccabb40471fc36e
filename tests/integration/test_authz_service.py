"""authz's gRPC service in-process against a real valkey-server: Redis commands per Check,
and both fail modes with the server stopped mid-test."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from atlas.keymodel import KeyRecord
from atlas.ledger.redis import RedisLedger
from atlas.settings import Settings
from atlas.stack import free_port
from tests.factories import key_record
from tests.integration.authz_client import check_request, headers_of, running_authz, status_of
from tests.servers import start_valkey, stop

SECRET = "sk-atlas-integration-0123456789"


def key(**kw: object) -> KeyRecord:
    return key_record(SECRET, id="key_i", **kw)


class Monitor:
    """Records the commands clients send (MONITOR marks a script's own commands as `lua`;
    INFO commandstats and CLIENT LIST would count those too)."""

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url, decode_responses=True)
        self._mon = self._client.monitor()
        self._mon.__enter__()
        self.commands: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                cmd = self._mon.next_command()
            except (redis.ConnectionError, ValueError, AttributeError, OSError):
                return
            if cmd["client_type"] != "lua":
                self.commands.append(cmd["command"].split()[0].lower())

    def stop(self) -> None:
        with contextlib.suppress(redis.RedisError, OSError):
            self._mon.__exit__(None, None, None)
        self._client.close()
        self._thread.join(5)


async def test_one_redis_command_per_check_in_steady_state(
    settings: Settings, ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    await ledger.create_key(key())
    async with running_authz(settings) as stub:
        assert status_of(await stub.Check(check_request(SECRET))) == 200  # warms the cache
        monitor = Monitor(settings.redis_url)  # on once the server acknowledged it
        n = 50
        try:
            for _ in range(n):
                assert status_of(await stub.Check(check_request(SECRET))) == 200
            deadline = time.monotonic() + 5
            while len(monitor.commands) < n and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        finally:
            monitor.stop()
    assert monitor.commands == ["evalsha"] * n


async def test_revoked_key_is_refused_at_once_through_the_change_feed(
    settings: Settings, ledger: RedisLedger
) -> None:
    rec = key()
    await ledger.create_key(rec)
    async with running_authz(settings) as stub:
        assert status_of(await stub.Check(check_request(SECRET))) == 200
        await ledger.put_key(rec.model_copy(update={"status": "disabled"}))
        deadline = time.monotonic() + 1.0
        while status_of(await stub.Check(check_request(SECRET))) != 403:
            assert time.monotonic() < deadline, "still admitted 1 s after the change"


async def test_unreachable_redis_denies_fast_in_deny_mode(settings: Settings) -> None:
    down = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    async with running_authz(down) as stub:
        start = time.monotonic()
        resp = await stub.Check(check_request(SECRET))
        elapsed = time.monotonic() - start
    assert status_of(resp) == 503
    assert headers_of(resp)["retry-after"] == "1"
    assert elapsed < 0.5  # within Envoy's ext_authz timeout


@pytest.fixture
def own_valkey(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    proc, url = start_valkey(tmp_path)
    yield url, proc
    stop(proc)


async def test_local_fail_mode_limits_known_keys_when_redis_stops(
    settings: Settings, own_valkey: tuple[str, subprocess.Popen[bytes]]
) -> None:
    url, proc = own_valkey
    local = settings.model_copy(update={"redis_url": url, "fail_mode": "local"})
    ledger = RedisLedger.from_settings(local)
    try:
        await ledger.create_key(key(rate_per_sec=0.01, burst=3))
    finally:
        await ledger.close()
    async with running_authz(local) as stub:
        ok = await stub.Check(check_request(SECRET))
        assert status_of(ok) == 200 and "x-atlas-degraded" not in headers_of(ok)
        proc.kill()  # Redis goes away mid-test
        proc.wait()
        answers = [await stub.Check(check_request(SECRET)) for _ in range(5)]
        # Known key: admitted under the per-replica limiter (burst 3), marked degraded...
        assert [status_of(a) for a in answers] == [200, 200, 200, 429, 429]
        assert headers_of(answers[0])["x-atlas-degraded"] == "ledger-unavailable"
        assert answers[0].dynamic_metadata["degraded"] is True
        # ...and never an unknown one.
        assert status_of(await stub.Check(check_request("sk-atlas-unknown-000000000"))) == 503


async def test_global_shedding_by_priority(
    settings: Settings, ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    await ledger.create_key(key(max_priority="critical"))
    shedding = settings.model_copy(update={"capacity_tokens": 1000, "inflight_sync_s": 0.05})
    body = {"model": "m", "max_tokens": 298, "prompt": "12345678"}  # 300 tokens each
    async with running_authz(shedding) as stub:
        low = [
            status_of(
                await stub.Check(check_request(SECRET, body, **{"x-request-priority": "low"}))
            )
            for _ in range(3)
        ]
        assert low == [200, 200, 503]  # 600 in flight + 300 > 70% of 1000
        normal = await stub.Check(check_request(SECRET, body))
        assert status_of(normal) == 200  # 900 <= 90%
        high = await stub.Check(check_request(SECRET, body, **{"x-request-priority": "high"}))
        assert status_of(high) == 503  # 1200 > 100%
        critical = await stub.Check(
            check_request(SECRET, body, **{"x-request-priority": "critical"})
        )
        assert status_of(critical) == 200  # never shed
        assert headers_of(high)["retry-after"] == "1"
        deadline = time.monotonic() + 2
        while redis_sync.get("atlas:{g}:inflight") != "1200":
            assert time.monotonic() < deadline, redis_sync.get("atlas:{g}:inflight")
            await asyncio.sleep(0.02)
