"""Issue 4 end to end: every response becomes an exact charge, clients see what the upstream
sent, and every reservation ends settled."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import openai

from atlas.local.stack import Stack
from atlas.requestbody import estimate_prompt_tokens
from tests.e2e.conftest import MakeKey
from tests.e2e.helpers import settled

#: 13 prompt tokens with cl100k: 6 of text, 3 for the message, 1 for the role, 3 priming.
MESSAGES = [{"role": "user", "content": "Tell me about foxes."}]
Client = Callable[[str], openai.AsyncOpenAI]


def prompt_of(messages: list[dict[str, str]]) -> int:
    """The prompt tokens of `messages` as the demo upstream counts them: cl100k with OpenAI's
    chat frame, which Atlas's estimator implements too (exactly, for text this short)."""
    return estimate_prompt_tokens({"model": "demo-small", "messages": messages})


async def test_non_stream_and_stream_charge_exactly_total_tokens(
    make_key: MakeKey, client_for: Client, admin: httpx.AsyncClient
) -> None:
    key = await make_key()
    client = client_for(key["api_key"])
    plain = await client.chat.completions.create(
        model="demo-small", messages=MESSAGES, max_tokens=17
    )
    stream = await client.chat.completions.create(
        model="demo-small", messages=MESSAGES, max_tokens=23, stream=True
    )
    async for _ in stream:
        pass
    u = await settled(admin, key["id"])
    assert plain.usage is not None and plain.usage.prompt_tokens == prompt_of(MESSAGES)
    assert u["daily"]["used"] == plain.usage.total_tokens + (plain.usage.prompt_tokens + 23)
    assert u["daily"]["requests"] == 2


async def test_client_asking_for_usage_receives_the_usage_chunk(
    make_key: MakeKey, client_for: Client, admin: httpx.AsyncClient
) -> None:
    key = await make_key()
    stream = await client_for(key["api_key"]).chat.completions.create(
        model="demo-small",
        messages=MESSAGES,
        max_tokens=9,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (
        prompt_of(MESSAGES),
        9,
    )
    assert usage.total_tokens == usage.prompt_tokens + 9
    assert (await settled(admin, key["id"]))["daily"]["used"] == usage.total_tokens


async def test_legacy_completions_stream_is_counted_and_stripped(
    make_key: MakeKey, client_for: Client, admin: httpx.AsyncClient
) -> None:
    key = await make_key()
    stream = await client_for(key["api_key"]).completions.create(
        model="demo-small", prompt="Once upon a time", max_tokens=11, stream=True
    )
    chunks = [c async for c in stream]
    assert all(c.choices for c in chunks)
    assert (await settled(admin, key["id"]))["daily"]["used"] == 4 + 11


async def test_embeddings_and_responses_are_charged(
    make_key: MakeKey, client_for: Client, admin: httpx.AsyncClient
) -> None:
    key = await make_key()
    client = client_for(key["api_key"])
    emb = await client.embeddings.create(model="demo-embed", input=["abcdefgh", "abcd"])
    resp = await client.responses.create(
        model="demo-small", input="Tell me about foxes.", max_output_tokens=16
    )
    stream = await client.responses.create(
        model="demo-small", input="Tell me about foxes.", max_output_tokens=20, stream=True
    )
    events = [e async for e in stream]
    assert events[-1].type == "response.completed"
    streamed = events[-1].response.usage
    u = await settled(admin, key["id"])
    assert resp.usage is not None and streamed is not None
    assert (streamed.input_tokens, streamed.output_tokens) == (resp.usage.input_tokens, 20)
    assert u["daily"]["used"] == emb.usage.total_tokens + resp.usage.total_tokens + (
        streamed.input_tokens + 20
    )


async def test_client_hanging_up_mid_stream_is_charged_what_was_generated(
    make_key: MakeKey, client_for: Client, admin: httpx.AsyncClient
) -> None:
    key = await make_key()
    stream = await client_for(key["api_key"]).chat.completions.create(
        model="demo-small",
        messages=MESSAGES,
        max_tokens=200,
        stream=True,
        extra_headers={"x-demo-chunk-delay-ms": "10"},
    )
    received = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            received += 1
            if received == 5:
                break
    await stream.close()
    u = await settled(admin, key["id"])
    prompt = prompt_of(MESSAGES)
    assert prompt + 5 <= u["daily"]["used"] < prompt + 200


async def test_upstream_error_charges_nothing(
    make_key: MakeKey, client_for: Client, admin: httpx.AsyncClient
) -> None:
    key = await make_key()
    client = client_for(key["api_key"])
    for stream in (False, True):
        try:
            await client.chat.completions.create(
                model="demo-small",
                messages=MESSAGES,
                max_tokens=50,
                stream=stream,
                extra_headers={"x-demo-status": "500"},
            )
        except openai.InternalServerError:
            pass
        else:
            raise AssertionError("expected a 500")
    u = await settled(admin, key["id"])
    assert u["daily"]["used"] == 0 and u["daily"]["requests"] == 2


async def test_64_concurrent_streams_on_one_key_charge_exactly(
    make_key: MakeKey, client_for: Client, admin: httpx.AsyncClient
) -> None:
    key = await make_key(burst=100, rate_per_sec=100)
    client = client_for(key["api_key"])

    async def one() -> str:
        stream = await client.chat.completions.create(
            model="demo-small", messages=MESSAGES, max_tokens=32, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    texts = await asyncio.gather(*(one() for _ in range(64)))
    assert all(len(t) == 4 * 32 for t in texts)
    u = await settled(admin, key["id"])
    assert u["daily"]["used"] == 64 * (prompt_of(MESSAGES) + 32)


async def test_upstream_without_usage_is_estimated_within_15_percent(
    make_key: MakeKey, client_for: Client, admin: httpx.AsyncClient, stack: Stack
) -> None:
    key, truth_key = await make_key(), await make_key()
    client = client_for(key["api_key"])
    long_prompt = [{"role": "user", "content": "A fox jumps over the lazy dog. " * 20}]
    told = await client_for(truth_key["api_key"]).chat.completions.create(
        model="demo-small", messages=long_prompt, max_tokens=120
    )
    assert told.usage is not None and told.usage.completion_tokens == 120
    truth = told.usage.total_tokens  # the demo upstream's own count (cl100k)
    stream = await client.chat.completions.create(
        model="demo-small",
        messages=long_prompt,
        max_tokens=120,
        stream=True,
        extra_headers={"x-demo-no-usage": "1"},
    )
    async for _ in stream:
        pass
    used = (await settled(admin, key["id"]))["daily"]["used"]
    assert abs(used - truth) <= 0.15 * truth
    async with httpx.AsyncClient() as raw:
        text = (
            await raw.get(f"http://127.0.0.1:{stack.settings.extproc_metrics_port}/metrics")
        ).text
    assert (
        'atlas_settlements_total{outcome="completed",source="estimated",status="settled"}' in text
    )


async def test_a_plain_completion_opens_no_ext_proc_stream_and_settles_exactly(
    make_key: MakeKey, client_for: Client, stack: Stack, admin: httpx.AsyncClient
) -> None:
    """authz already read the body and chose the `json` configuration: Envoy's json_to_metadata
    reads the response's usage and the gRPC access log carries it to extproc, which settles
    it exactly; no ext_proc message at all (issue 12)."""
    url = f"http://127.0.0.1:{stack.settings.extproc_metrics_port}/metrics"

    async def counts() -> dict[str, float]:
        async with httpx.AsyncClient() as raw:
            text = (await raw.get(url)).text
        return {
            ln.split('"')[1]: float(ln.rsplit(" ", 1)[1])
            for ln in text.splitlines()
            if ln.startswith("atlas_extproc_messages_total{")
        }

    key = await make_key()
    client = client_for(key["api_key"])
    before = await counts()
    reported = 0
    for _ in range(5):
        r = await client.chat.completions.create(
            model="demo-small", messages=MESSAGES, max_tokens=3
        )
        assert r.usage is not None
        reported += r.usage.total_tokens
    u = await settled(admin, key["id"])
    after = await counts()
    assert {k: after.get(k, 0) - before.get(k, 0) for k in after} == dict.fromkeys(after, 0)
    assert u["daily"]["used"] == reported  # the upstream's own usage, exactly
