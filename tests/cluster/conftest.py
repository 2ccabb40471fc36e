"""Redis Cluster: a local 3-master Valkey cluster, started once for this package.

`settings` and `redis_sync` override the root fixtures of the same names, so the ledger
tests imported here from `tests/integration` run unchanged against the cluster (with the
cluster client); `stack` is the whole local stack on the cluster, for the end-to-end tests
imported from `tests/e2e` (their `admin`, `make_key` and `client_for` fixtures are reused).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from types import ModuleType
from typing import Any

import pytest
import pytest_asyncio
import redis
from redis.cluster import RedisCluster

from atlas.local.stack import Stack
from atlas.settings import Settings
from tests.e2e.conftest import admin as admin  # the e2e fixtures, on this package's `stack`
from tests.e2e.conftest import client_for as client_for
from tests.e2e.conftest import make_key as make_key
from tests.e2e.conftest import running_stack
from tests.servers import start_valkey_cluster, stop

#: the cluster stack's reaper pass interval (5 s by default), so a test can watch one pass.
REAP_INTERVAL_S = 1.0


@pytest.fixture(scope="package")
def cluster_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    procs, url = start_valkey_cluster(tmp_path_factory.mktemp("valkey-cluster"))
    yield url
    for proc in procs:
        stop(proc)


@contextlib.contextmanager
def sync_cluster(url: str) -> Iterator[RedisCluster]:
    """A sync cluster client whose sockets are closed on exit: its close() leaves each
    node's pool (given to the node's client, so not closed by it) to the GC."""
    client = RedisCluster.from_url(url, decode_responses=True)
    try:
        yield client
    finally:
        client.disconnect_connection_pools()
        client.close()


@pytest.fixture
def redis_sync(cluster_url: str) -> Iterator[RedisCluster]:
    """A sync cluster client; every primary flushed before the test."""
    with sync_cluster(cluster_url) as client:
        client.flushall()
        yield client


@pytest.fixture
def settings(cluster_url: str) -> Settings:
    # Bursts of 200 concurrent scripts queue for connections; the cluster client is slower
    # per call than the plain one, so these tests give each call more time than the 0.25 s
    # default (a busy CI machine measured up to 0.2 s for the whole burst locally).
    return Settings(
        redis_url=cluster_url,
        redis_cluster=True,
        admin_token="test-admin-token",
        redis_timeout_s=2.0,
    )


def reuse_tests(*modules: ModuleType) -> dict[str, Any]:
    """The test functions defined in `modules`, to re-run in a cluster module:
    `globals().update(reuse_tests(...))` (pytest collects them as that module's tests)."""
    found = {
        name: fn
        for module in modules
        for name, fn in vars(module).items()
        if name.startswith("test_") and getattr(fn, "__module__", None) == module.__name__
    }
    assert found, modules
    return found


def primaries(client: RedisCluster) -> list[redis.Redis]:
    """A plain client per primary (for per-node checks: SCAN, INFO)."""
    return [node.redis_connection for node in client.get_primaries()]


@contextlib.asynccontextmanager
async def cluster_stack(cluster_url: str, **overrides: Any) -> AsyncIterator[Stack]:
    """`tests.e2e.conftest.running_stack` on the cluster: an external Redis (no embedded
    valkey-server) and `redis_cluster`, which reaches the children through the environment."""
    async with running_stack(redis_url=cluster_url, redis_cluster=True, **overrides) as stack:
        yield stack


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(cluster_url: str) -> AsyncIterator[Stack]:
    """Module-scoped: stopped (its reaper included) before the ledger tests flush the cluster."""
    with sync_cluster(cluster_url) as client:
        client.flushall()
    async with cluster_stack(cluster_url, reap_interval_s=REAP_INTERVAL_S) as the_stack:
        yield the_stack
