"""Prompt estimates with the chat format (atlas.tokens.chat) against the real tokenizer."""

from __future__ import annotations

import base64
import struct
import zlib
from typing import Any

import pytest

from atlas import tokens
from atlas.tokens import TextTokens
from atlas.tokens.bpe import load_encoding
from atlas.tokens.chat import (
    IMAGE_DEFAULT,
    IMAGE_LOW,
    image_size,
    openai_image_tokens,
    prompt_tokens,
)

ENC = load_encoding()
assert ENC is not None, "the packaged cl100k_base file must load offline"
TEXT = TextTokens(ENC)


def n(text: str) -> int:
    return len(ENC.encode_ordinary(text))


def est(body: dict[str, Any]) -> int:
    return prompt_tokens(body, TEXT)[0]


def png(w: int, h: int) -> str:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = (
        struct.pack(">I", len(ihdr))
        + b"IHDR"
        + ihdr
        + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    )
    return (
        "data:image/png;base64,"
        + base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk + b"\0" * 64).decode()
    )


def jpeg(w: int, h: int) -> str:
    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\0\x01\x01\0\0\x01\0\x01\0\0"
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, h, w, 1) + b"\x01\x11\x00"
    return (
        "data:image/jpeg;base64," + base64.b64encode(b"\xff\xd8" + app0 + sof + b"\0" * 32).decode()
    )


def test_chat_messages_follow_openais_count() -> None:
    msgs = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "我们今天去公园散步，天气非常好。", "name": "lin"},
    ]
    want = sum(3 + n(m["role"]) + n(m["content"]) for m in msgs) + (n("lin") + 1) + 3
    assert est({"messages": msgs}) == want


def test_tool_calls_tools_and_schemas_are_counted() -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
    }
    body = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "18C, sunny"},
        ],
        "tools": tools,
    }
    base = est({"messages": body["messages"]})
    assert base > est({"messages": body["messages"][:1]}) + n('{"city":"Paris"}')
    with_tools = est(body)
    assert with_tools - base >= n("get_weather") + n("Weather for a city") + 8
    schema = {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "object"}}}
    assert est({**body, "response_format": schema}) > with_tools


def test_images_follow_the_tile_rule() -> None:
    assert openai_image_tokens("low", (4096, 4096)) == IMAGE_LOW
    assert openai_image_tokens("high", (1024, 1024)) == 765  # 768x768: 4 tiles
    assert openai_image_tokens("auto", (2048, 4096)) == 85 + 170 * 6  # 768x1536: 2x3
    assert openai_image_tokens(None, None) == IMAGE_DEFAULT
    assert image_size(png(640, 480)) == (640, 480)
    assert image_size(jpeg(800, 600)) == (800, 600)
    assert image_size("https://example.com/cat.png") is None
    assert image_size("data:image/png;base64,!!!!") is None

    def one(url: str, detail: str | None = None) -> int:
        part: dict[str, Any] = {"url": url} if detail is None else {"url": url, "detail": detail}
        return est(
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": part}]}]}
        )

    frame = 3 + n("user") + 3
    assert one(png(512, 512)) == frame + 85 + 170
    assert one(png(512, 512), "low") == frame + 85
    assert one("https://example.com/cat.png") == frame + IMAGE_DEFAULT


def test_anthropic_and_gemini_bodies() -> None:
    anthropic = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "system": [{"type": "text", "text": "Answer briefly."}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Bonjour, ça va ?"}]},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"a": 1}}],
            },
        ],
    }
    got = est(anthropic)
    assert got >= n("Answer briefly.") + n("Bonjour, ça va ?") + n('{"a":1}') + 3 * 3 + 3
    gemini = {
        "contents": [{"role": "user", "parts": [{"text": "Explain quantum tunnelling."}]}],
        "systemInstruction": {"parts": [{"text": "Be concise."}]},
        "generationConfig": {"maxOutputTokens": 64},
    }
    # Gemini reports no per-turn frame: the text of its parts
    assert est(gemini) == n("Explain quantum tunnelling.") + n("Be concise.")


def test_completions_embeddings_and_ids() -> None:
    assert est({"prompt": "def f(x):\n    return x * 2\n"}) == n("def f(x):\n    return x * 2\n")
    assert est({"input": ["héllo wörld", "日本語のテキスト"]}) == n("héllo wörld") + n(
        "日本語のテキスト"
    )
    assert est({"prompt": [[1, 2, 3], [4]]}) == 4


def test_the_exact_budget_is_per_body_then_the_fallback() -> None:
    small = TextTokens(ENC, max_exact_chars=10)
    text = "word " * 100
    got, whole = prompt_tokens({"input": [text, text]}, small)
    assert whole and got == 2 * tokens.fallback.count(text)


@pytest.mark.parametrize(
    "body",
    [
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}
            ]
        },
        {"messages": [{"content": {"type": "image", "source": {"data": 7}}}]},
        {"messages": [{"role": 5, "content": [None, 3, {"text": 9}, {"type": "input_audio"}]}]},
        {"contents": {"parts": "x"}, "systemInstruction": "y", "tools": {"a": 1}},
        {"messages": [[[[[[[[[[[[["deep"]]]]]]]]]]]]]},
        {"response_format": {"json_schema": {"a": [[[[[[[[[[[[1]]]]]]]]]]]]}}},
    ],
)
def test_hostile_shapes_never_raise(body: dict[str, Any]) -> None:
    tokens_n, _ = prompt_tokens(body, TEXT)
    assert tokens_n >= 0
