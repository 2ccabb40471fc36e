"""One HTTP exchange as ext_proc sees it: the state between Envoy's messages, and the replies.

`Exchange` is pure (no I/O): each `on_*` method takes an Envoy message and returns the reply;
`settlement()` says what to charge once the exchange is over. The gRPC server feeds it and
hands the settlement to the ledger.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import wrappers_pb2

from atlas.ledger.protocol import Settlement
from atlas.pricing import PriceBook
from atlas.requestbody import CHARS_PER_TOKEN, estimate_prompt_tokens
from extproc.sse import SSEDecoder
from extproc.usage import Endpoint, StreamAccountant, Usage, endpoint_for_path, usage_from_json

AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"
#: JSON responses up to this size are BUFFERED by Envoy (below its per-connection limit).
MAX_BUFFERED_RESPONSE_BYTES = 4 << 20
#: A JSON response is copied for counting up to this size; beyond, usage is estimated.
MAX_COPIED_RESPONSE_BYTES = 16 << 20
#: Model names are client input; a header carries a bounded, printable one.
MAX_MODEL_HEADER_CHARS = 256
_FALSE = wrappers_pb2.BoolValue(value=False)

_CONTINUE_REQUEST_HEADERS = ep.ProcessingResponse(
    request_headers=ep.HeadersResponse(
        # Compressed responses would be unreadable to us (and Envoy's decompressor would
        # run after ext_proc on the response path).
        response=ep.CommonResponse(
            header_mutation=ep.HeaderMutation(remove_headers=["accept-encoding"])
        )
    )
)
_CONTINUE_SKIP_REQUEST_BODY = ep.ProcessingResponse()
_CONTINUE_SKIP_REQUEST_BODY.CopyFrom(_CONTINUE_REQUEST_HEADERS)
_CONTINUE_SKIP_REQUEST_BODY.mode_override.request_body_mode = pm.ProcessingMode.NONE
# A non-streamed completion: neither its request body nor its response headers are needed;
# the response body (small: bounded by max_tokens) is read whole. Two messages per request.
_CONTINUE_BODY_ONLY = ep.ProcessingResponse()
_CONTINUE_BODY_ONLY.CopyFrom(_CONTINUE_SKIP_REQUEST_BODY)
_CONTINUE_BODY_ONLY.mode_override.response_header_mode = pm.ProcessingMode.SKIP
_CONTINUE_BODY_ONLY.mode_override.response_body_mode = pm.ProcessingMode.BUFFERED
_PASS_REQUEST_BODY = ep.ProcessingResponse(request_body=ep.BodyResponse())
_PASS_RESPONSE_BODY = ep.ProcessingResponse(response_body=ep.BodyResponse())
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


_SMALL_RESPONSE_ENDPOINTS = (Endpoint.CHAT, Endpoint.COMPLETIONS, Endpoint.RESPONSES)


def _is_error_body(body: bytes | bytearray) -> bool:
    """An OpenAI-style error answer: `{"error": {...}}` (without usage)."""
    head = bytes(body[:64]).lstrip()
    if not head.startswith(b"{") or b'"error"' not in body[:4096]:
        return False
    data = _json_object(bytes(body))
    return data is not None and isinstance(data.get("error"), dict) and "usage" not in data


def _header_safe(value: str) -> str:
    """Printable ASCII only (Envoy rejects control characters in header values), bounded."""
    return "".join(c for c in value[:MAX_MODEL_HEADER_CHARS] if " " <= c <= "~")


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _json_completion_chars(body: bytes) -> int:
    """Generated text in a JSON response without usage, for an estimate."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return 0
    if not isinstance(data, dict):
        return 0
    chars = 0
    for choice in data.get("choices") or []:
        if isinstance(choice, dict):
            msg = choice.get("message")
            if isinstance(msg, dict) and isinstance(msg.get("content"), str):
                chars += len(msg["content"])
            if isinstance(choice.get("text"), str):
                chars += len(choice["text"])
    if isinstance(data.get("output_text"), str):
        chars += len(data["output_text"])
    return chars


@dataclass(slots=True)
class Grant:
    """What authz decided, from its dynamic metadata."""

    key_id: str
    reservation_id: str
    reserved: int
    prompt_estimate: int
    model: str
    tpm: int
    granted_completion: int | None
    degraded: bool  # admitted without Redis: nothing was reserved in the ledger
    body_parsed: bool  # authz read the whole body as JSON (so the flags below are known)
    stream: bool
    include_usage: bool

    @classmethod
    def from_metadata(cls, md: dict[str, Any]) -> Grant | None:
        key_id, rid = md.get("key_id"), md.get("reservation_id")
        if not isinstance(key_id, str) or not isinstance(rid, str) or not key_id or not rid:
            return None

        def num(name: str) -> int:
            v = md.get(name)
            return int(v) if isinstance(v, int | float) else 0

        granted = num("granted_completion")
        model = md.get("model")
        return cls(
            key_id=key_id,
            reservation_id=rid,
            reserved=num("reserved"),
            prompt_estimate=num("prompt_estimate"),
            model=model if isinstance(model, str) else "",
            tpm=num("tpm"),
            granted_completion=granted if granted > 0 else None,
            degraded=md.get("degraded") is True,
            body_parsed=md.get("body_parsed") is True,
            stream=md.get("stream") is True,
            include_usage=md.get("include_usage") is True,
        )


class Exchange:
    def __init__(
        self, *, route_by_model: bool = False, clock: Callable[[], float] = time.monotonic
    ) -> None:
        """:param route_by_model: tell Envoy the body's model (`x-atlas-model`) and have it
        match routes again, for per-model upstream clusters."""
        self._route_by_model = route_by_model
        self._clock = clock
        self.grant: Grant | None = None
        self.endpoint: Endpoint | None = None
        self.model = ""
        self.prompt_estimate = 0
        self.stream = False
        self.injected_usage = False
        self.status = 0
        self.streaming_response = False
        self.headers_skipped = False  # response headers not sent to us (see _CONTINUE_BODY_ONLY)
        self.response_done = False
        self.usage: Usage | None = None
        self.completion_chars = 0
        self.started_at = clock()
        self.first_chunk_at: float | None = None
        self.finished_at: float | None = None
        self._decoder: SSEDecoder | None = None
        self._accountant: StreamAccountant | None = None
        self._json_body = bytearray()
        self._json_overflow = False

    # ---- request path ----------------------------------------------------------------
    def on_request_headers(self, headers: dict[str, str], metadata: dict[str, Any]) -> Any:
        self.grant = Grant.from_metadata(metadata)
        self.endpoint = endpoint_for_path(headers.get(":path", ""))
        g = self.grant
        if g is None:
            return _CONTINUE_REQUEST_HEADERS
        self.model = g.model
        self.prompt_estimate = g.prompt_estimate
        self.stream = g.stream
        needs_body = (
            self._route_by_model
            or g.granted_completion is not None
            or not g.body_parsed
            or (g.stream and not g.include_usage)
        )
        if needs_body:
            return _CONTINUE_REQUEST_HEADERS
        # authz already read this body and there is nothing to change in it: one gRPC round
        # trip less per request.
        if not g.stream and self.endpoint in _SMALL_RESPONSE_ENDPOINTS:
            self.headers_skipped = True
            return _CONTINUE_BODY_ONLY
        return _CONTINUE_SKIP_REQUEST_BODY

    def on_request_body(self, body: bytes) -> Any:
        """BUFFERED: the whole request body. Rewrites it only when Atlas must."""
        if self.grant is None:
            return _PASS_REQUEST_BODY
        data = _json_object(body)
        new: bytes | None = None
        if data is not None:
            if isinstance(data.get("model"), str):
                self.model = data["model"]
            self.prompt_estimate = estimate_prompt_tokens(data)
            self.stream = data.get("stream") is True
            if self._rewrite(data):
                new = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
        if new is None and not self._route_by_model:
            return _PASS_REQUEST_BODY
        common = ep.CommonResponse()
        if new is not None:
            # BUFFERED with headers SENT: Envoy keeps Content-Length; it must match the body.
            common.header_mutation.set_headers.append(_set("content-length", str(len(new))))
            common.body_mutation.body = new
        if self._route_by_model:
            # authz removed any client-sent x-atlas-* header; the route follows the body.
            if self.model:
                common.header_mutation.set_headers.append(
                    _set("x-atlas-model", _header_safe(self.model))
                )
            common.clear_route_cache = True
        return ep.ProcessingResponse(request_body=ep.BodyResponse(response=common))

    def _rewrite(self, data: dict[str, Any]) -> bool:
        """Apply Atlas's request changes to `data`; whether anything changed."""
        changed = False
        opts = data.get("stream_options")
        if (
            self.stream
            and self.endpoint in (Endpoint.CHAT, Endpoint.COMPLETIONS)
            and not (isinstance(opts, dict) and opts.get("include_usage") is True)
        ):
            # Ask the upstream for exact usage; the extra chunk is stripped on the way back.
            data["stream_options"] = {
                **(opts if isinstance(opts, dict) else {}),
                "include_usage": True,
            }
            self.injected_usage = True
            changed = True
        assert self.grant is not None
        if self.grant.granted_completion is not None:
            fields = ("max_completion_tokens", "max_tokens", "max_output_tokens")
            field = next((f for f in fields if f in data), "max_tokens")
            data[field] = self.grant.granted_completion
            changed = True
        return changed

    # ---- response path ---------------------------------------------------------------
    def on_response_headers(self, headers: dict[str, str], end_of_stream: bool) -> Any:
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
            self.streaming_response = True
            self._decoder = SSEDecoder()
            self._accountant = StreamAccountant(self.endpoint or Endpoint.CHAT)
            reply.mode_override.CopyFrom(_mode(pm.ProcessingMode.STREAMED))
        else:
            # A JSON body with a known, modest length is read whole (Envoy keeps its
            # Content-Length); anything else streams past in chunks that we copy, since a
            # body over Envoy's buffer limit in BUFFERED mode would fail the response.
            length = headers.get("content-length", "")
            small = length.isdigit() and int(length) <= MAX_BUFFERED_RESPONSE_BYTES
            mode = pm.ProcessingMode.BUFFERED if small else pm.ProcessingMode.STREAMED
            reply.mode_override.CopyFrom(_mode(mode))
        return reply

    def on_response_body(self, body: bytes, end_of_stream: bool) -> Any:
        if self._decoder is None or self._accountant is None:
            if len(self._json_body) + len(body) <= MAX_COPIED_RESPONSE_BYTES:
                self._json_body += body
            else:
                self._json_overflow = True  # too big to parse: the estimate stands
            if end_of_stream and self._json_overflow:
                self.response_done = True
                self._json_body.clear()
            elif end_of_stream:
                self.response_done = True
                if self.headers_skipped and _is_error_body(self._json_body):
                    self.status = 599  # no status seen: an OpenAI error body is the sign
                self.usage = usage_from_json(bytes(self._json_body))
                if self.usage is None:
                    self.completion_chars = _json_completion_chars(bytes(self._json_body))
                self._json_body.clear()
            return _PASS_RESPONSE_BODY
        if self.first_chunk_at is None and body:
            self.first_chunk_at = self._clock()
        events = self._decoder.feed(body)
        if end_of_stream:
            events += self._decoder.flush()
            self.response_done = True
            self.finished_at = self._clock()
        acc = self._accountant
        out: list[bytes] = []
        for ev in events:
            usage_only = acc.observe(ev)
            if not (self.injected_usage and usage_only):
                out.append(ev.raw)
        self.usage = acc.usage
        self.completion_chars = acc.content_chars
        if not self.injected_usage:
            return _PASS_RESPONSE_BODY
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
            prompt = self.prompt_estimate
            completion = math.ceil(self.completion_chars / CHARS_PER_TOKEN)
            exact = False
        prompt, completion = max(0, prompt), max(0, completion)
        model = self.model or g.model
        return Settlement(
            key_id=g.key_id,
            reservation_id=g.reservation_id,
            prompt_tokens=prompt,
            completion_tokens=completion,
            model=model,
            exact=exact,
            outcome=outcome,
            tokens_per_minute=g.tpm,
            cost_micros=prices.cost_micros(model, prompt, completion) if prices else 0,
        )
