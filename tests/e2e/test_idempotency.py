"""Idempotent retries end to end through the real Envoy with the openai SDK: a retry of a
completed call with the same Idempotency-Key returns the same completion (id and text)
without calling the upstream or charging again; a duplicate sent while the first runs is a
409 with Retry-After; a stream is replayed byte for byte; a changed body under the same key
is a 422; a failed original lets its retry run; keys are per API key."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

from atlas.local.stack import Stack
from tests.e2e.conftest import ADMIN_TOKEN, MakeKey, running_stack
from tests.e2e.helpers import clear_upstream, settled, upstream_saw

MESSAGES: Any = [{"role": "user", "content": "Tell me about foxes."}]
Client = Callable[[str], openai.AsyncOpenAI]


def idem() -> dict[str, str]:
    return {"Idempotency-Key": str(uuid.uuid4())}


async def once_settled(send: Callable[[], Awaitable[httpx.Response]]) -> httpx.Response:
    """`send()`'s answer once the original's settlement reached Redis: it lands a moment
    after the client got its last byte, and until then a duplicate is told to wait."""
    deadline = time.monotonic() + 5
    while True:
        r = await send()
        if r.status_code != 409 or r.json()["error"]["code"] != "idempotency_in_progress":
            return r
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)


async def calls_to_upstream(stack: Stack) -> int:
    return sum(
        r["path"].endswith("/chat/completions") for r in await upstream_saw(stack.upstream_url)
    )


async def test_a_retry_after_completion_gets_the_same_answer_and_no_charge(
    make_key: MakeKey, client_for: Client, stack: Stack, admin: httpx.AsyncClient
) -> None:
    key = await make_key()
    client = client_for(key["api_key"])
    headers = idem()
    await clear_upstream(stack.upstream_url)
    first = await client.chat.completions.create(
        model="demo-small", messages=MESSAGES, max_tokens=8, extra_headers=headers
    )
    charged = (await settled(admin, key["id"]))["daily"]["used"]
    raw = await client.chat.completions.with_raw_response.create(
        model="demo-small", messages=MESSAGES, max_tokens=8, extra_headers=headers
    )
    again = raw.parse()
    assert raw.status_code == 200 and raw.headers["x-atlas-idempotent-replay"] == "true"
    assert again.id == first.id
    assert again.choices[0].message.content == first.choices[0].message.content
    assert await calls_to_upstream(stack) == 1
    assert first.usage is not None and charged == first.usage.total_tokens
    assert (await settled(admin, key["id"]))["daily"]["used"] == charged  # charged once

    with pytest.raises(openai.UnprocessableEntityError) as info:  # same key, another body
        await client.chat.completions.create(
            model="demo-small", messages=MESSAGES, max_tokens=9, extra_headers=headers
        )
    assert info.value.code == "idempotency_key_reused"
    # Another API key's request under the same idempotency key is its own.
    other = client_for((await make_key())["api_key"])
    mine = await other.chat.completions.create(
        model="demo-small", messages=MESSAGES, max_tokens=8, extra_headers=headers
    )
    assert mine.id != first.id and await calls_to_upstream(stack) == 2


async def test_concurrent_duplicates_make_one_upstream_call_and_a_stream_replays_exactly(
    make_key: MakeKey, stack: Stack
) -> None:
    key = await make_key()
    auth = {"authorization": f"Bearer {key['api_key']}", **idem()}
    body = {"model": "demo-small", "messages": MESSAGES, "max_tokens": 12, "stream": True}
    await clear_upstream(stack.upstream_url)
    async with httpx.AsyncClient(base_url=stack.proxy_url, timeout=30) as http:

        async def original() -> bytes:
            slow = {**auth, "x-demo-chunk-delay-ms": "40"}
            async with http.stream("POST", "/v1/chat/completions", json=body, headers=slow) as r:
                assert r.status_code == 200
                return b"".join([chunk async for chunk in r.aiter_raw()])

        task = asyncio.create_task(original())
        await asyncio.sleep(0.2)  # the original is streaming
        busy = await http.post("/v1/chat/completions", json=body, headers=auth)
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "idempotency_in_progress"
        assert int(busy.headers["retry-after"]) >= 1
        sent = await task
        replay = await once_settled(
            lambda: http.post("/v1/chat/completions", json=body, headers=auth)
        )
    assert replay.status_code == 200
    assert replay.headers["content-type"].startswith("text/event-stream")
    assert replay.content == sent and b"[DONE]" in sent
    assert b'"usage":{' not in sent  # the usage chunk Atlas injected never reaches the client
    assert await calls_to_upstream(stack) == 1


async def test_the_sdks_concurrent_duplicate_is_a_conflict_and_its_retry_the_same_stream(
    make_key: MakeKey, client_for: Client, stack: Stack
) -> None:
    client = client_for((await make_key())["api_key"])
    headers = {**idem(), "x-demo-chunk-delay-ms": "30"}
    await clear_upstream(stack.upstream_url)
    first = await client.chat.completions.create(
        model="demo-small", messages=MESSAGES, max_tokens=10, stream=True, extra_headers=headers
    )
    with pytest.raises(openai.ConflictError) as info:  # the first is still streaming
        await client.chat.completions.create(
            model="demo-small", messages=MESSAGES, max_tokens=10, stream=True, extra_headers=headers
        )
    assert info.value.code == "idempotency_in_progress"
    assert int(info.value.response.headers["retry-after"]) >= 1
    text = "".join([c.choices[0].delta.content or "" async for c in first if c.choices])
    deadline = time.monotonic() + 5
    while True:
        try:
            again = await client.chat.completions.create(
                model="demo-small", messages=MESSAGES, max_tokens=10, stream=True,
                extra_headers=headers,
            )  # fmt: skip
            break
        except openai.ConflictError:  # the first's settlement is on its way
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    assert "".join([c.choices[0].delta.content or "" async for c in again if c.choices]) == text
    assert await calls_to_upstream(stack) == 1


async def test_a_failed_original_lets_its_retry_run(
    make_key: MakeKey, client_for: Client, stack: Stack
) -> None:
    client = client_for((await make_key())["api_key"])
    headers = idem()
    await clear_upstream(stack.upstream_url)
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(
            model="demo-small",
            messages=MESSAGES,
            max_tokens=8,
            extra_headers={**headers, "x-demo-status": "500"},
        )
    # The failure's settlement frees the key a moment after the client saw the 500; until
    # then a retry is told to wait (409 + Retry-After, which the SDKs retry by themselves).
    deadline = time.monotonic() + 5
    while True:
        try:
            ok = await client.chat.completions.create(
                model="demo-small", messages=MESSAGES, max_tokens=8, extra_headers=headers
            )
            break
        except openai.ConflictError:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    assert ok.choices[0].message.content and await calls_to_upstream(stack) == 2


async def test_a_malformed_idempotency_key_is_a_400(make_key: MakeKey, stack: Stack) -> None:
    key = await make_key()
    async with httpx.AsyncClient(base_url=stack.proxy_url, timeout=10) as http:
        for bad in ("", "x" * 256):
            r = await http.post(
                "/v1/chat/completions",
                json={"model": "demo-small", "messages": MESSAGES, "max_tokens": 2},
                headers={"authorization": f"Bearer {key['api_key']}", "idempotency-key": bad},
            )
            assert r.status_code == 400, bad
            assert "Idempotency" in r.json()["error"]["message"] or "idempotency" in r.text


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def replicated() -> AsyncIterator[Stack]:
    """2 authz and 2 extproc replicas, and a response bound a stream does not fit in."""
    async with running_stack(replicas=2, idempotency_max_response_bytes=2000) as the_stack:
        yield the_stack


async def test_replicas_agree_and_a_response_over_the_bound_is_not_replayed(
    replicated: Stack,
) -> None:
    async with httpx.AsyncClient(
        base_url=replicated.admin_url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
    ) as admin:
        r = await admin.post("/v1/admin/keys", json={"name": "idem", "rate_per_sec": 100})
        key = r.json()
    auth = {"authorization": f"Bearer {key['api_key']}"}
    small = {"model": "demo-small", "messages": MESSAGES, "max_tokens": 4}
    big = {**small, "max_tokens": 64, "stream": True}  # ~64 events of ~200 bytes
    await clear_upstream(replicated.upstream_url)
    async with httpx.AsyncClient(base_url=replicated.proxy_url, timeout=30) as http:
        small_key, big_key = idem(), idem()
        first = await http.post("/v1/chat/completions", json=small, headers=auth | small_key)
        assert first.status_code == 200
        # Envoy spreads Checks and streams over both replicas: every retry is the same answer.
        for _ in range(6):
            again = await once_settled(
                lambda: http.post("/v1/chat/completions", json=small, headers=auth | small_key)
            )
            assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
        streamed = await http.post("/v1/chat/completions", json=big, headers=auth | big_key)
        assert streamed.status_code == 200 and len(streamed.content) > 2000
        deadline = time.monotonic() + 5
        while True:  # its settlement may still be on its way
            retry = await http.post("/v1/chat/completions", json=big, headers=auth | big_key)
            if (
                retry.status_code != 409
                or retry.json()["error"]["code"] != "idempotency_in_progress"
            ):
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    assert retry.status_code == 409 and retry.json()["error"]["code"] == "idempotency_completed"
    assert "completed" in retry.json()["error"]["message"]
    assert await calls_to_upstream(replicated) == 2


async def test_a_replay_over_grpc_ext_authz() -> None:
    """ATLAS_AUTHZ_PROTOCOL=grpc: the replay is a DeniedHttpResponse with status 200."""
    async with running_stack(authz_protocol="grpc") as stack:
        async with httpx.AsyncClient(
            base_url=stack.admin_url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}
        ) as admin:
            key = (await admin.post("/v1/admin/keys", json={"name": "grpc"})).json()
        headers = {"authorization": f"Bearer {key['api_key']}", **idem()}
        body = {"model": "demo-small", "messages": MESSAGES, "max_tokens": 4}
        async with httpx.AsyncClient(base_url=stack.proxy_url, timeout=10) as http:
            first = await http.post("/v1/chat/completions", json=body, headers=headers)
            again = await once_settled(
                lambda: http.post("/v1/chat/completions", json=body, headers=headers)
            )
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert again.headers["x-atlas-idempotent-replay"] == "true"
