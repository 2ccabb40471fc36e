from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from atlas.credentials import client_key as bearer_token
from atlas.errors import Denied
from atlas.keymodel import KeyRecord
from atlas.modelnames import ModelNames
from atlas.settings import Settings
from authz.keycache import KeyCache
from authz.policy import Authorizer, CheckInput
from authz.refusals import ratelimit_headers
from tests.factories import key_record
from tests.unit.fakes import FakeLedger, admission

SECRET = "sk-atlas-test-secret-0123456789"


def make_key(**kw: Any) -> KeyRecord:
    fields = {"daily_limit": 10_000, "monthly_limit": 100_000, "rate_per_sec": 5, "burst": 10}
    return key_record(SECRET, **{**fields, **kw})


def inp(body: dict[str, Any] | None = None, **headers: str) -> CheckInput:
    h = {"authorization": f"Bearer {SECRET}", **headers}
    raw = json.dumps(body or {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    return CheckInput(headers=h, path="/v1/chat/completions", body=raw.encode(), body_complete=True)


@pytest.fixture
def fake() -> FakeLedger:
    return FakeLedger()


def authorizer(fake: FakeLedger, key: KeyRecord | None = None, **settings: Any) -> Authorizer:
    if key is not None:
        fake.keys[key.secret_hash] = key
    cache = KeyCache(fake.find_key, ttl_s=30)
    return Authorizer(
        fake,
        cache,
        Settings(**settings),
        new_id=lambda: "rid-1",
        clock=lambda: datetime(2026, 11, 23, tzinfo=UTC).timestamp(),
    )


def test_bearer_token_forms() -> None:
    assert bearer_token({"authorization": "Bearer abc"}) == "abc"
    assert bearer_token({"authorization": "bearer  abc "}) == "abc"
    assert bearer_token({"x-api-key": "k"}) == "k"
    assert bearer_token({"authorization": "Basic abc"}) is None
    assert bearer_token({}) is None


async def test_unknown_and_missing_keys_are_401(fake: FakeLedger) -> None:
    a = authorizer(fake)
    with pytest.raises(Denied) as info:
        await a.check(inp())
    assert info.value.status == 401 and info.value.code == "invalid_api_key"
    with pytest.raises(Denied) as info:
        await a.check(CheckInput({}, "/v1/x", b"", True))
    assert info.value.status == 401


async def test_disabled_expired_and_model_are_403(fake: FakeLedger) -> None:
    past = datetime(2026, 1, 1, tzinfo=UTC)
    for key, code in (
        (make_key(status="disabled"), "key_disabled"),
        (make_key(expires_at=past), "key_expired"),
        (make_key(models=["other"]), "model_not_allowed"),
    ):
        with pytest.raises(Denied) as info:
            await authorizer(FakeLedger(), key).check(inp())
        assert (info.value.status, info.value.code) == (403, code)


async def test_admits_and_reserves_prompt_plus_max_tokens(fake: FakeLedger) -> None:
    v = await authorizer(fake, make_key(expires_at=datetime(2027, 1, 1, tzinfo=UTC))).check(
        inp({"model": "m", "max_tokens": 30, "n": 2, "prompt": "x" * 40})
    )
    assert v.reservation_id == "rid-1" and v.priority == "normal"
    req = fake.admits[0]
    # 40 x's are 5 cl100k tokens
    assert (req.prompt_tokens, req.completion_tokens, req.model) == (5, 60, "m")
    assert req.ceiling == 0.95


async def test_default_reservation_by_priority_is_capped(fake: FakeLedger) -> None:
    a = authorizer(fake, make_key(daily_limit=100_000), max_reservation=2000)
    await a.check(inp(**{"x-request-priority": "low"}))
    assert fake.admits[-1].completion_tokens == 2000  # 5% of 100k = 5000, capped
    a2 = authorizer(FakeLedger(), make_key(daily_limit=1000))
    await a2.check(inp())
    assert a2._ledger.admits[-1].completion_tokens == 100  # type: ignore[attr-defined]


async def test_priority_never_escalates_past_max(fake: FakeLedger) -> None:
    a = authorizer(fake, make_key(priority="low", max_priority="normal"))
    assert (await a.check(inp(**{"x-request-priority": "critical"}))).priority == "normal"
    assert (await a.check(inp())).priority == "low"
    with pytest.raises(Denied) as info:
        await a.check(inp(**{"x-request-priority": "urgent"}))
    assert info.value.status == 400


async def test_refusals_map_to_openai_429s(fake: FakeLedger) -> None:
    a = authorizer(fake, make_key())
    fake.next_admission = admission(False, "rate_limit_requests", retry_after_ms=1500)
    with pytest.raises(Denied) as info:
        await a.check(inp())
    d = info.value
    assert (d.status, d.code, d.retry_after_s) == (429, "rate_limit_exceeded", 1.5)
    assert d.headers["x-ratelimit-limit-requests"] == "10"
    fake.next_admission = admission(False, "quota_daily", retry_after_ms=3_600_000)
    with pytest.raises(Denied) as info:
        await a.check(inp())
    assert (info.value.code, info.value.type) == ("insufficient_quota", "insufficient_quota")
    assert info.value.retry_after_s == 3600


async def test_ledger_down_is_503(fake: FakeLedger) -> None:
    a = authorizer(fake, make_key())
    fake.down = True
    with pytest.raises(Denied) as info:
        await a.check(inp())
    assert info.value.status == 503


def test_ratelimit_headers_prefer_tokens_per_minute() -> None:
    a = admission(tokens_remaining=400, tokens_reset_ms=2500)
    h = ratelimit_headers(a, make_key(tokens_per_minute=1000))
    assert h["x-ratelimit-limit-tokens"] == "1000"
    assert h["x-ratelimit-remaining-tokens"] == "400"
    assert h["x-ratelimit-reset-tokens"] == "2.500s"
    h = ratelimit_headers(admission(day_used=100, day_reserved=50), make_key())
    assert h["x-ratelimit-remaining-tokens"] == str(10_000 - 150)


async def test_key_cache_hits_and_invalidation(fake: FakeLedger) -> None:
    key = make_key()
    fake.keys[key.secret_hash] = key
    lookups = 0

    async def lookup(h: str) -> KeyRecord | None:
        nonlocal lookups
        lookups += 1
        return await fake.find_key(h)

    now = [0.0]
    cache = KeyCache(lookup, ttl_s=30, clock=lambda: now[0])
    assert await cache.get(key.secret_hash) == key
    assert await cache.get(key.secret_hash) == key
    assert lookups == 1
    cache.invalidate(key.id)
    await cache.get(key.secret_hash)
    assert lookups == 2
    assert await cache.get("unknown") is None
    now[0] += 2  # negative entries live 1 s
    assert await cache.get("unknown") is None
    assert lookups == 4
    now[0] += timedelta(seconds=31).total_seconds()
    await cache.get(key.secret_hash)
    assert lookups == 5


async def test_key_cache_invalidates_every_hash_an_app_is_cached_under() -> None:
    app = make_key().model_copy(update={"app": "checkout", "principals": ["spiffe://a"]})
    by_hash = {h: app for h in app.lookup_hashes()}
    lookups = 0

    async def lookup(h: str) -> KeyRecord | None:
        nonlocal lookups
        lookups += 1
        return by_hash.get(h)

    cache = KeyCache(lookup, ttl_s=30)
    for h in by_hash:
        assert await cache.get(h) == app
    cache.invalidate(app.id)
    assert all(cache.fresh(h) is None for h in by_hash)
    assert lookups == len(by_hash) == 2


def raw_inp(body: bytes, path: str = "/v1/chat/completions", **kw: Any) -> CheckInput:
    h = {"authorization": f"Bearer {SECRET}", **kw.pop("headers", {})}
    return CheckInput(headers=h, path=path, body=body, body_complete=True, **kw)


async def refused(a: Authorizer, request: CheckInput) -> Denied:
    with pytest.raises(Denied) as info:
        await a.check(request)
    return info.value


async def test_partial_body_is_refused_413_never_admitted_at_a_guess(fake: FakeLedger) -> None:
    a = authorizer(fake, make_key(models=["m"]))
    head = b'{"model":"m","max_tokens":10,"messages":[{"role":"user","content":"' + b"x" * 500
    d = await refused(
        a,
        CheckInput(
            {"authorization": f"Bearer {SECRET}"}, "/v1/completions", head, False, body_size=4 << 20
        ),
    )
    assert (d.status, d.code, d.type) == (413, "request_too_large", "invalid_request_error")
    assert fake.admits == []


async def test_completions_reserve_every_prompt_and_choice(fake: FakeLedger) -> None:
    a = authorizer(fake, make_key(daily_limit=10**9))
    prompts = json.dumps(["x" * 40] * 128)
    body = f'{{"model":"m","prompt":{prompts},"n":5,"max_tokens":200}}'.encode()
    await a.check(raw_inp(body, "/v1/completions"))
    req = fake.admits[-1]
    assert (req.prompt_tokens, req.completion_tokens, req.choices) == (640, 128_000, 640)
    # Without max_tokens the default reservation is per choice too.
    await a.check(raw_inp(b'{"model":"m","prompt":["a","b"],"n":3}', "/v1/completions"))
    assert (fake.admits[-1].completion_tokens, fake.admits[-1].choices) == (2000 * 6, 6)


async def test_numbers_out_of_bounds_are_400_and_never_reach_the_ledger(
    fake: FakeLedger,
) -> None:
    a = authorizer(fake, make_key())
    for body, param in (
        (b'{"model":"m","max_tokens":100000000000000,"prompt":"x"}', "max_tokens"),
        (b'{"model":"m","n":1000,"prompt":"x"}', "n"),
        (b'{"model":"m","stream":"maybe","prompt":"x"}', "stream"),
    ):
        d = await refused(a, raw_inp(body))
        assert (d.status, d.type, d.param) == (400, "invalid_request_error", param)
    assert fake.admits == []
    await a.check(raw_inp(b'{"model":"m","max_tokens":"40","n":2.0,"stream":1,"prompt":"x"}'))
    assert fake.admits[-1].completion_tokens == 80


async def test_only_accounted_endpoints_are_forwarded(fake: FakeLedger) -> None:
    a = authorizer(fake, make_key(models=["m"]))
    for method, path in (
        ("POST", "/v1/batches"),
        ("POST", "/v1/images/generations"),
        ("DELETE", "/v1/files/x"),
        ("POST", "/v1/realtime/sessions"),
        ("GET", "/v1/chat/completions"),
        ("POST", "/v1/Chat/Completions"),
        ("POST", "/v1/chat/completions/"),
    ):
        d = await refused(a, raw_inp(b"{}", path, method=method))
        assert (d.status, d.code, d.type) == (404, "unknown_endpoint", "invalid_request_error")
    for path in (
        "/v1/chat/completions/../batches",
        "/v1/chat/completions/%2e%2e/batches",
        "/v1/chat%2Fcompletions",
        "/v1//chat/completions",
        "/v1/./chat/completions",
        "/v1/chat\\completions",
    ):
        assert (await refused(a, raw_inp(b"{}", path))).status == 400, path
    assert fake.admits == []
    body = b'{"model":"m","max_tokens":1,"prompt":"x"}'
    v = await a.check(raw_inp(body, "/v1/chat/completions?api-version=1"))
    assert v.route == "chat"
    # GET /v1/models: rate limited (one admit), nothing reserved, no model to check.
    v = await a.check(raw_inp(b"", "/v1/models", method="GET"))
    req = fake.admits[-1]
    assert (v.route, req.prompt_tokens, req.completion_tokens, req.model) == (
        "models",
        0,
        0,
        "models",
    )
    await a.check(raw_inp(b"", "/v1/models/m", method="GET"))
    # Embeddings generate nothing: only the prompt is reserved.
    await a.check(raw_inp(b'{"model":"m","input":"abcdefgh"}', "/v1/embeddings"))
    assert (fake.admits[-1].prompt_tokens, fake.admits[-1].completion_tokens) == (1, 0)


async def test_extra_endpoints_are_admitted_under_the_request_limit(fake: FakeLedger) -> None:
    a = authorizer(fake, make_key(), extra_endpoints=["POST /v1/images/*", "* /v1/files/*"])
    for method, path in (("POST", "/v1/images/generations"), ("DELETE", "/v1/files/f-1")):
        v = await a.check(raw_inp(b"{}", path, method=method))
        assert v.route == "extra"
        assert (fake.admits[-1].prompt_tokens, fake.admits[-1].completion_tokens) == (0, 0)
    assert (await refused(a, raw_inp(b"{}", "/v1/batches"))).status == 404
    assert (await refused(a, raw_inp(b"{}", "/v1/files/%2e%2e/batches"))).status == 400
    fake.next_admission = admission(False, "rate_limit_requests", retry_after_ms=500)
    d = await refused(a, raw_inp(b"{}", "/v1/images/edits"))
    assert (d.status, d.code) == (429, "rate_limit_exceeded")


def test_extra_endpoints_setting_is_validated() -> None:
    with pytest.raises(ValueError, match="METHOD /path"):
        Settings(extra_endpoints=["/v1/batches"])
    with pytest.raises(ValueError, match="METHOD /path"):
        Settings(extra_endpoints=["POST v1/batches"])


async def test_api_key_header_carries_the_key(fake: FakeLedger) -> None:
    assert bearer_token({"api-key": " k "}) == "k"
    a = authorizer(fake, make_key())
    body = b'{"model":"m","max_tokens":1,"prompt":"x"}'
    req = CheckInput({"api-key": SECRET}, "/v1/chat/completions", body, True)
    assert (await a.check(req)).key is not None


async def test_model_is_folded_for_the_ledger_but_checked_by_its_real_name(
    fake: FakeLedger,
) -> None:
    names = ModelNames(["m"], max_tracked=0)
    key = make_key(models=["m", "private-7b"])
    fake.keys[key.secret_hash] = key
    a = Authorizer(fake, KeyCache(fake.find_key, ttl_s=30), Settings(), names=names)
    await a.check(raw_inp(b'{"model":"private-7b","max_tokens":1,"prompt":"x"}'))
    await a.check(raw_inp(b'{"model":"m","max_tokens":1,"prompt":"x"}'))
    assert [r.model for r in fake.admits] == ["other", "m"]
    d = await refused(a, raw_inp(b'{"model":"other","max_tokens":1,"prompt":"x"}'))
    assert d.code == "model_not_allowed"


async def test_bodies_too_complex_for_the_loop_are_refused_without_a_pool(
    fake: FakeLedger,
) -> None:
    a = authorizer(fake, make_key())
    body = b'{"model":"m","messages":[' + b"[]," * 60_000 + b"[]]}"
    d = await refused(a, raw_inp(body))
    assert (d.status, d.code) == (400, "body_too_complex")
    assert fake.admits == []
