"""The demo upstream's runtime modes (``/demo/mode``) over real sockets: a provider that fails,
pool keys that get 429s or 401s, and the ``x-demo-provider`` header."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from atlas.local.demo import DemoUpstream, Failure, Mode, main

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
MESSAGES_BODY = {"model": "c", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
GEMINI = "/v1beta/models/g:generateContent"
GEMINI_BODY = {"contents": [{"parts": [{"text": "hi"}]}]}
NORMAL: dict[str, Any] = {"fail_status": None, "fail_retry_after": None, "credentials": {}}


@pytest.fixture
async def upstream() -> AsyncIterator[DemoUpstream]:
    async with DemoUpstream("127.0.0.1", 0, name="openai-b") as server:
        yield server


@pytest.fixture
async def http(upstream: DemoUpstream) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=upstream.url, timeout=10) as client:
        yield client


async def put_mode(http: httpx.AsyncClient, mode: dict[str, Any]) -> dict[str, Any]:
    r = await http.put("/demo/mode", json=mode)
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


async def test_mode_round_trip_and_reset(http: httpx.AsyncClient, upstream: DemoUpstream) -> None:
    assert (await http.get("/demo/mode")).json() == NORMAL
    mode = {
        "fail_status": 503,
        "fail_retry_after": 7,
        "credentials": {"sk-a": {"status": 429, "retry_after": 2}, "sk-b": {"status": 401}},
    }
    expected = {
        **mode,
        "credentials": {
            "sk-a": {"status": 429, "retry_after": 2},
            "sk-b": {"status": 401, "retry_after": None},
        },
    }
    assert await put_mode(http, mode) == expected
    assert (await http.get("/demo/mode")).json() == expected
    assert upstream.mode.fail == Failure(503, 7)

    # PUT replaces the whole mode: keys left out are back to normal.
    assert await put_mode(http, {"fail_status": 500}) == {**NORMAL, "fail_status": 500}

    r = await http.delete("/demo/mode")
    assert r.status_code == 200
    assert r.json() == NORMAL
    assert (await http.get("/demo/mode")).json() == NORMAL
    assert (await http.post(CHAT, json=CHAT_BODY)).status_code == 200
    assert (await http.post("/demo/mode")).status_code == 405


async def test_credential_429_with_retry_after(http: httpx.AsyncClient) -> None:
    await put_mode(
        http,
        {"credentials": {"sk-hot": {"status": 429, "retry_after": 3}, "ant-hot": {"status": 429}}},
    )
    r = await http.post(CHAT, json=CHAT_BODY, headers=bearer("sk-hot"))
    assert r.status_code == 429
    assert r.headers["retry-after"] == "3"
    error = r.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "requests",
        "rate_limit_exceeded",
        None,
    )
    assert "try again in 3s" in error["message"]

    # Anthropic's x-api-key, answered in Anthropic's shape; no retry_after, no header.
    r = await http.post("/v1/messages", json=MESSAGES_BODY, headers={"x-api-key": "ant-hot"})
    assert r.status_code == 429
    assert "retry-after" not in r.headers
    assert r.json()["error"]["type"] == "rate_limit_error"

    # Other keys of the same pool, and requests with no key, are served.
    for headers in (bearer("sk-cold"), {"x-api-key": "ant-cold"}, {}):
        r = await http.post(CHAT, json=CHAT_BODY, headers=headers)
        assert r.status_code == 200, headers
        assert "retry-after" not in r.headers


async def test_credential_modes_per_dialect(http: httpx.AsyncClient) -> None:
    await put_mode(
        http,
        {
            "credentials": {
                "sk-revoked": {"status": 401},
                "goog-hot": {"status": 429, "retry_after": 0},
                "ant-x": {"status": 429, "retry_after": 60},
            }
        },
    )
    r = await http.post(CHAT, json=CHAT_BODY, headers=bearer("sk-revoked"))
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"

    r = await http.post(GEMINI, json=GEMINI_BODY, headers={"x-goog-api-key": "goog-hot"})
    assert r.status_code == 429
    assert r.headers["retry-after"] == "0"
    assert r.json()["error"]["status"] == "RESOURCE_EXHAUSTED"

    # The credential wins whichever header carries it, even on a GET.
    r = await http.get("/v1/models", headers={"x-api-key": "ant-x"})
    assert (r.status_code, r.headers["retry-after"]) == (429, "60")


async def test_fail_status_and_precedence(http: httpx.AsyncClient) -> None:
    await put_mode(
        http,
        {
            "fail_status": 503,
            "fail_retry_after": 5,
            "credentials": {"sk-hot": {"status": 429, "retry_after": 1}},
        },
    )
    r = await http.post(CHAT, json=CHAT_BODY, headers=bearer("sk-other"))
    assert (r.status_code, r.headers["retry-after"]) == (503, "5")
    assert r.json()["error"]["type"] == "server_error"
    r = await http.post(GEMINI, json=GEMINI_BODY)
    assert r.status_code == 503
    assert r.json()["error"]["status"] == "UNAVAILABLE"

    # A listed credential wins over fail_status; x-demo-status wins over both.
    r = await http.post(CHAT, json=CHAT_BODY, headers=bearer("sk-hot"))
    assert (r.status_code, r.headers["retry-after"]) == (429, "1")
    r = await http.post(CHAT, json=CHAT_BODY, headers={**bearer("sk-hot"), "x-demo-status": "502"})
    assert r.status_code == 502
    assert "retry-after" not in r.headers

    # The controls and /health never fail; failed requests are still recorded.
    assert (await http.get("/health")).status_code == 200
    seen = (await http.get("/demo/requests")).json()
    assert [s["headers"].get("authorization") for s in seen] == [
        "Bearer sk-other",
        None,
        "Bearer sk-hot",
        "Bearer sk-hot",
    ]


async def test_constructor_fail_status_is_the_initial_mode() -> None:
    async with (
        DemoUpstream("127.0.0.1", 0, fail_status=500) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as http,
    ):
        assert (await http.get("/demo/mode")).json() == {**NORMAL, "fail_status": 500}
        assert (await http.post(CHAT, json=CHAT_BODY)).status_code == 500
        await http.delete("/demo/mode")
        assert (await http.post(CHAT, json=CHAT_BODY)).status_code == 200
        # In-process tests can set the mode directly.
        server.mode = Mode(credentials={"k": Failure(429, 9)})
        r = await http.post(CHAT, json=CHAT_BODY, headers=bearer("k"))
        assert (r.status_code, r.headers["retry-after"]) == (429, "9")


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"not json", "must be JSON"),
        (b"[" * 100_000, "at most"),
        (b"[" * 30_000, "must be JSON"),
        (b"[]", "JSON object"),
        (b'{"fail_status": 200}', "fail_status must be an integer 400..599"),
        (b'{"fail_status": "503"}', "fail_status"),
        (b'{"fail_status": true}', "fail_status"),
        (b'{"fail_retry_after": 5}', "needs fail_status"),
        (b'{"fail_status": 503, "fail_retry_after": 3601}', "fail_retry_after"),
        (b'{"fail_status": 503, "fail_retry_after": 1.5}', "fail_retry_after"),
        (b'{"fail": 503}', "unknown key(s) fail"),
        (b'{"credentials": []}', "credentials must be an object"),
        (b'{"credentials": {"k": 429}}', "must be an object"),
        (b'{"credentials": {"k": {}}}', ".status must be an integer"),
        (b'{"credentials": {"k": {"status": 429, "retry_after": -1}}}', "retry_after"),
        (b'{"credentials": {"k": {"status": 429, "wait": 1}}}', "unknown key(s) wait"),
        (b'{"credentials": {"": {"status": 429}}}', "credential secrets"),
        (b'{"credentials": {"a b": {"status": 429}}}', "credential secrets"),
        (b'{"credentials": {"' + b"k" * 257 + b'": {"status": 429}}}', "credential secrets"),
    ],
)
async def test_bad_mode_is_a_400(http: httpx.AsyncClient, body: bytes, fragment: str) -> None:
    await put_mode(http, {"fail_status": 500})
    r = await http.put("/demo/mode", content=body)
    assert r.status_code == 400
    assert fragment in r.json()["error"]["message"]
    # A refused PUT leaves the mode as it was.
    assert (await http.get("/demo/mode")).json()["fail_status"] == 500


async def test_credential_limit(http: httpx.AsyncClient) -> None:
    many = {f"k{i}": {"status": 429} for i in range(64)}
    assert len((await put_mode(http, {"credentials": many}))["credentials"]) == 64
    many["k64"] = {"status": 429}
    r = await http.put("/demo/mode", json={"credentials": many})
    assert r.status_code == 400
    assert "at most 64" in r.json()["error"]["message"]


async def test_provider_header(http: httpx.AsyncClient) -> None:
    r = await http.post(CHAT, json=CHAT_BODY)
    assert r.headers["x-demo-provider"] == "openai-b"
    r = await http.post(CHAT, json={**CHAT_BODY, "stream": True})
    assert r.headers["x-demo-provider"] == "openai-b"
    assert r.text.endswith("data: [DONE]\n\n")
    r = await http.get("/v1/models/x")
    assert r.headers["x-demo-provider"] == "openai-b"
    r = await http.get(CHAT)
    assert (r.status_code, r.headers["x-demo-provider"]) == (405, "openai-b")
    await put_mode(http, {"credentials": {"k": {"status": 429, "retry_after": 1}}})
    r = await http.post(CHAT, json=CHAT_BODY, headers=bearer("k"))
    assert (r.status_code, r.headers["x-demo-provider"]) == (429, "openai-b")
    assert "x-demo-provider" not in (await http.get("/health")).headers


async def test_no_name_no_provider_header() -> None:
    async with (
        DemoUpstream("127.0.0.1", 0) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as http,
    ):
        r = await http.post(CHAT, json=CHAT_BODY)
        assert r.status_code == 200
        assert "x-demo-provider" not in r.headers


def test_bad_names_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="name"):
        DemoUpstream(name="bad name\r\nx-evil: 1")
    with pytest.raises(SystemExit):
        main(["--name", "bad name"])
    assert "--name" in capsys.readouterr().err


async def test_cli_name_and_fail_status() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "atlas.local.demo", "--port", "0", "--name", "anthropic-a",
        "--fail-status", "529",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.endswith(" as anthropic-a\n"), line
        url = line.split()[3]
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            r = await http.post("/v1/messages", json=MESSAGES_BODY)
            assert (r.status_code, r.headers["x-demo-provider"]) == (529, "anthropic-a")
            assert r.json()["error"]["type"] == "overloaded_error"
            await http.delete("/demo/mode")
            assert (await http.post("/v1/messages", json=MESSAGES_BODY)).status_code == 200
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
