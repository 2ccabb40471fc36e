"""SSEDecoder: WHATWG parsing rules, chunking independence and byte-exact pass-through."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.sse import DEFAULT_MAX_EVENT_SIZE, Event, SSEDecoder

STREAMS_DIR = Path(__file__).resolve().parents[1] / "data" / "streams"
STREAMS = sorted(p.name for p in STREAMS_DIR.glob("*.sse"))

# No example database: it would write a .hypothesis directory into the source tree.
PROPERTY = settings(database=None, deadline=None, max_examples=200)


def decode(chunks: Iterable[bytes], max_event_size: int = DEFAULT_MAX_EVENT_SIZE) -> list[Event]:
    dec = SSEDecoder(max_event_size)
    events: list[Event] = []
    for chunk in chunks:
        events.extend(dec.feed(chunk))
    events.extend(dec.flush())
    return events


def split_at(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def one(chunk: bytes) -> Event:
    events = decode([chunk])
    assert len(events) == 1, events
    return events[0]


def _ends_blank_line(pending: bytes) -> bool:
    return pending.endswith((b"\n\n", b"\r\n\n", b"\r\n\r\n")) or pending in (b"\n", b"\r\n")


def read(name: str) -> bytes:
    return (STREAMS_DIR / name).read_bytes()


def test_recorded_streams_exist() -> None:
    assert len(STREAMS) >= 10


# --- recorded streams: chunking independence ----------------------------------------------


@pytest.mark.parametrize("name", STREAMS)
def test_raw_concatenation_reproduces_stream(name: str) -> None:
    data = read(name)
    events = decode([data])
    assert b"".join(e.raw for e in events) == data
    assert not any(e.overflow for e in events)


@pytest.mark.parametrize("name", STREAMS)
def test_every_two_chunk_split_matches_whole(name: str) -> None:
    data = read(name)
    whole = decode([data])
    for i in range(len(data) + 1):
        assert decode([data[:i], data[i:]]) == whole, f"split at {i}"


@pytest.mark.parametrize("name", STREAMS)
def test_one_byte_at_a_time_matches_whole(name: str) -> None:
    data = read(name)
    assert decode(data[i : i + 1] for i in range(len(data))) == decode([data])


@pytest.mark.parametrize("name", STREAMS)
def test_events_are_returned_as_soon_as_complete(name: str) -> None:
    data = read(name)
    dec = SSEDecoder()
    seen = 0
    for i in range(len(data)):
        seen += sum(len(e.raw) for e in dec.feed(data[i : i + 1]))
        assert i + 1 - seen == dec.pending_bytes
        # Once a blank line is complete only a possible CRLF's first half may be held back.
        assert not _ends_blank_line(data[seen : i + 1])
    assert seen + sum(len(e.raw) for e in dec.flush()) == len(data)


@given(data=st.data(), name=st.sampled_from(STREAMS))
@PROPERTY
def test_random_chunkings_match_whole(data: st.DataObject, name: str) -> None:
    stream = read(name)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40))
    assert decode(split_at(stream, cuts)) == decode([stream])


# --- what the recorded streams decode to ---------------------------------------------------

# (events, of which comment blocks); mirrors tests/data/streams/README.md.
EVENT_COUNTS = {
    "openai_chat_usage.sse": (13, 0),
    "openai_chat_no_usage.sse": (12, 0),
    "openai_chat_tool_calls.sse": (11, 0),
    "vllm_chat_usage_final_chunk.sse": (12, 0),
    "vllm_chat_continuous_usage.sse": (6, 0),
    "chat_crlf.sse": (11, 1),
    "chat_cr_only.sse": (5, 0),
    "chat_keepalive_comments.sse": (13, 4),
    "chat_multiline_data.sse": (5, 0),
    "chat_truncated.sse": (6, 0),
    "openai_completions.sse": (12, 0),
    "openai_responses.sse": (15, 0),
    "anthropic_messages.sse": (10, 0),
    "anthropic_messages_tool_use.sse": (17, 0),
    "gemini_stream.sse": (3, 0),
}


def test_event_counts_cover_every_stream() -> None:
    assert sorted(EVENT_COUNTS) == STREAMS


@pytest.mark.parametrize("name", STREAMS)
def test_event_counts(name: str) -> None:
    events = decode([read(name)])
    assert (len(events), sum(e.comment for e in events)) == EVENT_COUNTS[name]
    assert sum(e.truncated for e in events) == (name == "chat_truncated.sse")


def test_openai_chat_usage_stream_shape() -> None:
    events = decode([read("openai_chat_usage.sse")])
    assert all(e.event is None and not e.comment and not e.truncated for e in events)
    assert events[-1].data == b"[DONE]"
    assert events[-1].raw == b"data: [DONE]\n\n"
    assert events[-2].data.startswith(b'{"id":"chatcmpl-')
    assert b'"choices":[]' in events[-2].data


def test_responses_stream_event_names() -> None:
    events = decode([read("openai_responses.sse")])
    names = [e.event for e in events]
    assert names[0] == "response.created"
    assert names[-1] == "response.completed"
    assert names.count("response.output_text.delta") == 7
    assert all(e.data.startswith(b'{"type":"' + (e.event or "").encode()) for e in events)


def test_keepalive_stream_comments() -> None:
    events = decode([read("chat_keepalive_comments.sse")])
    comments = [e for e in events if e.comment]
    assert [e.raw for e in comments] == [
        b": OPENROUTER PROCESSING\n\n",
        b": OPENROUTER PROCESSING\n\n",
        b": OPENROUTER PROCESSING\n\n",
        b": ping\n\n",
    ]
    inner = [e for e in events if e.raw.startswith(b": keep-alive\n")]
    assert len(inner) == 1
    assert not inner[0].comment
    assert inner[0].data.startswith(b"{")


def test_crlf_stream_decodes_like_lf() -> None:
    crlf = decode([read("chat_crlf.sse")])
    lf = decode([read("chat_crlf.sse").replace(b"\r\n", b"\n")])
    assert [(e.event, e.data, e.comment) for e in crlf] == [
        (e.event, e.data, e.comment) for e in lf
    ]
    assert crlf[0].comment
    assert crlf[0].raw.endswith(b"\r\n\r\n")


def test_cr_only_stream_decodes_like_lf() -> None:
    cr = decode([read("chat_cr_only.sse")])
    lf = decode([read("chat_cr_only.sse").replace(b"\r", b"\n")])
    assert [(e.event, e.data) for e in cr] == [(e.event, e.data) for e in lf]


def test_multiline_stream_joins_data_lines() -> None:
    events = decode([read("chat_multiline_data.sse")])
    assert events[0].data.count(b"\n") == 2
    assert events[1].data.startswith(b'{"id"')
    assert events[2].event == "message"
    assert events[3].data.count(b"\n") == 6
    assert events[4].data == b"[DONE]"


def test_truncated_stream_last_event_flagged() -> None:
    data = read("chat_truncated.sse")
    dec = SSEDecoder()
    events = dec.feed(data)
    assert len(events) == 5
    assert not any(e.truncated for e in events)
    tail = dec.flush()
    assert len(tail) == 1
    assert tail[0].truncated
    assert tail[0].data.endswith(b'"content":" ')
    assert b"".join(e.raw for e in events + tail) == data


# --- parsing rules ------------------------------------------------------------------------


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_line_endings(eol: bytes) -> None:
    raw = b"event: x" + eol + b"data: a" + eol + b"data: b" + eol + eol
    ev = one(raw)
    assert ev == Event("x", b"a\nb", raw)


def test_mixed_line_endings_in_one_event() -> None:
    raw = b"data: a\r\ndata: b\rdata: c\n\r\n"
    assert one(raw).data == b"a\nb\nc"


def test_data_leading_space_optional_and_only_one_stripped() -> None:
    assert one(b"data:x\n\n").data == b"x"
    assert one(b"data: x\n\n").data == b"x"
    assert one(b"data:  x\n\n").data == b" x"
    assert one(b"data: x \n\n").data == b"x "


def test_value_keeps_later_colons() -> None:
    assert one(b'data: {"a":"b:c"}\n\n').data == b'{"a":"b:c"}'


def test_data_without_colon_and_empty_data() -> None:
    assert one(b"data\n\n") == Event(None, b"", b"data\n\n")
    assert one(b"data:\n\n") == Event(None, b"", b"data:\n\n")
    assert one(b"data\ndata: x\n\n").data == b"\nx"
    assert one(b"data: x\ndata:\n\n").data == b"x\n"


def test_event_field_last_wins_and_empty_is_none() -> None:
    assert one(b"event: a\nevent: b\ndata: x\n\n").event == "b"
    assert one(b"event:\ndata: x\n\n").event is None
    assert one(b"event:a\ndata: x\n\n").event == "a"
    assert one(b"event: \xff\ndata: x\n\n").event == "\ufffd"


def test_field_names_are_case_sensitive_and_unknown_ignored() -> None:
    ev = one(b"Data: nope\nid: 7\nretry: 100\nfoo: bar\ndata: yes\n\n")
    assert ev.data == b"yes"
    assert not ev.comment


def test_comment_only_block_is_a_comment_event() -> None:
    assert one(b": ping\n\n") == Event(None, b"", b": ping\n\n", comment=True)
    assert one(b":\n\n").comment


@pytest.mark.parametrize(
    "block", [b"event: x\n\n", b"id: 1\n\n", b"retry: 10\n\n", b"foo\n\n", b"\n", b"\r\n"]
)
def test_block_without_data_is_a_comment_event(block: bytes) -> None:
    assert one(block) == Event(None, b"", block, comment=True)


def test_comment_inside_event_stays_in_raw() -> None:
    raw = b": keep-alive\ndata: a\n: more\ndata: b\n\n"
    assert one(raw) == Event(None, b"a\nb", raw)


def test_several_events_in_one_chunk_and_extra_blank_lines() -> None:
    data = b"data: 1\n\ndata: 2\n\n\n: c\n\ndata: [DONE]\n\n"
    events = decode([data])
    assert [e.raw for e in events] == [
        b"data: 1\n\n",
        b"data: 2\n\n",
        b"\n",
        b": c\n\n",
        b"data: [DONE]\n\n",
    ]
    assert [e.data for e in events if not e.comment] == [b"1", b"2", b"[DONE]"]


def test_bom_is_ignored_only_at_stream_start() -> None:
    bom = b"\xef\xbb\xbf"
    events = decode([bom + b"data: a\n\n" + bom + b"data: b\n\n"])
    assert events[0] == Event(None, b"a", bom + b"data: a\n\n")
    assert events[1].comment
    assert decode([bom[:1], bom[1:2], bom[2:] + b"data: a\n", b"\n"]) == events[:1]
    assert decode([bom + b"\n"]) == [Event(None, b"", bom + b"\n", comment=True)]


def test_event_split_across_chunks_at_every_byte() -> None:
    data = b'event: e\r\ndata: {"x": 1}\r\n: c\r\ndata: y\r\n\r\n'
    expected = [Event("e", b'{"x": 1}\ny', data)]
    for i in range(len(data) + 1):
        for j in range(i, len(data) + 1):
            assert decode([data[:i], data[i:j], data[j:]]) == expected


def test_trailing_cr_is_held_until_the_next_byte() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: x\r\r") == []
    assert dec.feed(b"\n") == [Event(None, b"x", b"data: x\r\r\n")]
    assert dec.feed(b"data: y\r\r") == []
    assert dec.feed(b"data: z") == [Event(None, b"y", b"data: y\r\r")]
    assert dec.pending_bytes == len(b"data: z")


def test_trailing_cr_is_resolved_by_flush() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: x\r\r") == []
    assert dec.flush() == [Event(None, b"x", b"data: x\r\r")]
    assert dec.feed(b"\r") == []
    assert dec.flush() == [Event(None, b"", b"\r", comment=True)]


def test_lf_blank_line_is_not_held() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: x\r\n\n") == [Event(None, b"x", b"data: x\r\n\n")]
    assert dec.feed(b"data: x\n\n") == [Event(None, b"x", b"data: x\n\n")]


def test_done_sentinel_is_plain_data() -> None:
    assert one(b"data: [DONE]\n\n") == Event(None, b"[DONE]", b"data: [DONE]\n\n")


def test_flush_returns_trailing_event_without_blank_line() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: a\n\ndata: [DONE]\n") == [Event(None, b"a", b"data: a\n\n")]
    assert dec.flush() == [Event(None, b"[DONE]", b"data: [DONE]\n", truncated=True)]
    assert dec.flush() == []
    assert dec.pending_bytes == 0


def test_flush_of_partial_line_and_of_comment() -> None:
    dec = SSEDecoder()
    dec.feed(b'data: {"a')
    assert dec.flush() == [Event(None, b'{"a', b'data: {"a', truncated=True)]
    dec.feed(b": pi")
    assert dec.flush() == [Event(None, b"", b": pi", comment=True, truncated=True)]


def test_empty_chunk_and_empty_flush() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"") == []
    assert dec.flush() == []


def test_bytearray_chunks_give_bytes_raw() -> None:
    dec = SSEDecoder()
    events = dec.feed(bytearray(b"data: a\n\ndata: b")) + dec.feed(bytearray(b"\n\n"))
    assert events == [Event(None, b"a", b"data: a\n\n"), Event(None, b"b", b"data: b\n\n")]
    assert all(type(e.raw) is bytes for e in events)


# --- bounded buffer -----------------------------------------------------------------------


def test_max_event_size_must_be_sane() -> None:
    with pytest.raises(ValueError, match="max_event_size"):
        SSEDecoder(max_event_size=4)


def test_oversized_partial_event_is_passed_through_not_buffered() -> None:
    dec = SSEDecoder(max_event_size=64)
    big = b"data: " + b"x" * 1000 + b"\n\n"
    events: list[Event] = []
    for i in range(0, len(big), 50):
        events.extend(dec.feed(big[i : i + 50]))
        assert dec.pending_bytes <= 64
    events.extend(dec.feed(b"data: after\n\n"))
    assert all(e.overflow for e in events[:-1])
    assert all(e.event is None and e.data == b"" for e in events[:-1])
    assert b"".join(e.raw for e in events[:-1]) == big
    assert events[-1] == Event(None, b"after", b"data: after\n\n")
    assert dec.flush() == []


def test_oversized_complete_event_in_one_chunk_is_flagged() -> None:
    big = b"data: " + b"y" * 100 + b"\n\n"
    events = decode([big + b"data: ok\n\n"], max_event_size=64)
    assert events == [Event(None, b"", big, overflow=True), Event(None, b"ok", b"data: ok\n\n")]


def test_oversized_event_ending_in_crlf_split_across_chunks() -> None:
    big = b"data: " + b"z" * 200 + b"\r\n\r\n"
    follow = b"data: next\r\n\r\n"
    data = big + follow
    for i in range(len(data) + 1):
        events = decode([data[:i], data[i:]], max_event_size=32)
        assert b"".join(e.raw for e in events) == data
        assert events[-1] == Event(None, b"next", follow), i
        assert b"".join(e.raw for e in events[:-1]) == big


def test_truncated_oversized_event_on_flush() -> None:
    dec = SSEDecoder(max_event_size=32)
    out = dec.feed(b"data: " + b"q" * 100)
    tail = dec.flush()
    assert tail[-1].overflow
    assert tail[-1].truncated
    assert b"".join(e.raw for e in out + tail) == b"data: " + b"q" * 100


# --- properties ---------------------------------------------------------------------------

SSE_TOKENS = st.sampled_from(
    [
        b"data:",
        b"data: ",
        b"event: ",
        b"id: 1",
        b"retry: 5",
        b": ping",
        b":",
        b"\n",
        b"\r",
        b"\r\n",
        b"\n\n",
        b"\xef\xbb\xbf",
        b"[DONE]",
        b'{"choices":[],"usage":{"prompt_tokens":1}}',
        b"x",
        b"\xff",
    ]
)
SSE_SOUP = st.lists(SSE_TOKENS, max_size=60).map(b"".join)


@given(payload=st.one_of(st.binary(max_size=400), SSE_SOUP), data=st.data())
@PROPERTY
def test_any_bytes_any_chunking_same_events_and_raw(payload: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(payload)), max_size=20))
    whole = decode([payload])
    assert b"".join(e.raw for e in whole) == payload
    assert decode(split_at(payload, cuts)) == whole


@given(
    payload=st.one_of(st.binary(max_size=600), SSE_SOUP),
    data=st.data(),
    max_size=st.integers(16, 80),
)
@PROPERTY
def test_small_max_size_keeps_raw_and_bounds_memory(
    payload: bytes, data: st.DataObject, max_size: int
) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(payload)), max_size=30))
    dec = SSEDecoder(max_size)
    events: list[Event] = []
    for chunk in split_at(payload, cuts):
        events.extend(dec.feed(chunk))
        assert dec.pending_bytes <= max_size
    events.extend(dec.flush())
    assert b"".join(e.raw for e in events) == payload
    for e in events:
        if not e.overflow:
            assert len(e.raw) <= max_size


def test_oversized_block_parts_say_whether_more_follow() -> None:
    block = b"data: " + b"x" * 100 + b"\n\n"
    for cuts in ([], [10], [10, 50, 90], list(range(1, len(block)))):
        events = decode(split_at(block + b"data: y\n\n", cuts), max_event_size=32)
        parts = [e for e in events if e.overflow]
        assert b"".join(e.raw for e in parts) == block
        assert [e.continued for e in parts] == [True] * (len(parts) - 1) + [False]
        assert events[-1].data == b"y" and not events[-1].continued
