"""The end-to-end suite on Redis Cluster: every test of the e2e modules that share one stack
(foundation, admission, accounting, hostile input; idempotent retries) runs here again on
`tests.cluster`'s `stack`: Envoy, authz, extproc and admin using the cluster client against
3 Valkey masters. Among them: keys created over REST, non-stream and streamed completions
charged exactly, rate limits as `openai.RateLimitError`, revocation and deletion refused
within 1 s (pub/sub across nodes), `/v1/usage` and forecasting through Envoy, 64 concurrent
streams on one key.
"""

from __future__ import annotations

import asyncio
import time

import httpx

from atlas.ledger import keys
from atlas.ledger.protocol import AdmitRequest
from atlas.ledger.redis import RedisLedger
from atlas.local.stack import Stack
from tests.cluster.conftest import REAP_INTERVAL_S, primaries, reuse_tests, sync_cluster
from tests.e2e import (
    test_accounting,
    test_admission,
    test_foundation,
    test_hostile_input,
    test_idempotency,
)
from tests.e2e.conftest import MakeKey

SHARED_STACK_MODULES = (test_foundation, test_admission, test_accounting, test_hostile_input)

E2E_TESTS = reuse_tests(*SHARED_STACK_MODULES)
#: Idempotent retries on the shared stack (the module's replica and gRPC stacks are its own).
E2E_TESTS |= {
    name: getattr(test_idempotency, name)
    for name in (
        "test_a_retry_after_completion_gets_the_same_answer_and_no_charge",
        "test_concurrent_duplicates_make_one_upstream_call_and_a_stream_replays_exactly",
        "test_the_sdks_concurrent_duplicate_is_a_conflict_and_its_retry_the_same_stream",
        "test_a_failed_original_lets_its_retry_run",
    )
}
globals().update(E2E_TESTS)  # collected by pytest as this module's tests


def test_the_shared_stack_suite_is_imported() -> None:
    assert len(E2E_TESTS) > 25


async def test_the_services_use_the_cluster(stack: Stack, make_key: MakeKey) -> None:
    """Key state lands on every master, and no secret is stored on any of them (the e2e
    secrets test scans one node only: it uses a plain client)."""
    assert stack.settings.redis_cluster
    made = [await make_key() for _ in range(30)]
    secrets = [key["api_key"] for key in made]
    with sync_cluster(stack.settings.redis_url) as client:
        # 30 keys miss a master with probability 3 * (2/3)**30, about 1.5e-5
        holders = {client.get_node_from_key(keys.record(key["id"])).name for key in made}
        assert len(holders) == 3
        for node in primaries(client):
            for name in node.scan_iter(count=1000):
                value = node.get(name) if node.type(name) == "string" else ""
                assert not any(s in name or s in (value or "") for s in secrets), name


async def test_the_stacks_reaper_settles_a_lost_reservation(
    stack: Stack, make_key: MakeKey, admin: httpx.AsyncClient
) -> None:
    """extproc's reaper walks every key with the reap_keys pipeline (EVALSHA on every node):
    a reservation whose stream was lost is charged and released on its next pass."""
    key = await make_key()
    ledger = RedisLedger.from_settings(stack.settings)
    try:
        rec = await ledger.get_key(key["id"])
        assert rec is not None
        lost = await ledger.admit(rec, AdmitRequest("lost-1", 10, 40, "normal", "demo", 1.0))
        assert lost.admitted
        # Its stream claimed it (so it reached the upstream), then was lost.
        assert await ledger.lease({key["id"]: ["lost-1"]}) == 1
    finally:
        await ledger.close()
    with sync_cluster(stack.settings.redis_url) as client:
        client.zadd(keys.reservation_expiry(key["id"]), {"lost-1": 0})  # its TTL is over
    deadline = time.monotonic() + 3 * REAP_INTERVAL_S + 2
    while True:
        u = (await admin.get(f"/v1/admin/keys/{key['id']}/usage")).json()
        if u["open_reservations"] == 0:
            break
        assert time.monotonic() < deadline, u
        await asyncio.sleep(0.05)
    assert (u["daily"]["used"], u["daily"]["reserved"]) == (50, 0)
