"""Issue 13 end to end: every wire API charged exactly from the upstream's usage, estimates
within 10% of the upstream's real tokenizer when usage is withheld, CJK prompts refused by
their true size, hang-ups charged what the upstream processed. Real Envoy, the openai,
anthropic and google-genai SDKs, the demo upstream counting with cl100k."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anthropic
import httpx
import openai
import pytest
import pytest_asyncio
from google import genai
from google.genai import types as gtypes

from atlas.local.stack import Stack
from tests.e2e.conftest import ADMIN_TOKEN, MakeKey, running_stack
from tests.e2e.helpers import settled

Client = Callable[[str], openai.AsyncOpenAI]

#: Prompts of each text class (the estimate's hard cases: chars / 4 was -33% .. -78%).
PROMPTS = {
    "english": "Explain, in plain words, why the sky looks blue on a clear afternoon "
    "and red at sunset. Mention Rayleigh scattering and the length of the light's path. " * 4,
    "french": "Expliquez pourquoi le ciel paraît bleu l'après-midi et rouge au coucher du "
    "soleil ; évoquez la diffusion de Rayleigh et la longueur du trajet de la lumière. " * 4,
    "code": "def merge(a: list[int], b: list[int]) -> list[int]:\n    out, i, j = [], 0, 0\n"
    "    while i < len(a) and j < len(b):\n        if a[i] <= b[j]:\n            out.append(a[i]);"
    " i += 1\n        else:\n            out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]\n"
    * 3,
    "chinese": "请用简单的话解释为什么晴朗的下午天空是蓝色的，而日落时是红色的。"
    "请提到瑞利散射以及光线经过大气的路径长度。" * 4,
    "emoji": "Great job team 🎉🚀! Next sprint: fix the login bug 🐛, ship dark mode 🌙 "
    "and celebrate 🍕🍻. Café meeting at 10 — naïve résumé review 📄✅. " * 3,
}
#: The completion text classes of the demo upstream (x-demo-text).
COMPLETION_TEXT = {"english": "prose", "french": "prose", "code": "code", "chinese": "cjk"}


async def hours(admin: httpx.AsyncClient, key_id: str) -> dict[str, int]:
    """The key's settled prompt/completion/cached/... summed over its last two hours."""
    r = await admin.get(f"/v1/admin/keys/{key_id}/history?hours=2")
    assert r.status_code == 200, r.text
    out: dict[str, int] = {}
    for h in r.json()["hours"]:
        for f in ("prompt", "completion", "cached", "cache_write", "reasoning", "estimated"):
            out[f] = out.get(f, 0) + h[f]
    return out


async def charged(admin: httpx.AsyncClient, key_id: str, want_requests: int = 1) -> dict[str, int]:
    """History once the key's settlements landed (extproc writes history in batches)."""
    await settled(admin, key_id)
    deadline = time.monotonic() + 10
    while True:
        h = await hours(admin, key_id)
        r = await admin.get(f"/v1/admin/keys/{key_id}/history?hours=2")
        if sum(x["requests"] for x in r.json()["hours"]) >= want_requests and (
            h["prompt"] or h["completion"]
        ):
            return h
        assert time.monotonic() < deadline, h
        await asyncio.sleep(0.05)


@pytest_asyncio.fixture(loop_scope="session")
async def anthropic_for(stack: Stack) -> AsyncIterator[Callable[[str], anthropic.AsyncAnthropic]]:
    made: list[anthropic.AsyncAnthropic] = []

    def make(api_key: str) -> anthropic.AsyncAnthropic:
        c = anthropic.AsyncAnthropic(
            base_url=stack.proxy_url, api_key=api_key, max_retries=0, timeout=30
        )
        made.append(c)
        return c

    yield make
    for c in made:
        await c.close()


def gemini_for(stack: Stack, api_key: str) -> genai.Client:
    return genai.Client(
        api_key=api_key,
        http_options=gtypes.HttpOptions(base_url=stack.proxy_url, api_version="v1beta"),
    )


# ---- exact charges from usage, every API -----------------------------------------------


async def test_openai_apis_are_charged_exactly_their_usage(
    make_key: MakeKey, client_for: Client, admin: httpx.AsyncClient
) -> None:
    prompt = PROMPTS["chinese"]
    key = await make_key()
    c = client_for(key["api_key"])
    cached = {"x-demo-cached-tokens": "20", "x-demo-reasoning-tokens": "7"}
    chat = await c.chat.completions.create(
        model="demo-small",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=30,
        extra_headers=cached,
    )
    assert chat.usage is not None
    want = {"prompt": chat.usage.prompt_tokens, "completion": chat.usage.completion_tokens}
    h = await charged(admin, key["id"])
    assert (h["prompt"], h["completion"], h["cached"], h["reasoning"], h["estimated"]) == (
        want["prompt"],
        want["completion"],
        20,
        7,
        0,
    )

    for call in ("stream", "completions", "embeddings", "responses"):
        key = await make_key()
        c = client_for(key["api_key"])
        if call == "stream":
            s = await c.chat.completions.create(
                model="demo-small",
                messages=[{"role": "user", "content": prompt}],
                max_tokens=25,
                stream=True,
                stream_options={"include_usage": True},
            )
            usage = [x.usage async for x in s if x.usage is not None][-1]
            total = usage.prompt_tokens + usage.completion_tokens
        elif call == "completions":
            r = await c.completions.create(model="demo-small", prompt=prompt, max_tokens=12)
            assert r.usage is not None
            total = r.usage.total_tokens
        elif call == "embeddings":
            e = await c.embeddings.create(model="demo-embed", input=[prompt, "短"])
            total = e.usage.total_tokens
        else:
            rr = await c.responses.create(
                model="demo-small", input=prompt, instructions="简洁", max_output_tokens=20
            )
            assert rr.usage is not None
            total = rr.usage.total_tokens
        u = await settled(admin, key["id"])
        assert u["daily"]["used"] == total, call
        assert (await charged(admin, key["id"]))["estimated"] == 0, call


async def test_anthropic_messages_are_charged_exactly_with_the_cache(
    make_key: MakeKey,
    anthropic_for: Callable[[str], anthropic.AsyncAnthropic],
    admin: httpx.AsyncClient,
    stack: Stack,
) -> None:
    hooks = {"x-demo-cached-tokens": "30", "x-demo-cache-write-tokens": "12"}
    for stream in (False, True):
        key = await make_key()
        c = anthropic_for(key["api_key"])
        args: dict[str, Any] = {
            "model": "claude-demo",
            "max_tokens": 40,
            "system": "You are terse.",
            "messages": [{"role": "user", "content": PROMPTS["french"]}],
            "extra_headers": hooks,
        }
        if stream:
            async with c.messages.stream(**args) as s:
                async for _ in s.text_stream:
                    pass
                msg = await s.get_final_message()
        else:
            msg = await c.messages.create(**args)
        usage = msg.usage
        prompt = (
            usage.input_tokens
            + (usage.cache_read_input_tokens or 0)
            + (usage.cache_creation_input_tokens or 0)
        )
        assert (usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (30, 12)
        h = await charged(admin, key["id"])
        assert (h["prompt"], h["completion"], h["cached"], h["cache_write"], h["estimated"]) == (
            prompt,
            usage.output_tokens,
            30,
            12,
            0,
        ), stream
    # The client's key never reaches the upstream in any of its spellings.
    async with httpx.AsyncClient() as raw:
        seen = (await raw.get(f"{stack.upstream_url}/demo/requests")).json()
    messages = [r for r in seen if r["path"] == "/v1/messages"]
    assert messages and all("x-api-key" not in r["headers"] for r in messages)


async def test_gemini_is_charged_exactly_with_thoughts_and_cache(
    make_key: MakeKey, admin: httpx.AsyncClient, stack: Stack
) -> None:
    hooks = {"x-demo-cached-tokens": "9", "x-demo-reasoning-tokens": "11"}
    for stream in (False, True):
        key = await make_key()
        client = gemini_for(stack, key["api_key"])
        config = gtypes.GenerateContentConfig(
            max_output_tokens=24,
            system_instruction="Be concise.",
            http_options=gtypes.HttpOptions(headers=hooks),
        )
        contents = PROMPTS["code"]
        if stream:
            last = None
            async for chunk in await client.aio.models.generate_content_stream(
                model="gemini-demo", contents=contents, config=config
            ):
                last = chunk
            assert last is not None
            meta = last.usage_metadata
        else:
            r = await client.aio.models.generate_content(
                model="gemini-demo", contents=contents, config=config
            )
            meta = r.usage_metadata
        assert meta is not None and meta.thoughts_token_count == 11
        h = await charged(admin, key["id"])
        assert (h["prompt"], h["completion"], h["cached"], h["reasoning"], h["estimated"]) == (
            meta.prompt_token_count,
            (meta.candidates_token_count or 0) + 11,
            9,
            11,
            0,
        ), stream
        u = await settled(admin, key["id"])
        assert u["daily"]["used"] == meta.total_token_count
    async with httpx.AsyncClient() as raw:
        seen = (await raw.get(f"{stack.upstream_url}/demo/requests")).json()
    gemini = [r for r in seen if ":generateContent" in r["path"] or "Content" in r["path"]]
    assert gemini and all("x-goog-api-key" not in r["headers"] for r in gemini)


# ---- estimates when the upstream reports nothing -----------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def read_bodies() -> AsyncIterator[Stack]:
    """A stack whose extproc reads every answer (ATLAS_SETTLE_FROM_ACCESS_LOG=false), as it
    must for upstreams that may answer without usage: Envoy's access log carries a body's
    size, not its text."""
    async with running_stack(settle_from_access_log=False) as st:
        yield st


@pytest.mark.parametrize("text_class", sorted(PROMPTS))
async def test_estimates_without_usage_are_within_10_percent(
    text_class: str, read_bodies: Stack
) -> None:
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": PROMPTS[text_class]},
    ]
    text = {"x-demo-text": COMPLETION_TEXT.get(text_class, "prose")}
    async with httpx.AsyncClient(
        base_url=read_bodies.admin_url,
        headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
        timeout=10,
    ) as admin:

        async def new_key() -> dict[str, Any]:
            r = await admin.post(
                "/v1/admin/keys", json={"name": "est", "rate_per_sec": 100, "burst": 100}
            )
            assert r.status_code == 201, r.text
            return dict(r.json())

        for stream in (False, True):
            truth_key, blind_key = await new_key(), await new_key()
            for key, hooks in ((truth_key, text), (blind_key, {**text, "x-demo-no-usage": "1"})):
                async with openai.AsyncOpenAI(
                    base_url=read_bodies.proxy_url + "/v1", api_key=key["api_key"], max_retries=0
                ) as c:
                    if stream:
                        s = await c.chat.completions.create(
                            model="demo-small",
                            messages=messages,
                            max_tokens=60,
                            stream=True,
                            extra_headers=hooks,
                        )
                        async for _ in s:
                            pass
                    else:
                        await c.chat.completions.create(
                            model="demo-small",
                            messages=messages,
                            max_tokens=60,
                            extra_headers=hooks,
                        )
            truth = await charged(admin, truth_key["id"])
            blind = await charged(admin, blind_key["id"])
            assert truth["estimated"] == 0 and blind["estimated"] == 1
            for part in ("prompt", "completion"):
                assert abs(blind[part] - truth[part]) <= 0.10 * truth[part], (
                    text_class,
                    stream,
                    part,
                    blind,
                    truth,
                )


async def test_an_answer_without_usage_on_the_access_log_is_charged_at_least_its_size(
    make_key: MakeKey, client_for: Client, admin: httpx.AsyncClient
) -> None:
    """Settled from Envoy's access log, an answer without usage has only its size to go by:
    a quarter of its bytes, never less than the truth for text of 4+ bytes a token."""
    truth_key, blind_key = await make_key(), await make_key()
    for key, hooks in ((truth_key, {}), (blind_key, {"x-demo-no-usage": "1"})):
        await client_for(key["api_key"]).chat.completions.create(
            model="demo-small",
            messages=[{"role": "user", "content": PROMPTS["english"]}],
            max_tokens=60,
            extra_headers={"x-demo-text": "prose", **hooks},
        )
    truth, blind = await charged(admin, truth_key["id"]), await charged(admin, blind_key["id"])
    assert blind["estimated"] == 1 and blind["prompt"] == truth["prompt"]
    assert truth["completion"] <= blind["completion"] <= 4 * truth["completion"]


async def test_cjk_prompt_is_refused_by_its_true_size(
    make_key: MakeKey, client_for: Client, admin: httpx.AsyncClient
) -> None:
    prompt = PROMPTS["chinese"] * 3  # ~450 cl100k tokens in ~270 characters
    probe = await make_key()
    await client_for(probe["api_key"]).chat.completions.create(
        model="demo-small", messages=[{"role": "user", "content": prompt}], max_tokens=1
    )
    true_prompt = (await charged(admin, probe["id"]))["prompt"]
    assert true_prompt > len(prompt)  # more tokens than characters: chars / 4 saw a quarter
    # A quota the prompt fits by its characters but not by its tokens.
    key = await make_key(daily_limit=true_prompt - 50)
    with pytest.raises(openai.RateLimitError) as err:
        await client_for(key["api_key"]).chat.completions.create(
            model="demo-small", messages=[{"role": "user", "content": prompt}], max_tokens=10
        )
    assert err.value.code == "insufficient_quota"
    assert (await settled(admin, key["id"]))["daily"]["used"] == 0


async def test_hang_up_mid_stream_is_charged_what_the_upstream_processed(
    make_key: MakeKey, client_for: Client, admin: httpx.AsyncClient
) -> None:
    messages = [{"role": "user", "content": PROMPTS["chinese"]}]
    probe = await make_key()
    await client_for(probe["api_key"]).chat.completions.create(
        model="demo-small", messages=messages, max_tokens=1
    )
    true_prompt = (await charged(admin, probe["id"]))["prompt"]
    key = await make_key()
    s = await client_for(key["api_key"]).chat.completions.create(
        model="demo-small",
        messages=messages,
        max_tokens=400,
        stream=True,
        extra_headers={"x-demo-chunk-delay-ms": "5", "x-demo-text": "cjk"},
    )
    received = 0
    async for chunk in s:
        if chunk.choices and chunk.choices[0].delta.content:
            received += 1
            if received == 30:
                break
    await s.close()
    h = await charged(admin, key["id"])
    processed = true_prompt + received
    assert h["prompt"] + h["completion"] >= 0.95 * processed, (h, processed)
    assert h["completion"] < 400 and abs(h["prompt"] - true_prompt) <= 0.10 * true_prompt


async def test_continuous_usage_charges_a_hang_up_exactly_and_only_where_asked() -> None:
    async with (
        running_stack(continuous_usage_models=["vllm-*"]) as st,
        httpx.AsyncClient(
            base_url=st.admin_url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
        ) as admin,
    ):
        r = await admin.post(
            "/v1/admin/keys", json={"name": "c", "rate_per_sec": 100, "burst": 100}
        )
        key = r.json()
        client = openai.AsyncOpenAI(
            base_url=st.proxy_url + "/v1", api_key=key["api_key"], max_retries=0
        )
        # The strict upstream (OpenAI's own rules) never sees the vLLM-only field.
        strict = {"x-demo-strict": "1"}
        s = await client.chat.completions.create(
            model="gpt-demo",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            stream=True,
            extra_headers=strict,
        )
        assert len([c async for c in s if c.choices and c.choices[0].delta.content]) == 5
        s = await client.chat.completions.create(
            model="vllm-llama",
            messages=[{"role": "user", "content": PROMPTS["english"]}],
            max_tokens=300,
            stream=True,
            extra_headers={"x-demo-chunk-delay-ms": "5"},
        )
        got = 0
        async for chunk in s:
            if chunk.choices and chunk.choices[0].delta.content:
                got += 1
                if got == 20:
                    break
        await s.close()
        h = await charged(admin, key["id"], want_requests=2)
        async with httpx.AsyncClient() as raw:
            seen = (await raw.get(f"{st.upstream_url}/demo/requests")).json()
        await client.close()
    bodies = {r["body"]["model"]: r["body"] for r in seen if isinstance(r["body"], dict)}
    assert "continuous_usage_stats" not in bodies["gpt-demo"].get("stream_options", {})
    assert bodies["vllm-llama"]["stream_options"]["continuous_usage_stats"] is True
    # Both settled from usage (none estimated); the cut stream from its last chunk's usage.
    assert h["estimated"] == 0
    assert 5 + 20 <= h["completion"] < 5 + 300
