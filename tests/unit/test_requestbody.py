from __future__ import annotations

import json
import pickle

from atlas.requestbody import (
    LLMRequest,
    bytes_estimate,
    estimate_prompt_tokens,
    lax_bool,
    lax_int,
    parse_llm_request,
)


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
    # cl100k: 40 x's are 5 tokens, 8 y's 1; 3 per message and its role (1), 3 priming
    assert r.prompt_tokens == (3 + 1 + 5) + (3 + 1 + 2) + 3


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
    # cl100k: "abcd" is 1 token, "efgh" 2, "abcdefgh" 1
    assert estimate_prompt_tokens({"input": ["abcd", "efgh"]}) == 3
    assert estimate_prompt_tokens({"input": [1, 2, 3]}) == 3
    assert estimate_prompt_tokens({"input": "abcdefgh", "instructions": "abcd"}) == 2
    assert estimate_prompt_tokens({}) == 0


def test_lax_int_and_bool_read_like_vllm() -> None:
    # pydantic v2 lax mode, as vLLM's request models read JSON fields.
    for value, want in ((4096, 4096), (4096.0, 4096), ("4096", 4096), (" 7 ", 7), ("-3", -3)):
        assert lax_int(value) == want, value
    for value in (4096.5, "4096.5", "0x10", "1e3", "", None, [], {}, "9" * 100, float("inf")):
        assert lax_int(value) is None, value
    truthy = (True, 1, 1.0, "true", "TRUE", "1", "yes", "on", "t", "y", "Y", "On")
    falsy = (False, 0, 0.0, "false", "0", "no", "off", "f", "n", "OFF")
    assert all(lax_bool(v) is True for v in truthy)
    assert all(lax_bool(v) is False for v in falsy)
    for value in (2, -1, 0.5, "2", "maybe", "", " true", None, [], {}):
        assert lax_bool(value) is None, value


def test_stream_and_max_tokens_are_judged_like_vllm() -> None:
    r = parse_llm_request(b'{"model":"m","stream":1,"max_tokens":"4096","prompt":"x"}')
    assert r.stream is True and r.max_tokens == 4096 and not r.invalid
    r = parse_llm_request(b'{"stream":"on","stream_options":{"include_usage":"yes"}}')
    assert r.stream and r.include_usage
    for body, param in (
        (b'{"stream": "maybe"}', "stream"),
        (b'{"stream": 2}', "stream"),
        (b'{"max_tokens": "lots"}', "max_tokens"),
        (b'{"max_tokens": 4096.5}', "max_tokens"),
        (b'{"max_tokens": 0}', "max_tokens"),
        (b'{"max_completion_tokens": 100000000000000}', "max_completion_tokens"),
        (b'{"max_output_tokens": -1}', "max_output_tokens"),
        (b'{"n": 129}', "n"),
        (b'{"n": "two"}', "n"),
        (b'{"best_of": 1000}', "best_of"),
        (b'{"model": 7}', "model"),
        (b'{"model": "' + b"m" * 300 + b'"}', "model"),
    ):
        r = parse_llm_request(body)
        assert r.invalid and r.invalid_param == param, body
        assert r.max_tokens is None  # nothing out of bounds is ever handed on


def test_completions_count_every_prompt_and_choice() -> None:
    prompts = json.dumps(["x" * 40] * 128)
    r = parse_llm_request(f'{{"model":"m","prompt":{prompts},"n":5,"max_tokens":200}}'.encode())
    assert (r.prompts, r.n, r.choices) == (128, 5, 640)
    assert r.prompt_tokens == 128 * 5  # 40 x's are 5 cl100k tokens
    r = parse_llm_request(b'{"prompt":[[1,2,3],[4,5]],"n":2,"best_of":3,"max_tokens":10}')
    assert (r.prompts, r.choices, r.prompt_tokens) == (2, 6, 5)  # best_of >= n candidates
    assert parse_llm_request(b'{"prompt":[1,2,3],"max_tokens":1}').choices == 1  # token ids
    assert parse_llm_request(b'{"prompt":"one","max_tokens":1}').choices == 1
    many = json.dumps(["a"] * 2049)
    assert parse_llm_request(f'{{"prompt":{many}}}'.encode()).invalid_param == "prompt"
    # Each bound alone is fine; their product past MAX_RESERVATION_TOKENS is not.
    big = json.dumps(["a"] * 2048)
    r = parse_llm_request(f'{{"prompt":{big},"n":128,"max_tokens":100000000}}'.encode())
    assert r.invalid_param == "max_tokens"


def test_bodies_too_complex_to_walk_are_estimated_from_their_bytes() -> None:
    deep = b'{"messages":' + b"[" * 50 + b'"' + b"x" * 4000 + b'"' + b"]" * 50 + b"}"
    r = parse_llm_request(deep)
    assert r.parsed and r.prompt_tokens >= len(deep) // 4
    parts = json.dumps({"messages": [{"role": "user", "content": ["ab"] * 300_000}]}).encode()
    r = parse_llm_request(parts)
    assert r.prompt_tokens >= len(parts) // 4  # the walk stopped; the bytes bound holds
    for junk in (b"\xff" * 4000, b"not json " * 500, b'{"prompt": '):
        assert parse_llm_request(junk).prompt_tokens == bytes_estimate(len(junk), junk)


def test_summary_pickles_for_the_parse_pool() -> None:
    r = parse_llm_request(b'{"model":"m","prompt":["a","b"],"n":2,"max_tokens":3}')
    assert pickle.loads(pickle.dumps(r)) == r


def test_fields_are_built_in_field_order() -> None:
    """`_fields` builds its LLMRequest positionally (hot path): every field lands in its place."""
    body = {
        "model": "m",
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 7,
        "n": 2,
        "best_of": 3,
        "prompt": ["a" * 8, "b" * 4],
    }
    r = parse_llm_request(json.dumps(body).encode())
    assert r == LLMRequest(
        parsed=True,
        model="m",
        stream=True,
        include_usage=True,
        max_tokens=7,
        n=2,
        prompt_tokens=2,
        best_of=3,
        prompts=2,
    )
