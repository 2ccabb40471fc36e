"""One HTTP exchange as ext_proc sees it: the state between Envoy's messages, and the replies.

`Exchange` is pure (no I/O): each `on_*` method takes an Envoy message and returns the reply;
`settlement()` says what to charge once the exchange is over. The gRPC server feeds it and
hands the settlement to the ledger.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import wrappers_pb2

from atlas.grant import GRANT_HEADER, MODEL_HEADER, Grant, ProcMode, proc_mode
from atlas.jsonbound import loads_bounded, object_at
from atlas.ledger.protocol import Settlement
from atlas.modelnames import ModelNames
from atlas.pricing import PriceBook
from atlas.requestbody import bytes_estimate, estimate_prompt_tokens, lax_bool
from extproc.accesslog import EXTPROC_NAMESPACE, OWNER_KEY
from extproc.settlement import settlement_for
from extproc.sse import SSEDecoder
from extproc.usage import (
    Endpoint,
    JsonBodyAccountant,
    StreamAccountant,
    Usage,
    endpoint_for_path,
)

#: JSON responses up to this size are BUFFERED by Envoy (below its per-connection limit).
MAX_BUFFERED_RESPONSE_BYTES = 4 << 20
#: A JSON response up to this size is kept whole and parsed (with bounded work); beyond, only
#: its usage object is kept (scanned for as it passes) or its bytes are the estimate.
MAX_COPIED_RESPONSE_BYTES = 4 << 20
#: Model names are client input; a header carries a bounded, printable one.
MAX_MODEL_HEADER_CHARS = 256
_FALSE = wrappers_pb2.BoolValue(value=False)
#: Every exchange folds its model names through one bounded set, unless given its own.
_DEFAULT_MODEL_NAMES = ModelNames()


# With Envoy's request headers (meshes whose ext_authz cannot make dynamic metadata: the
# grant comes as a request header, read and removed here), extproc applies the ProcMode
# itself by mode overrides.
def _headers_reply(mode: str | None) -> ep.ProcessingResponse:
    reply = ep.ProcessingResponse(
        request_headers=ep.HeadersResponse(
            response=ep.CommonResponse(
                header_mutation=ep.HeaderMutation(remove_headers=[GRANT_HEADER])
            )
        )
    )
    o = reply.mode_override
    # The response's body says what it is (see Exchange.on_response_body): no headers message.
    # An override replaces the whole mode (what it leaves unset is SEND / NONE).
    o.response_header_mode = pm.ProcessingMode.SKIP
    o.response_body_mode = pm.ProcessingMode.STREAMED
    o.request_trailer_mode = pm.ProcessingMode.SKIP
    o.response_trailer_mode = pm.ProcessingMode.SKIP
    if mode == ProcMode.REWRITE:
        o.request_body_mode = pm.ProcessingMode.BUFFERED
        return reply
    o.request_body_mode = pm.ProcessingMode.NONE
    if mode is None or mode == ProcMode.NONE:
        o.response_header_mode = pm.ProcessingMode.SKIP
        o.response_body_mode = pm.ProcessingMode.NONE
    return reply


_HEADERS_REPLIES = {
    m: _headers_reply(m)
    for m in (ProcMode.REWRITE, ProcMode.OBSERVE, ProcMode.JSON, ProcMode.NONE, None)
}
_PASS_REQUEST_BODY = ep.ProcessingResponse(request_body=ep.BodyResponse())
_PASS_RESPONSE_BODY = ep.ProcessingResponse(response_body=ep.BodyResponse())
# ProcMode.JSON's body reached extproc (too big, or without a length, for json_to_metadata):
# the access-log settler leaves this exchange to extproc (extproc/accesslog.py).
_PASS_OWNED_RESPONSE_BODY = ep.ProcessingResponse(response_body=ep.BodyResponse())
_PASS_OWNED_RESPONSE_BODY.dynamic_metadata.update({EXTPROC_NAMESPACE: {OWNER_KEY: 1}})
_CLEAR_RESPONSE_BODY = ep.ProcessingResponse(
    response_body=ep.BodyResponse(
        response=ep.CommonResponse(body_mutation=ep.BodyMutation(clear_body=True))
    )
)


def _mode(body_mode: int) -> pm.ProcessingMode:
    return pm.ProcessingMode(response_body_mode=body_mode)  # type: ignore[arg-type]


def _set(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()), append=_FALSE
    )


_ENDPOINTS = {e.value: e for e in Endpoint}
_USAGE_INJECTED_ENDPOINTS = (Endpoint.CHAT, Endpoint.COMPLETIONS)


def _is_error_body(body: bytes) -> bool:
    """An OpenAI-style error answer: `{"error": {...}}` (without usage)."""
    head = body[:64].lstrip()
    if not head.startswith(b"{") or b'"error"' not in body[:4096]:
        return False
    data = loads_bounded(body)
    return isinstance(data, dict) and isinstance(data.get("error"), dict) and "usage" not in data


def _header_safe(value: str) -> str:
    """Printable ASCII only (Envoy rejects control characters in header values), bounded."""
    return "".join(c for c in value[:MAX_MODEL_HEADER_CHARS] if " " <= c <= "~")


# ---- request body rewrites by splicing ---------------------------------------------------
# The body is never parsed and re-serialised: members are appended before the object's
# closing brace, and JSON readers (Python's json, hence vLLM's pydantic models; authz too)
# keep the last of duplicate keys. Work is linear in the body, whatever its shape, and any
# string the client sent (a lone `\ud800` escape included) passes byte for byte.
_JSON_BLANKS = b" \t\r\n"
#: Bytes after a member's `{` read to decode a small object member (stream_options).
_MEMBER_CAPTURE = 4096


class _Key:
    """Finds the last `"key":` member of a JSON text. Inside a JSON string every quote is
    escaped, so only a real key (or a string value equal to it, which no colon follows) can
    match; a memchr-speed rfind finds candidates, the regex confirms one."""

    __slots__ = ("_needle", "_pattern")

    def __init__(self, key: str, value_start: bytes = b"") -> None:
        self._needle = b'"' + key.encode() + b'"'
        self._pattern = re.compile(re.escape(self._needle) + rb"\s*:\s*" + re.escape(value_start))

    def last(self, body: bytes) -> re.Match[bytes] | None:
        i = len(body)
        while (i := body.rfind(self._needle, 0, i)) >= 0:
            m = self._pattern.match(body, i)
            if m is not None:
                return m
        return None


_STREAM_OPTIONS = _Key("stream_options", b"{")
_MAX_COMPLETION_TOKENS = _Key("max_completion_tokens")


def _utf8(body: bytes) -> bytes | None:
    """`body` as UTF-8 (JSON may come as UTF-16/32, which json.loads and vLLM accept)."""
    enc = json.detect_encoding(body)
    if enc in ("utf-8", "utf-8-sig"):
        return body
    try:
        return body.decode(enc, "surrogatepass").encode("utf-8", "surrogatepass")
    except (UnicodeError, LookupError):
        return None


def _append_members(body: bytes, members: list[tuple[str, object]]) -> bytes | None:
    """The JSON object `body` with `members` appended (overriding earlier duplicates)."""
    utf8 = _utf8(body)
    if utf8 is None:
        return None
    end = _rstrip_at(utf8, len(utf8))
    if end < 2 or utf8[end - 1] != _CLOSE_BRACE:
        return None
    inner = _rstrip_at(utf8, end - 1)
    if inner == 0:
        return None
    # ensure_ascii: a client's lone surrogate in stream_options is written back escaped.
    extra = ",".join(f"{json.dumps(k)}:{json.dumps(v, separators=(',', ':'))}" for k, v in members)
    sep = b"" if utf8[inner - 1] == _OPEN_BRACE else b","
    # One copy of the body, whatever its size.
    return b"".join((memoryview(utf8)[:inner], sep, extra.encode(), memoryview(utf8)[end - 1 :]))


_OPEN_BRACE, _CLOSE_BRACE = ord("{"), ord("}")


def _rstrip_at(buf: bytes, end: int) -> int:
    """Where `buf[:end]` ends without its trailing JSON blanks (no copy)."""
    while end > 0 and buf[end - 1] in _JSON_BLANKS:
        end -= 1
    return end


def _object_member(body: bytes, key: _Key) -> dict[str, Any] | None:
    """The last (winning) small object member `key`, read from a bounded slice."""
    last = key.last(body)
    return None if last is None else object_at(body, last.end() - 1, _MEMBER_CAPTURE)


def _clamp_field(endpoint: Endpoint | None, body: bytes, data: dict[str, Any] | None) -> str:
    """Where a request's per-choice completion limit goes, as the upstream reads it."""
    if endpoint is Endpoint.RESPONSES:
        return "max_output_tokens"
    if endpoint is Endpoint.CHAT:
        used = (
            "max_completion_tokens" in data
            if data is not None
            else _MAX_COMPLETION_TOKENS.last(body) is not None
        )
        return "max_completion_tokens" if used else "max_tokens"
    return "max_tokens"


class Exchange:
    def __init__(
        self,
        *,
        route_by_model: bool = False,
        clock: Callable[[], float] = time.monotonic,
        models: ModelNames | None = None,
    ) -> None:
        """:param route_by_model: tell Envoy the body's model (`x-atlas-model`) and have it
        match routes again, for per-model upstream clusters.
        :param models: folds the model name of the settlement (metric labels, Redis history)
        into a bounded set."""
        self._route_by_model = route_by_model
        self._clock = clock
        self._models = models if models is not None else _DEFAULT_MODEL_NAMES
        self.grant: Grant | None = None
        self.endpoint: Endpoint | None = None
        self.model = ""
        self.prompt_estimate = 0
        self.stream = False
        self.injected_usage = False
        self.status = 0
        self.streaming_response = False
        self.headers_seen = False
        self.headers_skipped = False  # a response body came first (ProcMode.JSON)
        self.response_done = False
        self.usage: Usage | None = None
        #: Completion tokens to charge when no usage is reported.
        self.completion_estimate = 0
        self.started_at = clock()
        self.first_chunk_at: float | None = None
        self.finished_at: float | None = None
        self._decoder: SSEDecoder | None = None
        self._accountant: StreamAccountant | None = None
        self._json: JsonBodyAccountant | None = None

    # ---- request path ----------------------------------------------------------------
    def start(self, grant: Grant | None, path: str = "") -> None:
        """The exchange's grant, from the first message that carries Envoy's metadata (which
        message that is depends on the ext_proc configuration authz chose)."""
        self.grant = grant
        if grant is None:
            self.endpoint = endpoint_for_path(path) if path else None
            return
        self.endpoint = _ENDPOINTS.get(grant.route) or (endpoint_for_path(path) if path else None)
        self.model = grant.model
        self.prompt_estimate = grant.prompt_estimate
        self.stream = grant.stream

    def on_request_headers(self, headers: dict[str, str]) -> Any:
        """Only with a configuration that sends request headers: Atlas's own bootstrap does
        not (Envoy picks the configuration); a mesh's single ext_proc filter does."""
        path = headers.get(":path", "")
        if self.grant is None:
            text = headers.get(GRANT_HEADER)
            self.start(Grant.decode(text) if text else None, path)
        elif self.endpoint is None:
            self.endpoint = endpoint_for_path(path)
        g = self.grant
        mode = None if g is None else proc_mode(g, route_by_model=self._route_by_model)
        return _HEADERS_REPLIES[mode]

    def on_request_body(self, body: bytes) -> Any:
        """BUFFERED: the whole request body. Rewrites it only when Atlas must, by splicing.

        When authz parsed the body, its metadata says all we need and the body is not parsed
        again; otherwise it is parsed with bounded work, and a body too costly to parse is
        passed as it is (estimated by its size, settled from the response)."""
        g = self.grant
        if g is None:
            return _PASS_REQUEST_BODY
        data: dict[str, Any] | None = None
        include_usage = g.include_usage
        if not g.body_parsed:
            parsed = loads_bounded(body)
            if isinstance(parsed, dict):
                data = parsed
                if isinstance(data.get("model"), str):
                    self.model = data["model"]
                self.prompt_estimate = estimate_prompt_tokens(data)
                self.stream = lax_bool(data.get("stream")) is True
                opts = data.get("stream_options")
                include_usage = (
                    isinstance(opts, dict) and lax_bool(opts.get("include_usage")) is True
                )
            else:
                self.prompt_estimate = max(self.prompt_estimate, bytes_estimate(len(body)))
        new = (
            self._rewrite(body, data, include_usage) if data is not None or g.body_parsed else None
        )
        if new is None and not self._route_by_model:
            return _PASS_REQUEST_BODY
        common = ep.CommonResponse()
        if new is not None:
            # BUFFERED: Envoy holds the headers and keeps Content-Length; it must match.
            common.header_mutation.set_headers.append(_set("content-length", str(len(new))))
            common.body_mutation.body = new
        if self._route_by_model:
            # authz removed any client-sent x-atlas-* header; the route follows the body.
            if self.model:
                common.header_mutation.set_headers.append(
                    _set(MODEL_HEADER, _header_safe(self.model))
                )
            common.clear_route_cache = True
        return ep.ProcessingResponse(request_body=ep.BodyResponse(response=common))

    def _rewrite(
        self, body: bytes, data: dict[str, Any] | None, include_usage: bool
    ) -> bytes | None:
        """`body` with Atlas's request changes, or None when it needs none (or is not an
        object we can append to)."""
        assert self.grant is not None
        members: list[tuple[str, object]] = []
        usage_api = self.stream and self.endpoint in _USAGE_INJECTED_ENDPOINTS
        inject = usage_api and not include_usage
        continuous = usage_api and self.grant.continuous_usage
        if inject or continuous:
            # Ask the upstream for exact usage; the extra chunk is stripped on the way back.
            opts = (
                data.get("stream_options")
                if data is not None
                else _object_member(body, _STREAM_OPTIONS)
            )
            merged = {**(opts if isinstance(opts, dict) else {}), "include_usage": True}
            if continuous:
                # vLLM: usage on every chunk, so a stream cut anywhere is charged exactly.
                merged["continuous_usage_stats"] = True
            members.append(("stream_options", merged))
        if self.grant.granted_completion is not None:
            # Per choice, as the upstream reads it (authz reserved for every choice).
            field = _clamp_field(self.endpoint, body, data)
            members.append((field, self.grant.granted_completion))
        if not members:
            return None
        new = _append_members(body, members)
        if new is not None and inject:
            self.injected_usage = True
        return new

    # ---- response path ---------------------------------------------------------------
    def on_response_headers(self, headers: dict[str, str], end_of_stream: bool) -> Any:
        self.headers_seen = True
        try:
            self.status = int(headers.get(":status", "0"))
        except ValueError:
            self.status = 0
        ctype = headers.get("content-type", "").lower()
        reply = ep.ProcessingResponse(response_headers=ep.HeadersResponse())
        if self.grant is None or end_of_stream or self.status >= 400:
            # Nothing to count (local reply, no body, or an error that is refunded).
            self.response_done = end_of_stream
            reply.mode_override.CopyFrom(_mode(pm.ProcessingMode.NONE))
        elif ctype.startswith("text/event-stream"):
            self._start_stream()
            reply.mode_override.CopyFrom(_mode(pm.ProcessingMode.STREAMED))
        else:
            # A JSON body with a known, modest length is read whole (Envoy keeps its
            # Content-Length); anything else streams past in chunks, since a body over
            # Envoy's buffer limit in BUFFERED mode would fail the response.
            length = headers.get("content-length", "")
            small = length.isdigit() and int(length) <= MAX_BUFFERED_RESPONSE_BYTES
            mode = pm.ProcessingMode.BUFFERED if small else pm.ProcessingMode.STREAMED
            self._json = JsonBodyAccountant(MAX_COPIED_RESPONSE_BYTES)
            reply.mode_override.CopyFrom(_mode(mode))
        return reply

    def _start_stream(self) -> None:
        self.streaming_response = True
        self._decoder = SSEDecoder()
        self._accountant = StreamAccountant(self.endpoint or Endpoint.CHAT)

    def on_response_body(self, body: bytes, end_of_stream: bool) -> Any:
        if self._decoder is None and self._json is None and not self.headers_seen:
            # Atlas's configurations skip the response headers (one round trip less before
            # the first byte): the grant says whether a stream is expected, the first bytes
            # whether the upstream sent one (an error answer is JSON).
            if not body and not end_of_stream:
                return _PASS_RESPONSE_BODY
            if self.grant is not None and self.grant.stream and body.lstrip()[:1] != b"{":
                self._start_stream()
        if self._decoder is None or self._accountant is None:
            return self._on_json_body(body, end_of_stream)
        if self.first_chunk_at is None and body:
            self.first_chunk_at = self._clock()
        dec, acc = self._decoder, self._accountant
        # Nothing held back from an earlier chunk: then, when nothing is held back after this
        # one either, its events are exactly `body`.
        aligned = not dec.pending_bytes
        events = dec.feed(body)
        if end_of_stream:
            events += dec.flush()
            self.response_done = True
            self.finished_at = self._clock()
        if not self.injected_usage:
            for ev in events:
                acc.observe(ev)
            self.usage = acc.usage
            return _PASS_RESPONSE_BODY
        out: list[bytes] = []
        stripped = False
        for ev in events:
            if acc.observe(ev):
                stripped = True
            else:
                out.append(ev.raw)
        self.usage = acc.usage
        if not stripped and aligned and not dec.pending_bytes:
            # The common chunk, one whole event Atlas keeps: pass it without joining.
            return _PASS_RESPONSE_BODY if body else _CLEAR_RESPONSE_BODY
        # Re-emit only whole events, so the usage chunk we caused can be cut out exactly;
        # a partial event waits in the decoder for its next chunk.
        new = b"".join(out)
        if not new:
            return _CLEAR_RESPONSE_BODY
        if new == body:
            return _PASS_RESPONSE_BODY
        return ep.ProcessingResponse(
            response_body=ep.BodyResponse(
                response=ep.CommonResponse(body_mutation=ep.BodyMutation(body=new))
            )
        )

    def _on_json_body(self, body: bytes, end_of_stream: bool) -> Any:
        reply = _PASS_RESPONSE_BODY
        if self._json is None:
            # ProcMode.JSON: the body without its headers (or one Envoy sends without our
            # asking: counted all the same).
            self.headers_skipped = not self.headers_seen
            self._json = JsonBodyAccountant(MAX_COPIED_RESPONSE_BYTES)
            if self.headers_skipped:
                reply = _PASS_OWNED_RESPONSE_BODY
        acc = self._json
        acc.feed(body)
        if end_of_stream:
            self.response_done = True
            whole = acc.body
            if self.headers_skipped and whole is not None and _is_error_body(whole):
                self.status = 599  # no status seen: an OpenAI error body is the sign
            self.usage, self.completion_estimate = acc.result()
            self._json = JsonBodyAccountant(0)  # frees the copy; a stray later chunk counts
        return reply

    def _estimated_completion(self) -> int:
        if self._accountant is not None:
            return self._accountant.estimated_completion_tokens
        if self._json is not None and self._json.bytes:
            # Cut off before its end (client or upstream gone): what passed is the estimate.
            return max(self.completion_estimate, self._json.result()[1])
        return self.completion_estimate

    # ---- outcome -----------------------------------------------------------------------
    def settlement(self, prices: PriceBook | None = None) -> Settlement | None:
        g = self.grant
        if g is None:
            return None
        if self.status >= 400 and (self.usage is None or self.usage.total_tokens is None):
            outcome, prompt, completion, exact = "upstream_error", 0, 0, True
        elif self.usage is not None and self.usage.total_tokens is not None:
            outcome = "completed" if self.response_done else "disconnected"
            prompt = self.usage.prompt_tokens or 0
            completion = self.usage.total_tokens - prompt
            exact = True
        else:
            outcome = "completed" if self.response_done else "disconnected"
            # The prompt the upstream reported processing (Anthropic's message_start), else
            # authz's estimate of it.
            seen = self._accountant.prompt_seen if self._accountant is not None else None
            prompt = seen if seen is not None else self.prompt_estimate
            completion = self._estimated_completion()
            exact = False
        prompt, completion = max(0, prompt), max(0, completion)
        return settlement_for(
            g,
            model=self._models.fold(self.model or g.model),
            prompt=prompt,
            completion=completion,
            exact=exact,
            outcome=outcome,
            prices=prices,
            details=self.usage if exact else None,  # an upstream error's are cut to its 0s
        )
