"""Settlements from Envoy's gRPC access log: completions without an ext_proc stream.

For an exchange authz marked `json` (atlas/grant.py ProcMode), Envoy's json_to_metadata filter
lifts the response's `usage` into dynamic metadata (`atlas.usage`), for one marked `splice` (a
stream Atlas asks for usage) envoy/stream_splice.lua does, for one marked `sse` (a stream
whose client asked for usage, opt-in) sse_to_metadata does, and the access logger
(`envoy.access_loggers.http_grpc`) sends one entry per request, many per message, on one
long-lived stream. Measured (issue 12): ~22 µs of Python per request here, against ~950 µs
for the smallest ext_proc stream.

Who settles an entry's exchange:
- json_to_metadata read the body (`atlas.usage.read`): this module, from its usage (exact) or
  its size (estimated);
- extproc's `json` filter saw the body (a response too big or without a length for
  json_to_metadata; it marks `atlas.extproc.owner`): extproc, not this module;
- nobody saw a body: this module, from what the entry says happened: an upstream error is
  refunded, a request the upstream got is charged its prompt, one it never got is released.

A lost entry (extproc down: Envoy drops what it cannot send) leaves the reservation claimed
(authz admitted it `unattended`): the reaper charges it at its deadline, never less.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from envoy.data.accesslog.v3 import accesslog_pb2 as al
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from atlas import metrics
from atlas.grant import (
    ALWAYS_LOGGED,
    AUTHZ_NAMESPACE,
    EXTPROC_NAMESPACE,
    GRANT_HEADER,
    OWNER_KEY,
    PROC_HEADER,
    PROVIDER_HEADER,
    USAGE_NAMESPACE,
    Grant,
    ProcMode,
)
from atlas.ledger.protocol import Settlement
from atlas.modelnames import ModelNames
from atlas.pricing import PriceBook
from atlas.requestbody import tokens_for_chars
from atlas.requestlog import RequestRecord
from atlas.requestlog_writer import RequestLogWriter
from extproc.providers import ProviderReporter
from extproc.settlement import settlement_for
from extproc.settler import Finished
from extproc.usage import Usage

log = logging.getLogger("atlas.extproc")

SERVICE_NAME = "envoy.service.accesslog.v3.AccessLogService"
#: Detail counts json_to_metadata lifts under their dotted paths in `usage`
#: (atlas/envoy_filters.py USAGE_FIELDS), chat/completions names first, then Responses'.
CACHED_KEYS = ("prompt_tokens_details.cached_tokens", "input_tokens_details.cached_tokens")
REASONING_KEYS = (
    "completion_tokens_details.reasoning_tokens",
    "output_tokens_details.reasoning_tokens",
)


def _num(fields: Any, name: str) -> int | None:
    v = fields.get(name)
    if v is None or v.WhichOneof("kind") != "number_value":
        return None
    n = v.number_value
    # json_to_metadata copies whatever the upstream wrote: bounded like any usage.
    return int(n) if 0 <= n < 1e12 and n == int(n) else None


def _first(fields: Any, names: tuple[str, str]) -> int | None:
    n = _num(fields, names[0])
    return n if n is not None else _num(fields, names[1])


def _string(fields: Any, name: str) -> str | None:
    v = fields.get(name)
    return v.string_value if v is not None and v.WhichOneof("kind") == "string_value" else None


class Decision:
    """What to do with one entry: settle it, release its reservation, or leave it."""

    __slots__ = ("grant", "release", "settlement")

    def __init__(
        self, grant: Grant, settlement: Settlement | None = None, release: bool = False
    ) -> None:
        self.grant = grant
        self.settlement = settlement
        self.release = release


def decide(
    entry: al.HTTPAccessLogEntry, prices: PriceBook | None, models: ModelNames
) -> Decision | None:
    """The decision for one entry, or None when it is not this module's (no grant, another
    ext_proc configuration, or extproc's json filter saw the body)."""
    md = entry.common_properties.metadata.filter_metadata
    authz = md.get(AUTHZ_NAMESPACE)
    if authz is None:
        return None
    mode = _string(authz.fields, PROC_HEADER)
    if mode != ProcMode.JSON and mode not in ALWAYS_LOGGED:
        return None
    text = _string(authz.fields, GRANT_HEADER)
    grant = Grant.decode(text) if text else None
    if grant is None or grant.degraded:  # degraded: nothing reserved in the ledger
        return None
    owner = md.get(EXTPROC_NAMESPACE)
    if owner is not None and OWNER_KEY in owner.fields:
        return None
    cp = entry.common_properties
    status = entry.response.response_code.value if entry.response.HasField("response_code") else 0
    usage = md.get(USAGE_NAMESPACE)
    # sse_to_metadata and the Lua filter mark nothing read: their numbers are the stream's.
    read = usage is not None and ("read" in usage.fields or mode in ALWAYS_LOGGED)
    reached = cp.HasField("time_to_first_upstream_tx_byte")
    flags = cp.response_flags
    completed = not (flags.downstream_connection_termination or flags.downstream_remote_reset)
    if read:
        assert usage is not None
        f = usage.fields
        prompt = _num(f, "prompt_tokens")
        if prompt is None:
            prompt = _num(f, "input_tokens")
        total = _num(f, "total_tokens")
        if total is None:
            out = _num(f, "completion_tokens")
            if out is None:
                out = _num(f, "output_tokens")
            total = None if prompt is None or out is None else prompt + out
        if total is not None and prompt is not None and total >= prompt:
            details = Usage(
                cached_tokens=_first(f, CACHED_KEYS), reasoning_tokens=_first(f, REASONING_KEYS)
            )
            s = _settlement(
                grant, prompt, total - prompt, True, "completed", prices, models, details
            )
            return Decision(grant, s)
    if status >= 400:
        return Decision(grant, _settlement(grant, 0, 0, True, "upstream_error", prices, models))
    if not reached:
        return Decision(grant, release=True)  # the upstream never saw it: charged nothing
    body = entry.response.response_body_bytes
    outcome = "completed" if completed and status else "disconnected"
    # No usage: the prompt the upstream got, and what it answered by its size; a stream's
    # size is mostly SSE framing, so it is charged what it reserved (as the reaper would).
    if not status:
        completion = 0
    elif mode == ProcMode.SPLICE:
        completion = _streamed_tokens(usage)
    elif mode == ProcMode.SSE:
        completion = max(0, grant.reserved - grant.prompt_estimate)
    else:
        completion = tokens_for_chars(body)
    s = _settlement(grant, grant.prompt_estimate, completion, False, outcome, prices, models)
    return Decision(grant, s)


def _streamed_tokens(usage: Any) -> int:
    """A `splice` stream's completion without usage (cut, or an upstream that ignored
    include_usage), from what envoy/stream_splice.lua counted: as extproc estimates a stream,
    never fewer than one token per event of text."""
    f = usage.fields if usage is not None else {}
    return max(_num(f, "streamed_events") or 0, tokens_for_chars(_num(f, "streamed_chars") or 0))


def _settlement(
    g: Grant,
    prompt: int,
    completion: int,
    exact: bool,
    outcome: str,
    prices: PriceBook | None,
    models: ModelNames,
    details: Usage | None = None,
) -> Settlement:
    return settlement_for(
        g,
        model=models.fold(g.model),
        prompt=prompt,
        completion=completion,
        exact=exact,
        outcome=outcome,
        prices=prices,
        details=details,
    )


def released_record(entry: al.HTTPAccessLogEntry, g: Grant) -> RequestRecord:
    """The request log's record of an admitted request the upstream never saw (Envoy answered
    it, e.g. 503 without a healthy upstream): charged nothing."""
    cp = entry.common_properties
    return RequestRecord(
        at_ms=cp.start_time.seconds * 1000 + cp.start_time.nanos // 1_000_000,
        request_id=g.reservation_id,
        key_id=g.key_id,
        team=g.team,
        app=g.app,
        end_user=g.end_user,
        model=g.model,
        provider=g.provider,
        status=entry.response.response_code.value,
        outcome="released",
        priority=g.priority,
        stream=g.stream,
    )


class AccessLogSettler(als_pb2_grpc.AccessLogServiceServicer):
    """Envoy's access-log stream: each entry is decided and handed to the settler, or its
    reservation released (batched, like claims)."""

    def __init__(
        self,
        submit: Callable[[Sequence[Finished]], None],
        release: Callable[[str, str], None],
        *,
        prices: PriceBook | None = None,
        models: ModelNames | None = None,
        providers: ProviderReporter | None = None,
        requests: RequestLogWriter | None = None,
    ) -> None:
        """:param submit: extproc.settler.Settler.submit_many: one message's settlements.
        :param providers: told what each provider-routed request's provider answered.
        :param requests: where a released request's record goes (settled ones: `submit`)."""
        self._requests = requests
        self._providers = providers
        self._submit = submit
        self._release = release
        self._prices = prices
        self._models = models if models is not None else ModelNames()

    async def StreamAccessLogs(
        self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage], context: Any
    ) -> als_pb2.StreamAccessLogsResponse:
        async for msg in request_iterator:
            batch: list[Finished] = []
            for entry in msg.http_logs.log_entry:
                try:
                    if self._providers is not None:
                        self._report_provider(entry)
                    d = decide(entry, self._prices, self._models)
                except Exception:  # one odd entry must not end the stream for the others
                    log.exception("access-log entry could not be read; skipped")
                    metrics.DECISIONS.labels(service="extproc", decision="access_log_error").inc()
                    continue
                if d is None:
                    continue
                _ENTRIES.inc()
                if d.settlement is not None:
                    cp = entry.common_properties
                    took = cp.time_to_last_downstream_tx_byte
                    took_s = took.seconds + took.nanos / 1e9
                    batch.append(
                        Finished(
                            d.settlement,
                            d.grant,
                            stream_s=took_s if d.grant.stream else None,
                            status=entry.response.response_code.value,
                            latency_ms=took_s * 1000,
                            started_s=cp.start_time.seconds + cp.start_time.nanos / 1e9,
                        )
                    )
                elif d.release:
                    self._release(d.grant.key_id, d.grant.reservation_id)
                    if self._requests is not None:
                        self._requests.add(released_record(entry, d.grant))
            self._submit(batch)  # one task and one Redis round trip for the message's entries
        return als_pb2.StreamAccessLogsResponse()

    def _report_provider(self, entry: al.HTTPAccessLogEntry) -> None:
        assert self._providers is not None
        authz = entry.common_properties.metadata.filter_metadata.get(AUTHZ_NAMESPACE)
        if authz is None or _string(authz.fields, PROVIDER_HEADER) is None:
            return
        text = _string(authz.fields, GRANT_HEADER)
        grant = Grant.decode(text) if text else None
        if grant is not None and grant.provider:
            self._providers.entry(entry, grant)


_ENTRIES = metrics.DECISIONS.labels(service="extproc", decision="access_log_settled")
