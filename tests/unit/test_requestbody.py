from __future__ import annotations

import json

from atlas.requestbody import estimate_prompt_tokens, parse_llm_request


def test_chat_request() -> None:
    body = json.dumps(
        {
            "model": "m",
            "stream": True,
            "max_tokens": 50,
            "n": 2,
            "messages": [
                {"role": "user", "content": "x" * 40},
                {"role": "user", "content": [{"type": "text", "text": "y" * 8}]},
            ],
        }
    ).encode()
    r = parse_llm_request(body)
    assert r.parsed and r.model == "m" and r.stream and not r.include_usage
    assert r.max_tokens == 50 and r.n == 2
    assert r.prompt_tokens == 12


def test_max_completion_tokens_and_include_usage() -> None:
    r = parse_llm_request(
        json.dumps(
            {
                "model": "m",
                "max_completion_tokens": 9,
                "stream": True,
                "stream_options": {"include_usage": True},
                "prompt": "abcd",
            }
        ).encode()
    )
    assert r.max_tokens == 9 and r.include_usage and r.prompt_tokens == 1


def test_hostile_bodies_never_raise() -> None:
    for body in (
        b"",
        b"\xff\xfe",
        b"[1,2]",
        b"{",
        b'{"max_tokens": true, "n": -3}',
        b"[" * 100_000,
        b'{"messages": 5, "model": 7}',
    ):
        r = parse_llm_request(body)
        assert r.max_tokens is None and r.n >= 1 and r.prompt_tokens >= 0


def test_partial_body_is_estimated_from_size() -> None:
    head = b'{"model": "m", "messages": [' + b"a" * 400
    r = parse_llm_request(head, complete=False)
    assert not r.parsed and r.prompt_tokens == 107
    assert parse_llm_request(head, complete=False, size=4000).prompt_tokens == 1000


def test_estimate_embeddings_and_responses() -> None:
    assert estimate_prompt_tokens({"input": ["abcd", "efgh"]}) == 2
    assert estimate_prompt_tokens({"input": [1, 2, 3]}) == 3
    assert estimate_prompt_tokens({"input": "abcdefgh", "instructions": "abcd"}) == 3
    assert estimate_prompt_tokens({}) == 0
