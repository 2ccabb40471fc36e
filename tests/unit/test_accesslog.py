"""Settlements from Envoy's access-log entries (extproc/accesslog.py), without gRPC."""

from __future__ import annotations

import asyncio
from typing import Any

from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.service.accesslog.v3 import als_pb2

from atlas.grant import AUTHZ_NAMESPACE, GRANT_HEADER, PROC_HEADER, Grant, ProcMode
from atlas.modelnames import ModelNames
from atlas.requestlog_writer import RequestLogWriter
from extproc.accesslog import (
    EXTPROC_NAMESPACE,
    OWNER_KEY,
    USAGE_NAMESPACE,
    AccessLogSettler,
    decide,
)
from tests.unit.test_request_log_writer import Store

GRANT = Grant(key_id="key_a", reservation_id="r1", reserved=60, prompt_estimate=9, model="m")
NAMES = ModelNames()


def entry(
    *,
    grant: Grant | None = GRANT,
    proc: str = ProcMode.JSON,
    usage: dict[str, Any] | None = None,
    status: int | None = 200,
    reached: bool = True,
    body_bytes: int = 0,
    reset: bool = False,
    owner: bool = False,
    read: bool = True,
) -> al.HTTPAccessLogEntry:
    e = al.HTTPAccessLogEntry()
    md = e.common_properties.metadata.filter_metadata
    fields: dict[str, Any] = {PROC_HEADER: proc}
    if grant is not None:
        fields[GRANT_HEADER] = grant.encode()
    md[AUTHZ_NAMESPACE].update(fields)
    if usage is not None:
        md[USAGE_NAMESPACE].update({"read": 1, **usage} if read else usage)
    if owner:
        md[EXTPROC_NAMESPACE].update({OWNER_KEY: 1})
    if status is not None:
        e.response.response_code.value = status
    if reached:
        e.common_properties.time_to_first_upstream_tx_byte.FromMilliseconds(1)
    e.response.response_body_bytes = body_bytes
    e.common_properties.response_flags.downstream_remote_reset = reset
    return e


def test_usage_json_to_metadata_read_is_charged_exactly() -> None:
    d = decide(entry(usage={"prompt_tokens": 12, "completion_tokens": 30}), None, NAMES)
    assert d is not None and d.settlement is not None
    s = d.settlement
    assert (s.prompt_tokens, s.completion_tokens, s.exact, s.outcome) == (12, 30, True, "completed")
    # total_tokens wins when reported (cached or reasoning tokens are inside it).
    d = decide(entry(usage={"prompt_tokens": 12, "total_tokens": 50}), None, NAMES)
    assert d is not None and d.settlement is not None and d.settlement.completion_tokens == 38
    # Responses API names.
    d = decide(entry(usage={"input_tokens": 3, "output_tokens": 4}), None, NAMES)
    assert d is not None and d.settlement is not None
    assert (d.settlement.prompt_tokens, d.settlement.completion_tokens) == (3, 4)


def test_entries_that_are_not_ours_are_left_alone() -> None:
    assert decide(entry(proc=ProcMode.OBSERVE), None, NAMES) is None  # ext_proc settles it
    assert decide(entry(grant=None), None, NAMES) is None  # a refusal: nothing reserved
    assert decide(entry(owner=True), None, NAMES) is None  # extproc's json filter saw it
    degraded = Grant(key_id="k", reservation_id="r", reserved=1, prompt_estimate=1, degraded=True)
    assert decide(entry(grant=degraded), None, NAMES) is None


def test_what_happened_without_usage_decides_the_charge() -> None:
    # The upstream failed: refunded.
    d = decide(entry(status=503), None, NAMES)
    assert d is not None and d.settlement is not None and d.settlement.outcome == "upstream_error"
    assert d.settlement.prompt_tokens + d.settlement.completion_tokens == 0
    # The upstream never got it (reset before Envoy sent it on): released, charged nothing.
    d = decide(entry(status=None, reached=False), None, NAMES)
    assert d is not None and d.release and d.settlement is None
    # The upstream got it, the client hung up before any answer: its prompt.
    d = decide(entry(status=None, reset=True), None, NAMES)
    assert d is not None and d.settlement is not None
    assert (d.settlement.prompt_tokens, d.settlement.completion_tokens) == (9, 0)
    assert d.settlement.outcome == "disconnected" and not d.settlement.exact
    # An answer without usage: its size is the estimate, never 0.
    d = decide(entry(usage={}, body_bytes=401), None, NAMES)
    assert d is not None and d.settlement is not None
    assert (d.settlement.prompt_tokens, d.settlement.completion_tokens) == (9, 101)


def test_an_sse_stream_is_settled_from_the_last_usage_or_charged_its_reservation() -> None:
    """sse_to_metadata marks nothing `read`: the numbers it lifted are the usage; without
    them a stream's size is SSE framing, so it is charged what it reserved."""
    sse = {"proc": ProcMode.SSE, "read": False}
    d = decide(entry(usage={"prompt_tokens": 12, "total_tokens": 20}, **sse), None, NAMES)
    assert d is not None and d.settlement is not None and d.settlement.exact
    assert (d.settlement.prompt_tokens, d.settlement.completion_tokens) == (12, 8)
    for usage in (None, {"prompt_tokens": 12}):  # cut before the usage chunk, or no total
        d = decide(entry(usage=usage, body_bytes=90_000, **sse), None, NAMES)
        assert d is not None and d.settlement is not None and not d.settlement.exact
        assert (d.settlement.prompt_tokens, d.settlement.completion_tokens) == (9, 51)
    d = decide(entry(usage=None, status=None, reset=True, **sse), None, NAMES)
    assert d is not None and d.settlement is not None  # hung up before any answer: its prompt
    assert (d.settlement.prompt_tokens, d.settlement.completion_tokens) == (9, 0)
    d = decide(entry(usage=None, status=502, **sse), None, NAMES)
    assert d is not None and d.settlement is not None and d.settlement.outcome == "upstream_error"
    # A json exchange's numbers without `read` are not trusted as a whole body's usage.
    d = decide(entry(usage={"prompt_tokens": 12, "total_tokens": 20}, read=False), None, NAMES)
    assert d is not None and d.settlement is not None and not d.settlement.exact


def test_a_spliced_stream_is_settled_from_its_usage_or_from_what_it_streamed() -> None:
    """The Lua filter (envoy/stream_splice.lua) lifts the usage chunk's numbers, and counts
    the events of text it passed on: without usage (cut, or an upstream that ignored
    include_usage) the completion is that count, or the text's estimate when larger."""
    spliced = {"proc": ProcMode.SPLICE, "read": False}
    usage = {"prompt_tokens": 12, "total_tokens": 20, "streamed_events": 8, "streamed_chars": 30}
    d = decide(entry(usage=usage, **spliced), None, NAMES)
    assert d is not None and d.settlement is not None and d.settlement.exact
    assert (d.settlement.prompt_tokens, d.settlement.completion_tokens) == (12, 8)
    for counted, completion in (
        ({"streamed_events": 8, "streamed_chars": 30}, 8),  # a token an event
        ({"streamed_events": 2, "streamed_chars": 400}, 100),  # chunks of many tokens
        ({"streamed_events": 1e15, "streamed_chars": -4}, 0),  # out of bounds: not numbers
        (None, 0),  # nothing of text reached the client
    ):
        d = decide(entry(usage=counted, body_bytes=90_000, reset=True, **spliced), None, NAMES)
        assert d is not None and d.settlement is not None and not d.settlement.exact
        assert (d.settlement.prompt_tokens, d.settlement.completion_tokens) == (9, completion)
        assert d.settlement.outcome == "disconnected"
    d = decide(entry(usage=None, status=500, **spliced), None, NAMES)
    assert d is not None and d.settlement is not None and d.settlement.outcome == "upstream_error"
    d = decide(entry(usage=None, reached=False, **spliced), None, NAMES)
    assert d is not None and d.release  # the upstream never got it: charged nothing


def test_the_splice_script_lifts_every_usage_key_read_here() -> None:
    from atlas.envoy_config import config_dir
    from atlas.envoy_filters import SSE_USAGE_FIELDS

    script = (config_dir() / "stream_splice.lua").read_text()
    for field in SSE_USAGE_FIELDS:
        assert f'"{field}" }}' in script, field
    assert '"streamed_events"' in script and '"streamed_chars"' in script


def test_hostile_usage_numbers_fall_back_to_the_estimate() -> None:
    for usage in (
        {"prompt_tokens": -5, "completion_tokens": 3},
        {"prompt_tokens": 1e15, "completion_tokens": 3},
        {"prompt_tokens": 2.5, "completion_tokens": 3},
        {"prompt_tokens": "12", "completion_tokens": 3},
        {"prompt_tokens": 40, "total_tokens": 10},  # total below prompt
    ):
        d = decide(entry(usage=usage, body_bytes=40), None, NAMES)
        assert d is not None and d.settlement is not None, usage
        assert not d.settlement.exact and d.settlement.completion_tokens == 10, usage


def test_the_stream_settles_each_entry_and_survives_a_bad_one() -> None:
    batches: list[list[Any]] = []
    released: list[tuple[str, str]] = []
    writer = RequestLogWriter(Store(), service="test")
    svc = AccessLogSettler(
        lambda batch: batches.append([f.settlement for f in batch]),
        lambda k, r: released.append((k, r)),
        requests=writer,
    )
    msg = als_pb2.StreamAccessLogsMessage()
    good = entry(usage={"prompt_tokens": 1, "completion_tokens": 2})
    bad = entry()
    bad.common_properties.metadata.filter_metadata[AUTHZ_NAMESPACE].fields[
        GRANT_HEADER
    ].string_value = '{"key_id": "k", "reservation_id": ' + "[" * 100_000
    gone = entry(grant=Grant(key_id="k2", reservation_id="r2", reserved=1, prompt_estimate=1))
    gone.common_properties.ClearField("time_to_first_upstream_tx_byte")
    gone.response.ClearField("response_code")
    msg.http_logs.log_entry.extend([good, bad, gone])
    again = als_pb2.StreamAccessLogsMessage()
    again.http_logs.log_entry.extend([good, good])

    async def messages() -> Any:
        yield msg
        yield again

    asyncio.run(svc.StreamAccessLogs(messages(), None))
    # One batch per message: its settled entries, handed over together.
    assert [[(s.reservation_id, s.prompt_tokens) for s in b] for b in batches] == [
        [("r1", 1)],
        [("r1", 1), ("r1", 1)],
    ]
    assert released == [("k2", "r2")]
    # The released request is in the request log, charged nothing.
    assert writer.pending == 1
    (rec,) = writer._buffer
    assert (rec.request_id, rec.outcome, rec.prompt_tokens) == ("r2", "released", 0)


def test_cached_and_reasoning_details_are_settled_and_priced() -> None:
    from atlas.pricing import ModelPrice, PriceBook

    prices = PriceBook({"m": ModelPrice(prompt=2, completion=8, cached_prompt=1, reasoning=4)})
    chat = {
        "prompt_tokens": 100,
        "completion_tokens": 50,
        "total_tokens": 150,
        "prompt_tokens_details.cached_tokens": 60,
        "completion_tokens_details.reasoning_tokens": 20,
    }
    d = decide(entry(usage=chat), prices, NAMES)
    assert d is not None and d.settlement is not None
    s = d.settlement
    assert (s.prompt_tokens, s.completion_tokens) == (100, 50)
    assert (s.cached_tokens, s.reasoning_tokens, s.cache_write_tokens) == (60, 20, 0)
    assert s.cost_micros == 40 * 2 + 60 * 1 + 30 * 8 + 20 * 4
    responses = {
        "input_tokens": 30,
        "output_tokens": 9,
        "input_tokens_details.cached_tokens": 10,
        "output_tokens_details.reasoning_tokens": 5,
    }
    d = decide(entry(usage=responses), None, NAMES)
    assert d is not None and d.settlement is not None
    assert (d.settlement.cached_tokens, d.settlement.reasoning_tokens) == (10, 5)
    # Details past their whole (an upstream's bug) are cut to it, never refused later.
    odd = {"prompt_tokens": 5, "completion_tokens": 1, "prompt_tokens_details.cached_tokens": 9}
    d = decide(entry(usage=odd), None, NAMES)
    assert d is not None and d.settlement is not None and d.settlement.cached_tokens == 5


def test_every_usage_key_read_here_is_one_envoy_lifts() -> None:
    from atlas.envoy_config import EnvoyParams
    from atlas.envoy_filters import USAGE_FIELDS, usage_filter
    from extproc.accesslog import CACHED_KEYS, REASONING_KEYS

    assert {*CACHED_KEYS, *REASONING_KEYS} <= set(USAGE_FIELDS)
    config: Any = usage_filter(EnvoyParams(upstream="http://127.0.0.1:9000"))
    rules = config["typed_config"]["extension_config"]["typed_config"]["response_rules"]["rules"]
    lifted = {r["on_present"]["key"]: [s["key"] for s in r["selectors"]] for r in rules}
    assert lifted["prompt_tokens_details.cached_tokens"] == [
        "usage",
        "prompt_tokens_details",
        "cached_tokens",
    ]
    assert lifted["output_tokens_details.reasoning_tokens"] == [
        "usage",
        "output_tokens_details",
        "reasoning_tokens",
    ]
