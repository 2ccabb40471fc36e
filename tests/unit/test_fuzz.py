"""Hostile bodies and streams against the pure parsers: no exception escapes, and an admitted
request always ends in a settlement (no reservation leaks)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from atlas.grant import Grant
from atlas.requestbody import parse_llm_request
from extproc.exchange import Exchange
from tests.unit.test_exchange import GRANT

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "model",
                    "stream",
                    "messages",
                    "max_tokens",
                    "n",
                    "stream_options",
                    "prompt",
                    "input",
                    "content",
                    "include_usage",
                    "x",
                ]
            ),
            inner,
            max_size=5,
        )
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.binary(max_size=2000) | JSONISH.map(lambda v: repr(v).encode()),
    st.booleans(),
    st.integers(0, 10**9),
)
def test_request_parser_never_raises(body: bytes, complete: bool, size: int) -> None:
    r = parse_llm_request(body, complete=complete, size=size)
    assert r.prompt_tokens >= 0 and r.n >= 1


@settings(max_examples=300, deadline=None, database=None)
@given(
    path=st.sampled_from(
        ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings", "/x"]
    ),
    body=st.binary(max_size=500),
    status=st.sampled_from(["200", "500", "abc", ""]),
    ctype=st.sampled_from(["text/event-stream", "application/json", "", "text/plain"]),
    chunks=st.lists(st.binary(max_size=300), max_size=6),
    eos=st.booleans(),
    route=st.booleans(),
)
def test_exchange_survives_anything_and_always_settles(
    path: str,
    body: bytes,
    status: str,
    ctype: str,
    chunks: list[bytes],
    eos: bool,
    route: bool,
) -> None:
    ex = Exchange(route_by_model=route)
    ex.start(Grant.from_dict(GRANT), path)
    ex.on_request_body(body)
    ex.on_response_headers({":status": status, "content-type": ctype}, False)
    for i, chunk in enumerate(chunks):
        ex.on_response_body(chunk, eos and i == len(chunks) - 1)
    s = ex.settlement()
    assert s is not None and s.reservation_id == "r1"
    assert s.prompt_tokens >= 0 and s.completion_tokens >= 0
