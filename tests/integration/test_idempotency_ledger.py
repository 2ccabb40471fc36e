"""Idempotency keys in the ledger's scripts, against a real valkey-server: the first request
of a key is admitted and holds it in flight; a duplicate is refused while it runs (never
charged nor counted), told apart by its body, answered from the stored response once it
completed; a failed original frees the key for its retry; keys are per API key."""

from __future__ import annotations

import redis

from atlas import idempotency
from atlas.keymodel import KeyRecord
from atlas.ledger import keys
from atlas.ledger.protocol import AdmitRequest, Settlement
from atlas.ledger.redis import RedisLedger
from atlas.windows import window_names
from tests.factories import key_record

TAG = idempotency.tag("retry-1")
BODY = idempotency.body_hash(b'{"model":"m"}')


def key(n: int = 0) -> KeyRecord:
    return key_record(f"sk-atlas-idempotent-{n}-0123456789", id=f"key_idem{n}")


def req(rid: str, body: str = BODY, tag: str = TAG) -> AdmitRequest:
    return AdmitRequest(rid, 10, 90, "normal", "m", 1.0, idempotency_tag=tag, body_hash=body)


def done(rec: KeyRecord, rid: str, what: str, response: str = "") -> Settlement:
    return Settlement(
        rec.id, rid, 10, 20, "m", True, "completed",
        idempotency_tag=TAG, idempotency=what, response=response,
    )  # fmt: skip


def day(r: redis.Redis, rec: KeyRecord, now_ms: int) -> dict[str, str]:
    name = f"{keys.window_prefix(rec.id)}d:{window_names(now_ms // 1000).day}"
    return r.hgetall(name)  # type: ignore[return-value]


async def test_a_duplicate_waits_then_replays_and_is_never_charged(
    ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    rec = key()
    first = await ledger.admit(rec, req("r1"))
    assert first.admitted
    busy = await ledger.admit(rec, req("r2"))
    assert not busy.admitted and busy.reason == "idempotency_in_progress"
    assert 1000 <= busy.retry_after_ms <= 5000
    other = await ledger.admit(rec, req("r3", body=idempotency.body_hash(b"other")))
    assert other.reason == "idempotency_mismatch"
    w = day(redis_sync, rec, first.now_ms)
    assert (w["reserved"], w["requests"]) == ("100", "1")  # the duplicates left no trace

    stored = idempotency.stored("application/json", b'{"id":"chatcmpl-1"}')
    s = await ledger.settle(done(rec, "r1", "store", stored))
    assert s.status == "settled"
    again = await ledger.admit(rec, req("r4"))
    assert (again.admitted, again.reason, again.replay) == (False, "idempotency_replay", stored)
    assert idempotency.refusal(again).body == b'{"id":"chatcmpl-1"}'
    w = day(redis_sync, rec, first.now_ms)
    assert (w["used"], w["reserved"], w["requests"]) == ("30", "0", "1")
    # Kept for ATLAS_IDEMPOTENCY_TTL_S, under the key's own hash tag.
    ttl = redis_sync.ttl(f"{keys.window_prefix(rec.id)}idem:{TAG}")
    assert 86_000 < ttl <= 86_400
    # The same idempotency key under another API key is another request.
    assert (await ledger.admit(key(1), req("r5"))).admitted


async def test_a_failed_original_frees_the_key_and_a_big_one_is_not_replayed(
    ledger: RedisLedger,
) -> None:
    rec = key(2)
    assert (await ledger.admit(rec, req("r1"))).admitted
    await ledger.settle(done(rec, "r1", "drop"))  # upstream 5xx or a hang-up
    assert (await ledger.admit(rec, req("r2"))).admitted  # the retry runs
    # Only the request holding the key settles it: a stale settlement of another rid does not.
    await ledger.settle(done(rec, "r-other", "drop"))
    assert (await ledger.admit(rec, req("r3"))).reason == "idempotency_in_progress"
    await ledger.settle(done(rec, "r2", "unstored"))
    refused = await ledger.admit(rec, req("r4"))
    assert refused.reason == "idempotency_completed"
    assert idempotency.refusal(refused).status == 409


async def test_requests_without_a_key_are_untouched(ledger: RedisLedger) -> None:
    rec = key(3)
    for i in range(3):
        a = await ledger.admit(rec, req(f"r{i}", body="", tag=""))
        assert a.admitted and a.replay == ""


async def test_the_reaper_frees_the_key_of_a_request_that_never_settled(
    ledger: RedisLedger, redis_sync: redis.Redis
) -> None:
    rec = key(4)
    await ledger.create_key(rec)
    assert (await ledger.admit(rec, req("r1"))).admitted
    entry = redis_sync.hget(keys.reservations(rec.id), "r1")
    assert entry is not None and f"|i{TAG}|normal|m" in entry
    assert (await ledger.admit(rec, req("r2"))).reason == "idempotency_in_progress"
    redis_sync.zadd(keys.reservation_expiry(rec.id), {"r1": 0})  # never claimed: a lost request
    totals = await ledger.reap_keys([rec.id])
    assert totals.reaped == 1 and totals.lost[0][4:] == ("normal", "m")
    assert (await ledger.admit(rec, req("r3"))).admitted  # the retry runs
