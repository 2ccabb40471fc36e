"""The request log end to end through the real Envoy with the openai SDK: one record per
request (settled from the access log, from an exchange, estimated, refused), exact vs
estimated marked, who (key, end user) and what (model, tokens, spend, latency, status),
never the text; filters, paging and CSV / JSON-lines export."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import MakeKey
from tests.e2e.helpers import settled

MESSAGES = [{"role": "user", "content": "Tell me a story about a fox and a crow."}]
Client = Callable[[str], openai.AsyncOpenAI]


async def records(
    admin: httpx.AsyncClient, want: int, timeout_s: float = 10, **params: Any
) -> list[dict[str, Any]]:
    """The log's records matching `params` once there are `want` of them (writers flush
    in batches, off the request path)."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = await admin.get("/v1/admin/requests", params={"limit": 1000, **params})
        assert r.status_code == 200, r.text
        items: list[dict[str, Any]] = r.json()["items"]
        if len(items) >= want:
            return items
        assert time.monotonic() < deadline, items
        await asyncio.sleep(0.1)


async def test_one_record_per_request_exact_and_estimated_marked(
    make_key: MakeKey, client_for: Client, admin: httpx.AsyncClient
) -> None:
    key = await make_key(daily_limit=3000)
    client = client_for(key["api_key"])
    plain = await client.chat.completions.create(
        model="demo-small", messages=MESSAGES, max_tokens=20, user="alice@example.com"
    )
    stream = await client.chat.completions.create(
        model="demo-small",
        messages=MESSAGES,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-atlas-end-user": "bob"},
    )
    streamed = [c async for c in stream]
    usage = next(c.usage for c in streamed if c.usage is not None)
    # An upstream that reports no usage: the completion is estimated.
    raw = await client.chat.completions.create(
        model="demo-small",
        messages=MESSAGES,
        max_tokens=12,
        stream=True,
        extra_headers={"x-demo-no-usage": "1"},
    )
    _ = [c async for c in raw]
    await settled(admin, key["id"])
    # Over the key's quota: refused, and logged with the reason.
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="demo-small", messages=MESSAGES, max_tokens=4000)

    got = await records(admin, 4, key_id=key["id"])
    assert len(got) == 4, got  # one each, no more
    # Newest first as written: each service writes its batch, so order the four by time.
    refused, estimated, streamed_rec, plain_rec = sorted(got, key=lambda r: r["at"], reverse=True)
    assert refused["outcome"] == "refused", got
    assert plain.usage is not None
    assert plain_rec["request_id"] and plain_rec["status"] == 200
    assert (plain_rec["outcome"], plain_rec["exact"], plain_rec["stream"]) == (
        "completed",
        True,
        False,
    )
    assert plain_rec["prompt_tokens"] == plain.usage.prompt_tokens
    assert plain_rec["completion_tokens"] == plain.usage.completion_tokens
    assert plain_rec["end_user"] == "alice@example.com"
    assert plain_rec["model"] == "demo-small" and plain_rec["priority"] == "normal"
    assert plain_rec["latency_ms"] >= 0
    assert streamed_rec["stream"] and streamed_rec["exact"] and streamed_rec["end_user"] == "bob"
    assert streamed_rec["completion_tokens"] == usage.completion_tokens
    assert estimated["stream"] and not estimated["exact"] and estimated["completion_tokens"] > 0
    assert (refused["outcome"], refused["status"]) == ("refused", 429)
    assert refused["reason"] == "key.daily" and refused["prompt_tokens"] == 0
    text = json.dumps(got)
    assert "fox" not in text and "crow" not in text  # never the prompt or the completion

    # Filters and paging.
    assert [r["request_id"] for r in await records(admin, 1, key_id=key["id"], exact="false")] == [
        estimated["request_id"]
    ]
    assert len(await records(admin, 1, key_id=key["id"], outcome="refused")) == 1
    assert len(await records(admin, 1, key_id=key["id"], end_user="bob")) == 1
    r = await admin.get("/v1/admin/requests", params={"key_id": key["id"], "limit": 3})
    page = r.json()
    assert len(page["items"]) == 3 and page["next_cursor"]
    r = await admin.get(
        "/v1/admin/requests",
        params={"key_id": key["id"], "limit": 3, "cursor": page["next_cursor"]},
    )
    rest = r.json()
    assert len(rest["items"]) == 1
    assert {x["request_id"] for x in page["items"] + rest["items"]} == {
        x["request_id"] for x in got
    }
    assert rest["next_cursor"] is None

    # Exports.
    r = await admin.get("/v1/admin/requests/export", params={"key_id": key["id"]})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert sorted(row["request_id"] for row in rows) == sorted(x["request_id"] for x in got)
    assert {row["exact"] for row in rows} == {"True", "False"}
    r = await admin.get(
        "/v1/admin/requests/export", params={"key_id": key["id"], "format": "jsonl"}
    )
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert [x["request_id"] for x in lines] == [x["request_id"] for x in got]


async def test_unknown_keys_are_logged_without_a_key(
    stack: Any, admin: httpx.AsyncClient, client_for: Client
) -> None:
    with pytest.raises(openai.AuthenticationError):
        await client_for("sk-not-a-key-of-atlas-000000").chat.completions.create(
            model="demo-small", messages=MESSAGES, max_tokens=5
        )
    got = await records(admin, 1, outcome="refused", status=401)
    assert got[0]["key_id"] == "" and got[0]["reason"] == "invalid_api_key"


async def test_request_log_queries_are_bounded(admin: httpx.AsyncClient) -> None:
    for params in (
        {"limit": 0},
        {"limit": 1001},
        {"status": 600},
        {"outcome": "exploded"},
        {"cursor": "not-a-cursor"},
        {"key_id": "k" * 201},
        {"since": "yesterday"},
    ):
        r = await admin.get("/v1/admin/requests", params=params)
        assert r.status_code == 422, (params, r.text)
    r = await admin.get("/v1/admin/requests/export", params={"format": "xml"})
    assert r.status_code == 422
    assert (await admin.get("/v1/admin/requests", headers={"authorization": ""})).status_code == 401
