"""Which exchanges Envoy settles without extproc, from its access log (extproc/accesslog.py),
and so are admitted `unattended` (no ext_proc stream will claim their reservation).

`spliceable` says whether Envoy's Lua filter may add `include_usage` to a request body by
itself (ProcMode.SPLICE, envoy/stream_splice.lua): the script appends one member before the
body's last `}`, blindly, so authz first checks that is all the body needs. Anything else (a
client's own `stream_options` to merge, UTF-16/32 or a BOM to re-encode, a chunked request
whose length the script would have to invent) stays with extproc's rewrite.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from atlas.grant import ALWAYS_LOGGED, ProcMode, proc_mode_for
from atlas.ledger.protocol import UNATTENDED, UNATTENDED_STREAM

if TYPE_CHECKING:
    from atlas.requestbody import LLMRequest
    from atlas.settings import Settings
    from authz.policy import CheckInput

_BLANKS = b" \t\r\n"
_OPTIONS = b'"stream_options"'  # inside a JSON string its quotes are escaped: a real key


def spliceable(inp: CheckInput) -> bool:
    """The body is one non-empty UTF-8 JSON object, whole, with a Content-Length and no
    stream_options (authz parsed it as JSON before asking)."""
    body = inp.body
    if not inp.body_complete or "content-length" not in inp.headers or _OPTIONS in body:
        return False
    start = 0
    while start < len(body) and body[start] in _BLANKS:
        start += 1
    end = len(body)
    while end > start and body[end - 1] in _BLANKS:
        end -= 1
    # `{` first: UTF-8 without a BOM (UTF-16/32 put a NUL next to it, a BOM comes before it).
    if end - start < 2 or body[start] != 0x7B or body[end - 1] != 0x7D:
        return False
    inner = end - 1
    while inner > start and body[inner - 1] in _BLANKS:
        inner -= 1
    return inner - 1 > start  # not `{}`: the script's member starts with a comma


def unattended(
    settings: Settings, route: str, req: LLMRequest, *, idempotent: bool, splice: bool
) -> int:
    """AdmitRequest.unattended for a request about to be admitted: a stream Envoy settles
    (sse, splice) holds its reservation for the TTL, a plain completion (json) for the claim
    timeout; 0 when an ext_proc stream will claim it. Decided before admission, so as if not
    clamped: a clamped request goes to extproc, whose claim then renews it.

    :param splice: access-log settlement is on and the body is `spliceable`."""
    mode = proc_mode_for(
        route=route,
        body_parsed=req.parsed,
        stream=req.stream,
        include_usage=req.include_usage,
        clamped=False,
        route_by_model=bool(settings.model_routes),
        idempotent=idempotent,
        sse_usage=settings.stream_usage_from_envoy,
        splice=splice,
    )
    if mode in ALWAYS_LOGGED:
        return UNATTENDED_STREAM
    return UNATTENDED if mode == ProcMode.JSON and settings.settle_from_access_log else 0
