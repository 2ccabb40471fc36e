"""Slow streams hung up at every point of their pauses: Envoy survives and every one settles.

Envoy 1.40 segfaulted when a client gave up during a long pause between SSE chunks while
`ext_proc_graceful_grpc_close` was on (the half-closed ext_proc stream outlived its filter;
extproc's clean close then ran callbacks on freed memory). These streams pause 1-3 s between
events and are hung up (FIN or RST) before the response headers, right after a chunk, at
several points of a pause, after the last content chunk and after the whole answer, all at
once, so the test stays short. See docs/envoy-notes.md.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio

from atlas.local.stack import Stack
from atlas.requestbody import estimate_prompt_tokens
from tests.e2e.conftest import ADMIN_TOKEN, running_stack
from tests.e2e.helpers import settled

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

PROMPT = "Tell me about foxes."
COMPLETION_TOKENS = 3
#: A content delta of the demo upstream (its role chunk is `{"role":...,"content":""}`).
CONTENT = b'"delta":{"content":'


@dataclass(frozen=True)
class HangUp:
    """Hang up once `after_chunks` content chunks arrived, `pause` of the way into the pause
    that follows; `after_chunks=None` hangs up as soon as the request is written."""

    delay_ms: int
    after_chunks: int | None
    pause: float
    rst: bool
    whole: bool = False  # read the whole answer first (control: exact usage)
    tokens: int = COMPLETION_TOKENS

    @property
    def label(self) -> str:
        when = "before-headers" if self.after_chunks is None else f"chunk{self.after_chunks}"
        if self.whole:
            when = "whole-answer"
        return f"{self.delay_ms}ms-{when}-{self.pause:.2f}-{'rst' if self.rst else 'fin'}"


def cases() -> list[HangUp]:
    out = [HangUp(1500, None, 0.0, rst) for rst in (False, True)]
    for after, pause, rst in itertools.product(
        range(COMPLETION_TOKENS + 1), (0.0, 0.25, 0.5, 0.75), (False, True)
    ):
        out.append(HangUp(1500, after, pause, rst))
    # Longer pauses, hung up in them (the last content chunk's pause included).
    out += [HangUp(3000, after, 0.5, True) for after in (1, COMPLETION_TOKENS)]
    out += [HangUp(1000, COMPLETION_TOKENS, 0.5, False), HangUp(1000, 0, 0.0, False, True)]
    return out


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def slow_stack() -> AsyncIterator[Stack]:
    """A stack of its own: if Envoy dies here, no other test's stack goes with it."""
    async with running_stack() as stack:
        yield stack


def _body(case: HangUp) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": case.tokens,
        "stream": True,
    }


def _request(api_key: str, case: HangUp) -> bytes:
    body = json.dumps(_body(case)).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nhost: atlas\r\n"
        f"authorization: Bearer {api_key}\r\ncontent-type: application/json\r\n"
        f"x-demo-chunk-delay-ms: {case.delay_ms}\r\nx-test-case: {case.label}\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _hang_up(port: int, api_key: str, case: HangUp) -> int:
    """Run one case; return the content chunks that reached the client."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    buf = b""
    try:
        writer.write(_request(api_key, case))
        await writer.drain()
        if case.after_chunks is None:
            return 0
        while b"\r\n\r\n" not in buf or buf.count(CONTENT) < case.after_chunks:
            if case.whole and buf.endswith(b"0\r\n\r\n"):
                break
            data = await reader.read(65536)
            assert data, f"{case.label}: stream ended early: {buf!r}"
            buf += data
        if case.whole:
            while not buf.endswith(b"0\r\n\r\n"):
                data = await reader.read(65536)
                assert data, f"{case.label}: stream ended early: {buf!r}"
                buf += data
        assert buf.startswith(b"HTTP/1.1 200"), buf[:200]
        await asyncio.sleep(case.pause * case.delay_ms / 1000)
        return buf.count(CONTENT)
    finally:
        if case.rst:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        else:
            writer.close()


async def _reached_upstream(stack: Stack) -> set[str]:
    async with httpx.AsyncClient(timeout=5) as c:
        r = await c.get(stack.upstream_url + "/demo/requests")
    seen: list[dict[str, Any]] = r.json()  # the last 50: more than these cases
    return {req["headers"].get("x-test-case", "") for req in seen}


async def test_hang_ups_during_slow_streams_never_crash_envoy_and_all_settle(
    slow_stack: Stack,
) -> None:
    await _run_and_check(slow_stack, cases())


async def test_hang_up_of_a_stream_older_than_45s_never_crashes_envoy(slow_stack: Stack) -> None:
    """The crash needed an old stream: hung up 50 s in (12 s pauses, 2 s after its 4th
    chunk) it segfaulted Envoy every time with graceful close on; at 45 s it did not."""
    await _run_and_check(slow_stack, [HangUp(12000, 4, 2 / 12, False, tokens=8)])


async def _run_and_check(stack: Stack, todo: list[HangUp]) -> None:
    port = stack.settings.proxy_port
    async with httpx.AsyncClient(
        base_url=stack.admin_url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10
    ) as admin:
        r = await admin.post(
            "/v1/admin/keys", json={"name": "slow-streams", "rate_per_sec": 500, "burst": 500}
        )
        assert r.status_code == 201, r.text
        key = r.json()
        seen = await asyncio.gather(*(_hang_up(port, key["api_key"], c) for c in todo))
        reached = await _reached_upstream(stack)
        u = await settled(admin, key["id"], timeout_s=30)

        envoy = stack.children["envoy"]
        assert envoy.proc is not None and envoy.proc.returncode is None, stack.logs()
        assert not any("critical" in line for line in envoy.tail), stack.logs()
        async with httpx.AsyncClient(timeout=5) as c:
            assert (await c.get(stack.envoy_admin_url + "/ready")).status_code == 200
            assert (await c.get(stack.proxy_url + "/healthz")).status_code == 200

        # Whatever reached the upstream is charged its prompt plus the chunks that passed. A
        # hang-up leaves no usage, so the prompt is authz's estimate of the body (13 tokens with
        # cl100k, which is also what the demo upstream counts for it).
        expected = sum(
            estimate_prompt_tokens(_body(c)) + n
            for c, n in zip(todo, seen, strict=True)
            if c.label in reached
        )
        assert all(c.label in reached for c in todo if c.after_chunks is not None)
        assert u["daily"]["used"] == expected, (u, list(zip(todo, seen, strict=True)))
        assert u["daily"]["reserved"] == 0 and u["open_reservations"] == 0
