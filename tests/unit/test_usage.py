"""Usage extraction and estimation: recorded streams, parsing rules, garbage tolerance."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atlas.requestbody import estimate_prompt_tokens
from extproc.json_usage import JsonBodyAccountant
from extproc.sse import Event, SSEDecoder
from extproc.stream_usage import StreamAccountant
from extproc.text import MAX_KEPT_TEXT
from extproc.usage import Endpoint, Usage, endpoint_for_path, usage_from_obj
from tests.unit.usage_helpers import usage_from_json

STREAMS_DIR = Path(__file__).resolve().parents[1] / "data" / "streams"

# No example database: it would write a .hypothesis directory into the source tree.
PROPERTY = settings(database=None, deadline=None, max_examples=200)


@dataclass(frozen=True)
class Expected:
    endpoint: Endpoint
    usage: Usage | None
    chars: int
    estimate: int
    done: bool
    usage_only: int


# Mirrors tests/data/streams/README.md.
EXPECTED: dict[str, Expected] = {
    "openai_chat_usage.sse": Expected(Endpoint.CHAT, Usage(19, 10, 29, 0, 0), 32, 9, True, 1),
    "openai_chat_no_usage.sse": Expected(Endpoint.CHAT, None, 32, 9, True, 0),
    "openai_chat_tool_calls.sse": Expected(Endpoint.CHAT, Usage(81, 15, 96), 28, 7, True, 1),
    "vllm_chat_usage_final_chunk.sse": Expected(Endpoint.CHAT, Usage(9, 12, 21), 31, 10, True, 0),
    "vllm_chat_continuous_usage.sse": Expected(Endpoint.CHAT, Usage(12, 4, 16), 13, 3, True, 1),
    "chat_crlf.sse": Expected(Endpoint.CHAT, Usage(23, 9, 32), 24, 8, True, 1),
    "chat_cr_only.sse": Expected(Endpoint.CHAT, Usage(7, 3, 10), 21, 4, True, 0),
    "chat_keepalive_comments.sse": Expected(Endpoint.CHAT, Usage(14, 6, 20), 17, 6, True, 0),
    "chat_multiline_data.sse": Expected(Endpoint.CHAT, Usage(11, 8, 19), 26, 9, True, 1),
    "chat_truncated.sse": Expected(Endpoint.CHAT, None, 14, 4, False, 0),
    "openai_completions.sse": Expected(Endpoint.COMPLETIONS, Usage(5, 16, 21), 33, 10, True, 1),
    "openai_responses.sse": Expected(Endpoint.RESPONSES, Usage(24, 8, 32, 0, 0), 20, 7, True, 0),
    "anthropic_messages.sse": Expected(
        Endpoint.MESSAGES, Usage(1233, 16, 1249, 1024, None, 188), 78, 15, True, 0
    ),
    "anthropic_messages_tool_use.sse": Expected(
        Endpoint.MESSAGES, Usage(403, 71, 474), 96, 26, True, 0
    ),
    "gemini_stream.sse": Expected(
        Endpoint.GEMINI, Usage(1043, 67, 1110, 1024, 48, None), 98, 18, True, 0
    ),
}

Outcome = tuple[Usage | None, int, int, bool, list[bytes]]


def account(endpoint: Endpoint, chunks: Iterable[bytes]) -> Outcome:
    """Decode and account a stream; the last item is the raw of every usage-only event."""
    dec = SSEDecoder()
    acc = StreamAccountant(endpoint)
    stripped: list[bytes] = []

    def observe(events: list[Event]) -> None:
        for ev in events:
            if acc.observe(ev):
                stripped.append(ev.raw)

    for chunk in chunks:
        observe(dec.feed(chunk))
    observe(dec.flush())
    return acc.usage, acc.content_chars, acc.estimated_completion_tokens, acc.saw_done, stripped


def read(name: str) -> bytes:
    return (STREAMS_DIR / name).read_bytes()


def chat_event(obj: object, event: str | None = None) -> Event:
    data = json.dumps(obj).encode()
    return Event(event, data, b"data: " + data + b"\n\n")


def raw_event(data: bytes, event: str | None = None) -> Event:
    return Event(event, data, b"data: " + data + b"\n\n")


# --- recorded streams ---------------------------------------------------------------------


def test_every_recorded_stream_has_expectations() -> None:
    assert sorted(EXPECTED) == sorted(p.name for p in STREAMS_DIR.glob("*.sse"))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recorded_stream_whole(name: str) -> None:
    exp = EXPECTED[name]
    usage, chars, estimate, done, stripped = account(exp.endpoint, [read(name)])
    assert usage == exp.usage
    assert chars == exp.chars
    assert estimate == exp.estimate
    assert done == exp.done
    assert len(stripped) == exp.usage_only


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recorded_stream_every_two_chunk_split(name: str) -> None:
    exp = EXPECTED[name]
    data = read(name)
    whole = account(exp.endpoint, [data])
    for i in range(len(data) + 1):
        assert account(exp.endpoint, [data[:i], data[i:]]) == whole, f"split at {i}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_recorded_stream_one_byte_at_a_time(name: str) -> None:
    exp = EXPECTED[name]
    data = read(name)
    chunks = [data[i : i + 1] for i in range(len(data))]
    assert account(exp.endpoint, chunks) == account(exp.endpoint, [data])


@given(data=st.data(), name=st.sampled_from(sorted(EXPECTED)))
@PROPERTY
def test_recorded_stream_random_chunkings(data: st.DataObject, name: str) -> None:
    exp = EXPECTED[name]
    stream = read(name)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=40)))
    bounds = [0, *cuts, len(stream)]
    chunks = [stream[a:b] for a, b in itertools.pairwise(bounds)]
    assert account(exp.endpoint, chunks) == account(exp.endpoint, [stream])


def test_stripping_usage_only_chunk_leaves_an_ordinary_stream() -> None:
    with_usage = read("openai_chat_usage.sse")
    *_, stripped = account(Endpoint.CHAT, [with_usage])
    assert len(stripped) == 1
    rest = with_usage.replace(stripped[0], b"")
    assert b'"choices":[]' not in rest
    assert rest.endswith(b"\n\ndata: [DONE]\n\n")


def test_truncated_stream_ignores_partial_content() -> None:
    usage, chars, _, done, _ = account(Endpoint.CHAT, [read("chat_truncated.sse")])
    assert usage is None
    assert not done
    assert chars == len("Hello! How can")


# --- usage_from_json ----------------------------------------------------------------------


def test_chat_completion_body() -> None:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {
            "prompt_tokens": 12,
            "completion_tokens": 3,
            "total_tokens": 15,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }
    assert usage_from_json(json.dumps(body).encode()) == Usage(12, 3, 15, cached_tokens=0)


def test_completions_body() -> None:
    body = b'{"object":"text_completion","choices":[{"text":"x"}],"usage":{"prompt_tokens":4,\
"completion_tokens":1,"total_tokens":5}}'
    assert usage_from_json(body) == Usage(4, 1, 5)


def test_embeddings_body_has_no_completion_tokens() -> None:
    body = {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2]}],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 8, "total_tokens": 8},
    }
    assert usage_from_json(json.dumps(body).encode()) == Usage(8, None, 8)


def test_responses_body_maps_input_output_tokens() -> None:
    body = {
        "id": "resp_1",
        "object": "response",
        "output": [{"type": "message", "content": [{"type": "output_text", "text": "hi"}]}],
        "usage": {
            "input_tokens": 36,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 87,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 123,
        },
    }
    assert usage_from_json(json.dumps(body).encode()) == Usage(36, 87, 123, 0, 0)


def test_pretty_printed_body() -> None:
    body = json.dumps({"usage": {"prompt_tokens": 1, "completion_tokens": 2}}, indent=2)
    assert usage_from_json(body.encode()) == Usage(1, 2, None)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b'{"usage": {"prompt_tokens": 1}',
        b'["usage"]',
        b'"usage"',
        b'{"usage": null}',
        b'{"usage": []}',
        b'{"usage": "lots"}',
        b'{"usage": {}}',
        b'{"choices": []}',
        b'{"usage": {"prompt_tokens": -1, "completion_tokens": 1.0, "total_tokens": true}}',
        b'{"usage": {"prompt_tokens": "3", "total_tokens": null}}',
        b'{"usage": {"total_tokens": 99999999999999999999999}}',
        b'{"usage": {"prompt_tokens": 1}}\xff',
        b"\xff\xfe{\x00",
        b"[" * 100_000 + b'"usage"' + b"]" * 100_000,
        b'{"x":' * 100_000 + b'"usage"',
    ],
)
def test_body_without_valid_usage_is_none(body: bytes) -> None:
    assert usage_from_json(body) is None


def test_invalid_fields_are_ignored_individually() -> None:
    body = b'{"usage": {"prompt_tokens": -5, "completion_tokens": 7, "total_tokens": 2.5}}'
    assert usage_from_json(body) == Usage(None, 7, None)


def test_zero_is_kept() -> None:
    body = b'{"usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}}'
    assert usage_from_json(body) == Usage(0, 0, 0)


def test_non_bytes_body_is_none() -> None:
    assert usage_from_json("{}") is None  # type: ignore[arg-type]
    assert usage_from_json(bytearray(b'{"usage":{"total_tokens":3}}')) == Usage(None, None, 3)


# --- StreamAccountant: usage and usage-only chunks ------------------------------------------


CHUNK = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


@pytest.mark.parametrize(
    ("obj", "usage_only"),
    [
        ({**CHUNK, "choices": [], "usage": USAGE}, True),
        ({**CHUNK, "usage": USAGE}, True),
        ({**CHUNK, "choices": None, "usage": USAGE}, True),
        ({**CHUNK, "choices": [{"index": 0, "delta": {}}], "usage": USAGE}, False),
        ({**CHUNK, "choices": "junk", "usage": USAGE}, False),
    ],
)
def test_usage_only_detection(obj: dict[str, Any], usage_only: bool) -> None:
    acc = StreamAccountant(Endpoint.CHAT)
    assert acc.observe(chat_event(obj)) is usage_only
    assert acc.usage == Usage(3, 4, 7)


@pytest.mark.parametrize(
    "obj",
    [
        {**CHUNK, "choices": [], "usage": None},
        {**CHUNK, "choices": []},
        {**CHUNK, "choices": [], "usage": {"cost": 1}},
        {**CHUNK, "choices": [], "usage": {"prompt_tokens": -1}},
        {**CHUNK, "choices": [], "prompt_filter_results": [{"prompt_index": 0}]},
    ],
)
def test_chunk_without_valid_usage_is_not_usage_only(obj: dict[str, Any]) -> None:
    acc = StreamAccountant(Endpoint.CHAT)
    assert acc.observe(chat_event(obj)) is False
    assert acc.usage is None


def test_completions_usage_only_chunk() -> None:
    acc = StreamAccountant(Endpoint.COMPLETIONS)
    assert acc.observe(chat_event({"object": "text_completion", "choices": [], "usage": USAGE}))
    assert acc.usage == Usage(3, 4, 7)


def test_latest_usage_wins() -> None:
    acc = StreamAccountant(Endpoint.CHAT)
    acc.observe(chat_event({"choices": [], "usage": {"prompt_tokens": 1, "total_tokens": 1}}))
    acc.observe(chat_event({"choices": [], "usage": USAGE}))
    assert acc.usage == Usage(3, 4, 7)
    acc.observe(chat_event({"choices": [], "usage": {"bogus": 1}}))
    assert acc.usage == Usage(3, 4, 7)


def test_usage_with_whitespace_around_colon() -> None:
    acc = StreamAccountant(Endpoint.CHAT)
    assert acc.observe(raw_event(b'{"choices" : [ ] , "usage" :\t{ "total_tokens" : 9 } }'))
    assert acc.usage == Usage(None, None, 9)


def test_usage_mentioned_inside_a_string_is_not_parsed() -> None:
    acc = StreamAccountant(Endpoint.CHAT)
    ev = chat_event(
        {"choices": [{"delta": {"content": '"usage": {"total_tokens": 5}'}}], "usage": None}
    )
    assert acc.observe(ev) is False
    assert acc.usage is None
    assert acc.content_chars == len('"usage": {"total_tokens": 5}')


@pytest.mark.parametrize("data", [b"[DONE]", b" [DONE]", b"[DONE]\n"])
def test_done(data: bytes) -> None:
    acc = StreamAccountant(Endpoint.CHAT)
    assert acc.observe(raw_event(data)) is False
    assert acc.saw_done


def test_done_on_completions_and_not_on_lookalikes() -> None:
    acc = StreamAccountant(Endpoint.COMPLETIONS)
    acc.observe(raw_event(b"[DONE!]"))
    acc.observe(raw_event(b'"[DONE]"'))
    assert not acc.saw_done
    acc.observe(raw_event(b"[DONE]"))
    assert acc.saw_done


def test_comments_are_ignored_and_oversized_chat_events_count_as_text() -> None:
    acc = StreamAccountant(Endpoint.CHAT)
    assert acc.observe(Event(None, b"", b": ping\n\n", comment=True)) is False
    assert acc.content_chars == 0
    # Too big to parse: never a usage-only chunk, never [DONE]; all of it counts as text.
    assert acc.observe(Event(None, b"", b"data: [DONE]", overflow=True)) is False
    assert not acc.saw_done
    assert acc.content_chars == len(b"data: [DONE]")


def test_truncated_event_is_still_read() -> None:
    acc = StreamAccountant(Endpoint.CHAT)
    acc.observe(Event(None, b"[DONE]", b"data: [DONE]", truncated=True))
    assert acc.saw_done


# --- StreamAccountant: content characters ---------------------------------------------------


def delta(d: dict[str, Any]) -> Event:
    return chat_event({**CHUNK, "choices": [{"index": 0, "delta": d, "finish_reason": None}]})


def chars_of(endpoint: Endpoint, events: Iterable[Event]) -> int:
    acc = StreamAccountant(endpoint)
    for ev in events:
        acc.observe(ev)
    return acc.content_chars


def test_estimate_tokenizes_the_text_and_is_at_least_one_per_text_chunk() -> None:
    acc = StreamAccountant(Endpoint.CHAT)
    assert acc.estimated_completion_tokens == 0
    acc.observe(delta({"content": "Hello, how are you today?"}))  # 7 cl100k tokens
    assert acc.estimated_completion_tokens == 7
    acc.observe(delta({"content": "今天天气很好"}))  # 8 more
    assert acc.estimated_completion_tokens == 7 + 8
    acc.observe(delta({"content": ""}))  # no text: not a token
    acc.observe(delta({"role": "assistant"}))
    assert (acc.content_chunks, acc.estimated_completion_tokens) == (2, 15)
    # vLLM streams one token per chunk: "x" * 10 is 2 tokens as text, but ten were sent.
    acc = StreamAccountant(Endpoint.CHAT)
    for _ in range(10):
        acc.observe(delta({"content": "x"}))
    assert (acc.content_chunks, acc.estimated_completion_tokens) == (10, 10)


def test_kept_text_is_bounded_and_the_rest_extrapolated() -> None:
    acc = StreamAccountant(Endpoint.CHAT)
    word = "token " * 100  # 100 tokens, 600 characters
    chunks = MAX_KEPT_TEXT // len(word) * 2
    for _ in range(chunks):
        acc.observe(delta({"content": word}))
    assert acc.content_chars == 600 * chunks
    assert abs(acc.estimated_completion_tokens - 100 * chunks) <= 0.02 * 100 * chunks


def test_chat_counts_decoded_characters() -> None:
    assert chars_of(Endpoint.CHAT, [delta({"content": 'a\n"b"\\'})]) == 6
    assert chars_of(Endpoint.CHAT, [delta({"content": "été 中文 😀"})]) == 8
    assert chars_of(Endpoint.CHAT, [raw_event('{"delta":{"content":"été"}}'.encode())]) == 3
    assert chars_of(Endpoint.CHAT, [raw_event(b'{"delta":{"content":"\\ud83d\\ude00"}}')]) == 1


def test_chat_counts_reasoning_refusal_and_tool_arguments() -> None:
    events = [
        delta({"role": "assistant", "content": "", "refusal": None}),
        delta({"reasoning_content": "think"}),
        delta({"refusal": "no"}),
        delta({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": '{"a":'}}]}),
        delta({"content": None}),
    ]
    assert chars_of(Endpoint.CHAT, events) == 5 + 2 + 5


def test_reasoning_and_reasoning_content_with_same_text_count_once() -> None:
    assert chars_of(Endpoint.CHAT, [delta({"reasoning": "abcd"})]) == 4
    both = delta({"reasoning_content": "abcd", "reasoning": "abcd"})
    assert chars_of(Endpoint.CHAT, [both]) == 4


def test_chat_ignores_logprobs_obfuscation_and_other_strings() -> None:
    ev = chat_event(
        {
            **CHUNK,
            "choices": [
                {
                    "index": 0,
                    "delta": {"content": "ab"},
                    "logprobs": {"content": [{"token": "ab", "logprob": -0.1, "bytes": [97]}]},
                }
            ],
            "obfuscation": "xyzxyz",
            "system_fingerprint": "fp_123",
        }
    )
    assert chars_of(Endpoint.CHAT, [ev]) == 2


def test_chat_with_spaced_json_and_several_choices() -> None:
    ev = raw_event(
        b'{"choices": [{"delta": {"content" : "one"}}, {"delta": {"content":\t"three"}}]}'
    )
    assert chars_of(Endpoint.CHAT, [ev]) == 8


def test_completions_counts_text_only() -> None:
    ev = chat_event({"choices": [{"text": "hello", "index": 0, "logprobs": None}]})
    assert chars_of(Endpoint.COMPLETIONS, [ev]) == 5
    assert chars_of(Endpoint.COMPLETIONS, [delta({"content": "nope"})]) == 0
    assert chars_of(Endpoint.CHAT, [ev]) == 0


def test_unterminated_string_is_not_counted() -> None:
    assert chars_of(Endpoint.CHAT, [raw_event(b'{"delta":{"content":"abc')]) == 0


def test_invalid_escape_falls_back_to_raw_length() -> None:
    assert chars_of(Endpoint.CHAT, [raw_event(b'{"delta":{"content":"a\\qb"}}')]) == 4


# --- StreamAccountant: Responses API --------------------------------------------------------


def resp_event(kind: str, payload: dict[str, Any], named: bool = True) -> Event:
    data = json.dumps({"type": kind, "sequence_number": 1, **payload}).encode()
    head = b"event: " + kind.encode() + b"\n" if named else b""
    return Event(kind if named else None, data, head + b"data: " + data + b"\n\n")


RESP_USAGE = {"input_tokens": 5, "output_tokens": 6, "total_tokens": 11}


def test_responses_counts_text_deltas_only() -> None:
    events = [
        resp_event("response.created", {"response": {"usage": None, "text": {"a": "b"}}}),
        resp_event("response.output_text.delta", {"delta": "Hello", "obfuscation": "xx"}),
        resp_event("response.reasoning_summary_text.delta", {"delta": "hmm"}),
        resp_event("response.function_call_arguments.delta", {"delta": '{"q":1}'}),
        resp_event("response.audio.delta", {"delta": "QUJDRA=="}),
        resp_event("response.output_text.done", {"text": "Hello"}),
    ]
    acc = StreamAccountant(Endpoint.RESPONSES)
    assert not any(acc.observe(ev) for ev in events)
    assert acc.content_chars == 5 + 3 + 7
    assert acc.usage is None
    assert not acc.saw_done


@pytest.mark.parametrize("kind", ["response.completed", "response.incomplete", "response.failed"])
def test_responses_terminal_events_carry_usage(kind: str) -> None:
    acc = StreamAccountant(Endpoint.RESPONSES)
    acc.observe(resp_event(kind, {"response": {"status": "x", "usage": RESP_USAGE}}))
    assert acc.saw_done
    assert acc.usage == Usage(5, 6, 11)


def test_responses_event_type_from_data_when_no_event_field() -> None:
    acc = StreamAccountant(Endpoint.RESPONSES)
    acc.observe(resp_event("response.output_text.delta", {"delta": "abc"}, named=False))
    acc.observe(resp_event("response.completed", {"response": {"usage": RESP_USAGE}}, named=False))
    assert acc.content_chars == 3
    assert acc.saw_done
    assert acc.usage == Usage(5, 6, 11)


def test_responses_terminal_without_usage_or_garbage() -> None:
    acc = StreamAccountant(Endpoint.RESPONSES)
    acc.observe(raw_event(b"{not json", event="response.completed"))
    acc.observe(resp_event("response.completed", {"response": "nope"}))
    acc.observe(resp_event("response.completed", {"response": {"usage": None}}))
    assert acc.saw_done
    assert acc.usage is None


def test_responses_ignores_chat_shaped_usage() -> None:
    acc = StreamAccountant(Endpoint.RESPONSES)
    acc.observe(chat_event({"choices": [], "usage": USAGE}))
    assert acc.usage is None


# --- estimate_prompt_tokens -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "endpoint"),
    [
        ("/v1/chat/completions", Endpoint.CHAT),
        ("/v1/chat/completions?api-version=2024-10-21", Endpoint.CHAT),
        ("/openai/deployments/gpt/chat/completions/", Endpoint.CHAT),
        ("/v1/completions", Endpoint.COMPLETIONS),
        ("/v1/embeddings", Endpoint.EMBEDDINGS),
        ("/v1/responses", Endpoint.RESPONSES),
        ("/v1/models", None),
        ("/v1/responses/resp_1", None),
        ("", None),
    ],
)
def test_endpoint_for_path(path: str, endpoint: Endpoint | None) -> None:
    assert endpoint_for_path(path) is endpoint


# --- garbage never raises -------------------------------------------------------------------

JSON_TOKENS = st.sampled_from(
    [
        b"{",
        b"}",
        b"[",
        b"]",
        b":",
        b",",
        b" ",
        b'"',
        b"\\",
        b'"usage"',
        b'"choices"',
        b'"content"',
        b'"reasoning"',
        b'"arguments"',
        b'"text"',
        b'"delta"',
        b'"type"',
        b'"response"',
        b'"prompt_tokens"',
        b'"input_tokens"',
        b'"response.completed"',
        b'"response.output_text.delta"',
        b"null",
        b"-1",
        b"7",
        b"1e400",
        b"[DONE]",
        b"\\u00e9",
        b"\\ud800",
        b"\xc3",
        b"\xff",
    ]
)
JSON_SOUP = st.lists(JSON_TOKENS, max_size=50).map(b"".join)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(alphabet='ab é中\n"\\', max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "usage",
                    "choices",
                    "prompt_tokens",
                    "completion_tokens",
                    "total_tokens",
                    "input_tokens",
                    "output_tokens",
                    "response",
                    "delta",
                    "content",
                    "text",
                    "type",
                    "messages",
                    "prompt",
                    "input",
                    "instructions",
                    "tool_calls",
                    "function",
                    "arguments",
                    "output",
                ]
            ),
            inner,
            max_size=5,
        )
    ),
    max_leaves=30,
)


def test_an_unreadable_input_count_keeps_the_prompt_count() -> None:
    """Found by the property below: `input_tokens` that is not a count sent usage down
    Anthropic's path, which read nothing and returned a usage without any count."""
    assert usage_from_obj({"prompt_tokens": 5, "input_tokens": "x"}) == Usage(5, None, None)
    assert usage_from_obj({"output_tokens": 3, "input_tokens": None}) == Usage(None, 3, None)
    assert usage_from_obj({"input_tokens": 4, "output_tokens": 2}) == Usage(4, 2, 6)


def assert_valid_usage(usage: Usage | None) -> None:
    if usage is None:
        return
    fields = (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens)
    assert any(f is not None for f in fields)
    for f in fields:
        assert f is None or (type(f) is int and f >= 0)


@given(payload=st.one_of(st.binary(max_size=300), JSON_SOUP))
@PROPERTY
def test_usage_from_json_never_raises_on_bytes(payload: bytes) -> None:
    assert_valid_usage(usage_from_json(payload))


@given(value=JSON_VALUES)
@PROPERTY
def test_usage_from_json_never_raises_on_json(value: object) -> None:
    assert_valid_usage(usage_from_json(json.dumps(value).encode()))
    assert_valid_usage(usage_from_json(json.dumps({"usage": value}).encode()))


@given(
    payload=st.one_of(st.binary(max_size=300), JSON_SOUP),
    event=st.none() | st.sampled_from(["response.completed", "response.output_text.delta", "x"]),
    endpoint=st.sampled_from(list(Endpoint)),
)
@PROPERTY
def test_observe_never_raises(payload: bytes, event: str | None, endpoint: Endpoint) -> None:
    acc = StreamAccountant(endpoint)
    result = acc.observe(Event(event, payload, b"data: " + payload + b"\n\n"))
    assert isinstance(result, bool)
    assert_valid_usage(acc.usage)
    assert acc.content_chars >= 0
    assert acc.estimated_completion_tokens >= 0


@given(
    value=JSON_VALUES,
    event=st.none() | st.sampled_from(["response.completed", "response.output_text.delta"]),
    endpoint=st.sampled_from(list(Endpoint)),
)
@PROPERTY
def test_observe_never_raises_on_json(value: object, event: str | None, endpoint: Endpoint) -> None:
    acc = StreamAccountant(endpoint)
    for obj in (value, {"choices": [], "usage": value}, {"response": {"usage": value}}):
        acc.observe(chat_event(obj, event))
    assert_valid_usage(acc.usage)


@given(
    payload=st.binary(max_size=600),
    endpoint=st.sampled_from(list(Endpoint)),
    name=st.sampled_from(sorted(EXPECTED)),
    data=st.data(),
)
@PROPERTY
def test_decoder_and_accountant_survive_mangled_streams(
    payload: bytes, endpoint: Endpoint, name: str, data: st.DataObject
) -> None:
    stream = read(name)
    at = data.draw(st.integers(0, len(stream)))
    cut = data.draw(st.integers(0, 40))
    mangled = stream[:at] + payload + stream[at + cut :]
    usage, chars, estimate, _, _ = account(endpoint, [mangled])
    assert_valid_usage(usage)
    assert chars >= 0
    assert estimate >= 0


@given(value=JSON_VALUES)
@PROPERTY
def test_estimate_prompt_tokens_never_raises(value: object) -> None:
    for body in (value, {"messages": value}, {"input": value, "instructions": value}):
        n = estimate_prompt_tokens(body)  # type: ignore[arg-type]
        assert type(n) is int
        assert n >= 0


# --- oversized events and JSON bodies of any size (issue 11, items 2 and 8) ------------------


def test_oversized_chat_event_is_scanned_for_usage_and_counted_as_text() -> None:
    big = {**CHUNK, "choices": [{"index": 0, "delta": {"content": "z" * 50_000}}]}
    big["usage"] = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    stream = b"data: " + json.dumps(big).encode() + b"\n\ndata: [DONE]\n\n"
    dec = SSEDecoder(max_event_size=4096)
    acc = StreamAccountant(Endpoint.CHAT)
    for i in range(0, len(stream), 1000):
        for ev in dec.feed(stream[i : i + 1000]):
            assert acc.observe(ev) is False  # never stripped
    assert acc.usage == Usage(1, 2, 3) and acc.saw_done
    assert acc.content_chars >= 50_000 and acc.content_chunks == 1


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 20])
def test_json_body_accountant_finds_usage_across_chunks_in_bounded_memory(chunk: int) -> None:
    body = (
        b'{"choices":[{"text":"' + b"a" * 20_000 + b'"}],"usage" : {"prompt_tokens":5,'
        b'"completion_tokens":6,"total_tokens":11},"prompt_logprobs":[' + b"1," * 9_000 + b"1]}"
    )
    acc = JsonBodyAccountant(max_whole=1024)
    for i in range(0, len(body), chunk):
        acc.feed(body[i : i + chunk])
    assert acc.body is None and acc.bytes == len(body)
    assert acc.result() == (Usage(5, 6, 11), 0)
