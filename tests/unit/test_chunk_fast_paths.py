"""The per-chunk fast paths (one whole event per ext_proc message) give the general path's
results: same events, same accounting, same replies, same message counts."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atlas.grant import GRANT_HEADER, Grant
from extproc.exchange import Exchange
from extproc.sse import Event, SSEDecoder
from extproc.stream_usage import StreamAccountant
from extproc.text import CHAT_TEXT, string_chars
from extproc.usage import Endpoint

STREAMS = Path(__file__).resolve().parents[1] / "data" / "streams"
PROPERTY = settings(database=None, deadline=None, max_examples=300)
GRANT = {"key_id": "key_1", "reservation_id": "r1", "reserved": 100, "prompt_estimate": 5}


def decode(chunks: list[bytes], max_event_size: int = 1 << 20) -> tuple[list[Event], int]:
    dec = SSEDecoder(max_event_size)
    events = [ev for chunk in chunks for ev in dec.feed(chunk)]
    pending = dec.pending_bytes
    return events + dec.flush(), pending


def lf_events(raw: bytes) -> list[bytes]:
    """`raw` cut after every blank line, as Envoy sends an upstream's event-at-a-time writes."""
    parts = raw.split(b"\n\n")
    out = [p + b"\n\n" for p in parts[:-1]]
    return out + ([parts[-1]] if parts[-1] else [])


@pytest.mark.parametrize("name", sorted(p.name for p in STREAMS.glob("*.sse")))
def test_recorded_streams_one_event_per_chunk_decode_as_whole(name: str) -> None:
    raw = (STREAMS / name).read_bytes()
    assert decode(lf_events(raw))[0] == decode([raw])[0]


LINES = st.sampled_from(
    [b"data: x", b"data:y", b"data", b"event: e", b": ping", b"", b"id: 1", b"\xef\xbb\xbfdata: b"]
)
ENDS = st.sampled_from([b"\n", b"\n", b"\r\n", b"\r"])
BLOCK = st.lists(st.tuples(LINES, ENDS), min_size=1, max_size=4).map(
    lambda ls: b"".join(a + b for a, b in ls)
)


@PROPERTY
@given(blocks=st.lists(BLOCK, max_size=8), limit=st.sampled_from([16, 24, 1 << 20]))
def test_any_block_sequence_decodes_the_same_fed_whole_by_block_or_by_byte(
    blocks: list[bytes], limit: int
) -> None:
    whole = b"".join(blocks)

    def parsed(events: list[Event]) -> list[Event]:
        # Where an oversized block is cut into overflow parts depends on the chunking.
        return [ev for ev in events if not ev.overflow]

    expected = decode([whole], limit)[0]
    for chunks in (blocks, [whole[i : i + 1] for i in range(len(whole))]):
        events = decode(chunks, limit)[0]
        assert parsed(events) == parsed(expected)
        assert b"".join(ev.raw for ev in events) == whole


def test_the_single_event_fast_path_leaves_nothing_buffered() -> None:
    ev = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'
    dec = SSEDecoder()
    assert dec.feed(ev) == [Event(None, ev[6:-2], ev)]
    assert dec.pending_bytes == 0 and dec.flush() == []
    # A BOM on the first chunk, a leading blank line and a partial chunk take the full path.
    bom = b"\xef\xbb\xbf" + ev
    assert SSEDecoder().feed(bom) == [Event(None, ev[6:-2], bom)]
    assert [e.raw for e in SSEDecoder().feed(b"\n" + ev)] == [b"\n", ev]
    dec = SSEDecoder()
    assert dec.feed(b"x") == [] and dec.pending_bytes == 1


def reference_chat_chars(data: bytes) -> tuple[int, int]:
    """StreamAccountant's chat text count as it was before the substring pre-check."""
    chars = reasoning = 0
    has_rc = False
    for m in CHAT_TEXT.finditer(data):
        n = string_chars(m.group(2))
        if m.group(1) == b"reasoning":
            reasoning += n
            continue
        has_rc = has_rc or m.group(1) == b"reasoning_content"
        chars += n
    chars += 0 if has_rc else reasoning
    return chars, 1 if chars else 0


FRAGMENTS = st.sampled_from(
    [
        b'"content":"ab"',
        b'"content": "\\u00e9\\"x"',
        b'"reasoning":"rr"',
        b'"reasoning_content":"rr"',
        b'"refusal":"no"',
        b'"arguments":"{\\"a\\":1}"',
        b'"text":"t"',
        b'"usage":null',
        b'"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}',
        b'"id":"content"',
        b'"choices":[]',
        b",",
        b"{",
        b"}",
        b'"',
        b"\\",
    ]
)


@PROPERTY
@given(parts=st.lists(FRAGMENTS, max_size=10))
def test_chat_text_count_matches_the_full_regex_scan(parts: list[bytes]) -> None:
    data = b"".join(parts)
    acc = StreamAccountant(Endpoint.CHAT)
    acc.observe(Event(None, data, b"data: " + data + b"\n\n"))
    assert (acc.content_chars, acc.content_chunks) == reference_chat_chars(data)


def bench_shaped_stream(tokens: int = 70) -> list[bytes]:
    """Events as the demo upstream (vLLM's layout) sends them with include_usage."""
    head = b'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":'
    events = [head + b'[{"index":0,"delta":{"role":"assistant","content":""}}],"usage":null}\n\n']
    events += [
        head + b'[{"index":0,"delta":{"content":" t%d"}}],"usage":null}\n\n' % i
        for i in range(tokens)
    ]
    usage = b'{"prompt_tokens":5,"completion_tokens":%d,"total_tokens":%d}' % (tokens, tokens + 5)
    return [*events, head + b'[],"usage":' + usage + b"}\n\n", b"data: [DONE]\n\n"]


def streaming_exchange(inject: bool) -> Exchange:
    ex = Exchange()
    ex.start(Grant.from_dict(GRANT), "/v1/chat/completions")
    ex.injected_usage = inject
    ex.on_response_headers({":status": "200", "content-type": "text/event-stream"}, False)
    return ex


def reply_body(reply: Any) -> bytes | None:
    """What Envoy forwards instead of the chunk (None: the chunk itself)."""
    mutation = reply.response_body.response.body_mutation
    if mutation.clear_body:
        return b""
    return mutation.body if mutation.HasField("body") else None


@pytest.mark.parametrize("inject", [True, False])
def test_one_event_per_message_passes_every_kept_chunk_and_strips_only_the_injected_one(
    inject: bool,
) -> None:
    events = bench_shaped_stream()
    ex = streaming_exchange(inject)
    out = []
    for i, ev in enumerate(events):
        new = reply_body(ex.on_response_body(ev, i == len(events) - 1))
        out.append(ev if new is None else new)
    if inject:
        assert out == [*events[:-2], b"", events[-1]]
    else:
        assert out == events
    s = ex.settlement()
    assert s is not None and s.exact and (s.prompt_tokens, s.completion_tokens) == (5, 70)


@PROPERTY
@given(cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=12))
def test_any_chunking_of_an_injected_stream_gives_the_same_bytes(cuts: list[int]) -> None:
    raw = b"".join(bench_shaped_stream(8))
    bounds = sorted({0, len(raw), *(c % (len(raw) + 1) for c in cuts)})
    ex = streaming_exchange(True)
    out = bytearray()
    pieces = [raw[a:b] for a, b in itertools.pairwise(bounds)]
    for i, piece in enumerate(pieces):
        new = reply_body(ex.on_response_body(piece, i == len(pieces) - 1))
        out += piece if new is None else new
    assert bytes(out) == raw.replace(bench_shaped_stream(8)[-2], b"")


async def test_response_body_messages_are_all_counted_in_batches() -> None:
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
    from google.protobuf import struct_pb2

    from extproc.server import BODY_COUNT_BATCH, MESSAGES, ExternalProcessor
    from extproc.settler import Settler
    from tests.unit.fakes import FakeLedger

    md = struct_pb2.Struct()
    md.update({GRANT_HEADER: json.dumps({**GRANT, "stream": True, "route": "chat"})})
    first = ep.ProcessingRequest()
    first.metadata_context.filter_metadata["envoy.filters.http.ext_authz"].CopyFrom(md)
    first.response_headers.headers.headers.add(key=":status", raw_value=b"200")
    first.response_headers.headers.headers.add(key="content-type", raw_value=b"text/event-stream")
    events = bench_shaped_stream(BODY_COUNT_BATCH + 5)
    bodies = [ep.ProcessingRequest() for _ in events]
    for req, ev in zip(bodies, events, strict=True):
        req.response_body.body = ev
    bodies[-1].response_body.end_of_stream = True

    async def messages() -> Any:
        for m in (first, *bodies):
            yield m

    counter = MESSAGES["response_body"]
    before = counter._value.get()
    ledger = FakeLedger()
    settler = Settler(ledger)
    replies = [r async for r in ExternalProcessor(settler).Process(messages(), None)]
    await settler.drain()
    assert len(replies) == 1 + len(bodies)
    assert all(r.HasField("response_body") for r in replies[1:])
    assert counter._value.get() - before == len(bodies)
    assert ledger.settlements[0].exact and ledger.settlements[0].completion_tokens > 0
