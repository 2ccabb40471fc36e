"""One HTTP exchange as ext_proc sees it: the state between Envoy's messages.

`Exchange` is pure (no I/O): each `on_*` method takes an Envoy message and returns the reply
(`extproc.replies`); `settlement()` says what to charge once the exchange is over
(`extproc.settlement`). The gRPC server feeds it and hands the settlement to the ledger.
Request bodies are rewritten by `extproc.rewrite`; usage is read by the accountants of
`extproc.json_usage` and `extproc.stream_usage`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm

from atlas.grant import GRANT_HEADER, Grant, proc_mode
from atlas.jsonbound import loads_bounded
from atlas.ledger.protocol import Settlement
from atlas.modelnames import ModelNames
from atlas.pricing import PriceBook
from atlas.requestbody import bytes_estimate, estimate_prompt_tokens, lax_bool
from extproc import replies
from extproc.json_usage import JsonBodyAccountant
from extproc.kept_response import KeptResponse
from extproc.rewrite import rewrite_request
from extproc.settlement import counted_settlement
from extproc.sse import SSEDecoder
from extproc.stream_usage import StreamAccountant
from extproc.usage import Endpoint, Usage, endpoint_for_path

#: JSON responses up to this size are BUFFERED by Envoy (below its per-connection limit).
MAX_BUFFERED_RESPONSE_BYTES = 4 << 20
#: A JSON response up to this size is kept whole and parsed (with bounded work); beyond, only
#: its usage object is kept (scanned for as it passes) or its bytes are the estimate.
MAX_COPIED_RESPONSE_BYTES = 4 << 20
#: Every exchange folds its model names through one bounded set, unless given its own.
_DEFAULT_MODEL_NAMES = ModelNames()
_ENDPOINTS = {e.value: e for e in Endpoint}


class Exchange:
    def __init__(
        self,
        *,
        route_by_model: bool = False,
        clock: Callable[[], float] = time.monotonic,
        models: ModelNames | None = None,
        keep_max: int = 1 << 20,
    ) -> None:
        """:param keep_max: the largest response kept for an idempotent request's duplicates.
        :param route_by_model: tell Envoy the body's model (`x-atlas-model`) and have it
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
        self._keep_max = keep_max
        self.kept: KeptResponse | None = None

    # ---- request path ----------------------------------------------------------------
    def start(self, grant: Grant | None, path: str = "") -> None:
        """The exchange's grant, from the first message that carries Envoy's metadata (which
        message that is depends on the ext_proc configuration authz chose)."""
        self.grant = grant
        if grant is None:
            self.endpoint = endpoint_for_path(path) if path else None
            return
        self.endpoint = _ENDPOINTS.get(grant.route) or (endpoint_for_path(path) if path else None)
        if grant.idempotency:
            self.kept = KeptResponse(self._keep_max)
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
        return replies.request_headers_reply(mode)

    def on_request_body(self, body: bytes) -> Any:
        """BUFFERED: the whole request body. Rewrites it only when Atlas must, by splicing.

        When authz parsed the body, its metadata says all we need and the body is not parsed
        again; otherwise it is parsed with bounded work, and a body too costly to parse is
        passed as it is (estimated by its size, settled from the response)."""
        g = self.grant
        if g is None:
            return replies.PASS_REQUEST_BODY
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
        new = None
        if data is not None or g.body_parsed:
            new, self.injected_usage = rewrite_request(
                body,
                data,
                endpoint=self.endpoint,
                stream=self.stream,
                include_usage=include_usage,
                continuous_usage=g.continuous_usage,
                granted_completion=g.granted_completion,
            )
        if not self._route_by_model:
            return replies.PASS_REQUEST_BODY if new is None else replies.request_body_reply(new)
        return replies.request_body_reply(new, route_model=self.model)

    # ---- response path ---------------------------------------------------------------
    def on_response_headers(self, headers: dict[str, str], end_of_stream: bool) -> Any:
        self.headers_seen = True
        try:
            self.status = int(headers.get(":status", "0"))
        except ValueError:
            self.status = 0
        ctype = headers.get("content-type", "").lower()
        if self.grant is None or end_of_stream or self.status >= 400:
            # Nothing to count (local reply, no body, or an error that is refunded).
            self.response_done = end_of_stream
            return replies.response_headers_reply(pm.ProcessingMode.NONE)
        if ctype.startswith("text/event-stream"):
            self._start_stream()
            return replies.response_headers_reply(pm.ProcessingMode.STREAMED)
        # A JSON body with a known, modest length is read whole (Envoy keeps its
        # Content-Length); anything else streams past in chunks, since a body over Envoy's
        # buffer limit in BUFFERED mode would fail the response.
        length = headers.get("content-length", "")
        small = length.isdigit() and int(length) <= MAX_BUFFERED_RESPONSE_BYTES
        self._json = JsonBodyAccountant(MAX_COPIED_RESPONSE_BYTES)
        return replies.response_headers_reply(
            pm.ProcessingMode.BUFFERED if small else pm.ProcessingMode.STREAMED
        )

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
                return replies.PASS_RESPONSE_BODY
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
            if self.kept is not None:
                self.kept.add(body)
            return replies.PASS_RESPONSE_BODY
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
            if self.kept is not None:
                self.kept.add(body)
            return replies.PASS_RESPONSE_BODY if body else replies.CLEAR_RESPONSE_BODY
        # Re-emit only whole events, so the usage chunk we caused can be cut out exactly;
        # a partial event waits in the decoder for its next chunk.
        new = b"".join(out)
        if self.kept is not None:
            self.kept.add(new)
        if not new:
            return replies.CLEAR_RESPONSE_BODY
        if new == body:
            return replies.PASS_RESPONSE_BODY
        return replies.response_body_reply(new)

    def _on_json_body(self, body: bytes, end_of_stream: bool) -> Any:
        reply = replies.PASS_RESPONSE_BODY
        if self._json is None:
            # ProcMode.JSON: the body without its headers (or one Envoy sends without our
            # asking: counted all the same).
            self.headers_skipped = not self.headers_seen
            self._json = JsonBodyAccountant(MAX_COPIED_RESPONSE_BYTES)
            if self.headers_skipped:
                reply = replies.PASS_OWNED_RESPONSE_BODY
        acc = self._json
        acc.feed(body)
        if self.kept is not None:
            self.kept.add(body)
        if end_of_stream:
            self.response_done = True
            self.usage, self.completion_estimate = acc.result()
            if self.headers_skipped and acc.is_error:
                self.status = 599  # no status seen: an OpenAI error body is the sign
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
        s = counted_settlement(
            g,
            model=self._models.fold(self.model or g.model),
            status=self.status,
            done=self.response_done,
            usage=self.usage,
            prompt_seen=self._accountant.prompt_seen if self._accountant is not None else None,
            prompt_estimate=self.prompt_estimate,
            completion_estimate=self._estimated_completion,
            prices=prices,
        )
        if s is None or self.kept is None:
            return s
        what, response = self.kept.outcome(
            completed=self.response_done and self.status < 400,  # 599: an error body
            content_type="text/event-stream" if self.streaming_response else "application/json",
        )
        return replace(s, idempotency_tag=g.idempotency, idempotency=what, response=response)
