"""The ext_proc replies an exchange sends Envoy: prebuilt where they never vary (most of
them: built once, not per message), and builders for the few that carry a body or headers.

A prebuilt reply is shared by every exchange; nothing may mutate one.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2 as pm
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from google.protobuf import wrappers_pb2

from atlas.grant import EXTPROC_NAMESPACE, GRANT_HEADER, MODEL_HEADER, OWNER_KEY, ProcMode

#: Model names are client input; a header carries a bounded, printable one.
MAX_MODEL_HEADER_CHARS = 256
_FALSE = wrappers_pb2.BoolValue(value=False)


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


def request_headers_reply(mode: str | None) -> ep.ProcessingResponse:
    """The reply to the request headers of an exchange whose grant says `mode` (None: no
    grant): the grant header removed, the processing mode set for the rest."""
    return _HEADERS_REPLIES[mode]


PASS_REQUEST_BODY = ep.ProcessingResponse(request_body=ep.BodyResponse())
PASS_RESPONSE_BODY = ep.ProcessingResponse(response_body=ep.BodyResponse())
# ProcMode.JSON's body reached extproc (too big, or without a length, for json_to_metadata):
# the access-log settler leaves this exchange to extproc (extproc/accesslog.py).
PASS_OWNED_RESPONSE_BODY = ep.ProcessingResponse(response_body=ep.BodyResponse())
PASS_OWNED_RESPONSE_BODY.dynamic_metadata.update({EXTPROC_NAMESPACE: {OWNER_KEY: 1}})
CLEAR_RESPONSE_BODY = ep.ProcessingResponse(
    response_body=ep.BodyResponse(
        response=ep.CommonResponse(body_mutation=ep.BodyMutation(clear_body=True))
    )
)


def response_headers_reply(body_mode: int) -> ep.ProcessingResponse:
    """The reply to the response headers: how Envoy sends the response body (NONE:
    not at all)."""
    reply = ep.ProcessingResponse(response_headers=ep.HeadersResponse())
    reply.mode_override.CopyFrom(pm.ProcessingMode(response_body_mode=body_mode))
    return reply


def _set(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()), append=_FALSE
    )


def _header_safe(value: str) -> str:
    """Printable ASCII only (Envoy rejects control characters in header values), bounded."""
    return "".join(c for c in value[:MAX_MODEL_HEADER_CHARS] if " " <= c <= "~")


def request_body_reply(
    new_body: bytes | None, *, route_model: str | None = None
) -> ep.ProcessingResponse:
    """The reply to a BUFFERED request body: `new_body` replaces it (None: unchanged).
    :param route_model: when not None, Envoy is told the body's model (`x-atlas-model`,
        unless empty) and matches routes again."""
    common = ep.CommonResponse()
    if new_body is not None:
        # BUFFERED: Envoy holds the headers and keeps Content-Length; it must match.
        common.header_mutation.set_headers.append(_set("content-length", str(len(new_body))))
        common.body_mutation.body = new_body
    if route_model is not None:
        # authz removed any client-sent x-atlas-* header; the route follows the body.
        if route_model:
            common.header_mutation.set_headers.append(_set(MODEL_HEADER, _header_safe(route_model)))
        common.clear_route_cache = True
    return ep.ProcessingResponse(request_body=ep.BodyResponse(response=common))


def response_body_reply(new_body: bytes) -> ep.ProcessingResponse:
    """A streamed response chunk replaced by `new_body`."""
    return ep.ProcessingResponse(
        response_body=ep.BodyResponse(
            response=ep.CommonResponse(body_mutation=ep.BodyMutation(body=new_body))
        )
    )
