"""authz's gRPC service in-process against a real valkey-server: Redis commands per Check,
and both fail modes with the server stopped mid-test."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr

from atlas.keymodel import KeyRecord
from atlas.ledger import keys
from atlas.ledger.protocol import AdmitRequest
from atlas.ledger.redis import RedisLedger
from atlas.local.ports import free_port
from atlas.requestbody import estimate_prompt_tokens
from atlas.settings import Settings
from tests.factories import key_record
from tests.integration.authz_client import (
    check_request,
    grant_of,
    headers_of,
    running_authz,
    status_of,
)
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
        assert grant_of(answers[0])["degraded"] is True
        # ...and never an unknown one.
        assert status_of(await stub.Check(check_request("sk-atlas-unknown-000000000"))) == 503


async def test_global_shedding_by_priority(
    settings: Settings, ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    await ledger.create_key(key(max_priority="critical"))
    shedding = settings.model_copy(update={"capacity_tokens": 1000, "inflight_sync_s": 0.05})
    prompt = {"model": "m", "prompt": "12345678"}
    body = {**prompt, "max_tokens": 300 - estimate_prompt_tokens(prompt)}  # 300 tokens each
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


async def test_client_headers_never_reach_the_upstream_raw(
    settings: Settings, ledger: RedisLedger
) -> None:
    await ledger.create_key(key())
    sent = {
        "x-request-priority": "high",
        "x_atlas_key_id": "key_forged",
        "X-Atlas-Key-Id": "key_forged",
        "x-atlas-priority": "critical",
        "X_Atlas_Whatever": "1",
        "api-key": SECRET,
        "x-api-key": SECRET,
    }
    async with running_authz(settings) as stub:
        resp = await stub.Check(check_request(SECRET, **sent))
    ok = resp.ok_response
    removed = set(ok.headers_to_remove)
    assert {
        "x-request-priority",
        "x_atlas_key_id",
        "x_atlas_whatever",
        "api-key",
        "x-api-key",
    } <= removed
    assert "authorization" in removed
    set_ = {o.header.key: o.header.value for o in ok.headers}
    assert set_["x-atlas-key-id"] == "key_i" and set_["x-atlas-priority"] == "high"
    assert not removed & set(set_)  # Envoy removes after it sets: never remove ours


async def test_upstream_credential_replaces_every_client_key_header(
    settings: Settings, ledger: RedisLedger
) -> None:
    await ledger.create_key(key())
    own = settings.model_copy(
        update={"strip_client_key": False, "upstream_api_key": SecretStr("sk-upstream")}
    )
    async with running_authz(own) as stub:
        resp = await stub.Check(check_request(None, **{"api-key": SECRET, "x-api-key": SECRET}))
    assert {"api-key", "x-api-key"} <= set(resp.ok_response.headers_to_remove)
    set_ = {o.header.key: o.header.value for o in resp.ok_response.headers}
    assert set_["authorization"] == "Bearer sk-upstream"


async def test_complex_bodies_parse_off_the_event_loop(
    settings: Settings, ledger: RedisLedger
) -> None:
    """Prose with many commas parses in the pool; 8 MB of tiny arrays is refused unparsed;
    a body the pool cannot finish in time is a 400; other keys are answered meanwhile."""
    await ledger.create_key(key())
    prose = ("a, " * 100_000)[:-2]  # 100k commas: over the inline bound, cheap to parse
    legit = json.dumps(
        {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": prose}]}
    ).encode()
    huge = b'{"model":"m","messages":[' + b"[]," * 2_600_000 + b"[]]}"  # ~8 MB, 5.2M values
    slow = b'{"model":"m","messages":[' + b"[]," * 400_000 + b"[]]}"  # under the pool bound
    async with running_authz(settings) as stub:
        ok = await stub.Check(check_request(SECRET, raw=legit))
        assert status_of(ok) == 200
        assert grant_of(ok)["prompt_estimate"] == estimate_prompt_tokens(json.loads(legit))
        refused = await stub.Check(check_request(SECRET, raw=huge))
        assert status_of(refused) == 400
        assert json.loads(refused.denied_response.body)["error"]["code"] == "body_too_complex"
    hurried = settings.model_copy(update={"authz_parse_timeout_s": 0.001})
    async with running_authz(hurried) as stub:
        attack = asyncio.ensure_future(stub.Check(check_request(SECRET, raw=slow)))
        victims = [await stub.Check(check_request(SECRET)) for _ in range(5)]
        assert [status_of(v) for v in victims] == [200] * 5
        timed_out = await attack
    assert status_of(timed_out) == 400
    assert json.loads(timed_out.denied_response.body)["error"]["code"] == "body_too_complex"


async def test_unknown_endpoints_are_404_through_the_service(
    settings: Settings, ledger: RedisLedger
) -> None:
    await ledger.create_key(key())
    async with running_authz(settings) as stub:
        r = await stub.Check(check_request(SECRET, path="/v1/batches"))
        assert status_of(r) == 404
        err = json.loads(r.denied_response.body)["error"]
        assert (err["type"], err["code"]) == ("invalid_request_error", "unknown_endpoint")
        r = await stub.Check(check_request(SECRET, raw=b'{"max_tokens": "x"}'))
        assert status_of(r) == 400
        assert json.loads(r.denied_response.body)["error"]["param"] == "max_tokens"
        r = await stub.Check(check_request(SECRET, raw=b"", path="/v1/models", method="GET"))
        assert status_of(r) == 200 and grant_of(r)["reserved"] == 0


async def test_admit_survives_a_script_flush_and_closed_connections(
    ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    """admit's own connections (outside redis-py's pool) reload the script after NOSCRIPT and
    reconnect when the server closed them while idle (a restart, an idle timeout)."""
    rec = key()
    await ledger.create_key(rec)

    def req(i: int) -> AdmitRequest:
        return AdmitRequest(
            reservation_id=f"r{i}",
            prompt_tokens=1,
            completion_tokens=1,
            priority="normal",
            model="m",
            ceiling=1.0,
        )

    assert (await ledger.admit(rec, req(0))).admitted
    redis_sync.script_flush()  # a restarted or failed-over server has no scripts
    assert (await ledger.admit(rec, req(1))).admitted
    assert redis_sync.client_kill_filter(_type="normal", skipme=True) >= 1
    await asyncio.sleep(0.05)
    assert (await ledger.admit(rec, req(2))).admitted
    assert redis_sync.hlen(keys.reservations(rec.id)) == 3
