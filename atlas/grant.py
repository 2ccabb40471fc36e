"""The authz -> Envoy -> extproc contract: what authz decided about a request, how it travels.

authz answers Envoy (over HTTP or gRPC ext_authz) with a *grant*; Envoy keeps it as dynamic
metadata in the ext_authz namespace and forwards it to extproc with its messages
(`metadata_options.forwarding_namespaces`). Over HTTP, Envoy can only turn response headers
into string metadata (`dynamic_metadata_from_headers`), so the grant is one compact JSON text
in one header (`x-atlas-grant`) on both protocols: one encoder, one decoder, one place to
rename a field.

Header names that cross Envoy between Atlas's services live here too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from atlas.limits import MAX_END_USER_CHARS

#: The ext_authz filter's dynamic metadata namespace (its filter name).
AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"
#: json_to_metadata's namespace (Envoy -> the access log -> extproc): the usage it lifted.
USAGE_NAMESPACE = "atlas.usage"
#: extproc -> Envoy -> the access log: `owner` when extproc's `json` filter saw the body
#: (the access-log settler then leaves the exchange to it).
EXTPROC_NAMESPACE = "atlas.extproc"
OWNER_KEY = "owner"
#: Every header Atlas's services pass each other starts so (a client's are removed).
ATLAS_HEADER_PREFIX = "x-atlas-"
#: authz -> Envoy (-> dynamic metadata): the grant's JSON text.
GRANT_HEADER = "x-atlas-grant"
#: authz -> upstream: who is calling, at what priority.
KEY_ID_HEADER = "x-atlas-key-id"
PRIORITY_HEADER = "x-atlas-priority"
#: client (an internal app without mTLS) -> authz: its app id and shared secret; and the end
#: user an app attributes a request to (OpenAI's body `user` is read too). Never forwarded.
APP_ID_HEADER = "x-atlas-app-id"
APP_SECRET_HEADER = "x-atlas-app-secret"
END_USER_HEADER = "x-atlas-end-user"
#: Envoy -> authz: the verified client certificate of an mTLS connection (Envoy's HCM sets it
#: with forward_client_cert_details SANITIZE_SET, replacing any a client sent).
XFCC_HEADER = "x-forwarded-client-cert"
#: authz -> client, on a refused admission: which limit was hit (`key.daily`, `team.daily`, ...).
LIMIT_HEADER = "x-atlas-limit"
#: authz -> Envoy: which ext_proc configuration serves this exchange (see `ProcMode`).
PROC_HEADER = "x-atlas-proc"
#: On a duplicate answered from the stored response of its Idempotency-Key.
IDEMPOTENT_REPLAY_HEADER = "x-atlas-idempotent-replay"
#: authz -> client, on admission without the ledger.
DEGRADED_HEADER = "x-atlas-degraded"
#: authz (and Envoy's own local replies, by local_reply_config) -> client: why a request was
#: refused (the error code, or `gateway`). ext_proc skips responses that carry it.
REFUSAL_HEADER = "x-atlas-refusal"
#: authz -> Envoy (a request header for the provider routes, and dynamic metadata for the
#: access log that reports what the provider did): the provider chosen (atlas/providers).
PROVIDER_HEADER = "x-atlas-provider"
#: extproc -> Envoy: the body's model, for per-model routes.
MODEL_HEADER = "x-atlas-model"
#: Envoy -> authz: set by ext_authz when the body it forwarded is cut at max_request_bytes.
PARTIAL_BODY_HEADER = "x-envoy-auth-partial-body"
#: authz -> Envoy (HTTP ext_authz): request headers to remove, comma separated.
HEADERS_TO_REMOVE_HEADER = "x-envoy-auth-headers-to-remove"

_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode

#: Model names are client input; the grant carries a bounded prefix (the ledger folds names).
MAX_GRANT_MODEL_CHARS = 256
#: Provider and member ids are config names (atlas/providers/config.py NAME): 48 characters.
MAX_GRANT_NAME_CHARS = 48
#: End-user ids are client input (a header or OpenAI's `user` field): a bounded prefix.
MAX_GRANT_USER_CHARS = MAX_END_USER_CHARS


class ProcMode:
    """How much of an exchange extproc must see, chosen by authz per request.

    - `rewrite`: the request body changes (usage injection, clamp, model routing): request
      body BUFFERED, then the response.
    - `observe`: nothing on the request changes: no request-phase message; response headers
      and body as they come (a stream whose usage the client asked for itself).
    - `json`: a non-streamed completion that needs no rewrite: only its response body.
    - `sse`: a stream whose usage the client asked for, with `stream_usage_from_envoy`:
      Envoy's sse_to_metadata reads its usage for the access log; no ext_proc at all.
    - `splice`: a chat/completions stream whose only change is Atlas's `include_usage`, with
      access-log settlement: Envoy's Lua filter (envoy/stream_splice.lua) adds it, cuts the
      usage chunk out and lifts its usage for the access log; no ext_proc at all.
    - `none`: nothing to account (global shadow mode refused it before the ledger).

    Envoy runs the `rewrite` configuration for any other value, or none: an exchange is
    never left unaccounted because the header went missing.
    """

    REWRITE = "rewrite"
    OBSERVE = "observe"
    JSON = "json"
    SSE = "sse"
    SPLICE = "splice"
    NONE = "none"


#: The modes Envoy's access log settles whatever Settings.settle_from_access_log says (they
#: exist only in a bootstrap that settles from it).
ALWAYS_LOGGED = frozenset((ProcMode.SSE, ProcMode.SPLICE))


@dataclass(slots=True)
class Grant:
    """What authz decided for one admitted request."""

    key_id: str
    reservation_id: str
    reserved: int
    prompt_estimate: int
    model: str = ""
    tpm: int = 0
    #: Per-choice completion limit authz clamped the request to (None: not clamped).
    granted_completion: int | None = None
    #: Admitted without Redis: nothing was reserved in the ledger.
    degraded: bool = False
    #: authz read the whole body as JSON, so `stream` and `include_usage` are known.
    body_parsed: bool = False
    stream: bool = False
    include_usage: bool = False
    priority: str = "normal"
    shadow_decision: str = ""
    route: str = ""
    choices: int = 1
    #: The upstream reports usage on every chunk when asked (vLLM's
    #: `stream_options.continuous_usage_stats`): extproc asks, so a hang-up is charged exactly.
    continuous_usage: bool = False
    #: The provider and pool member authz chose (atlas/providers; "" without providers).
    provider: str = ""
    member: str = ""
    #: Who is accounted: the key's team, the app the mesh identified, and the end user the
    #: caller named (header or the body's `user`); "" when none.
    team: str = ""
    app: str = ""
    end_user: str = ""
    #: The request's idempotency key tag (atlas/idempotency.py): extproc keeps the response
    #: for duplicates ("" when the client sent no Idempotency-Key).
    idempotency: str = ""

    def encode(self) -> str:
        """Printable ASCII JSON (a header value): non-ASCII and control characters escaped.
        Read field by field: `dataclasses.asdict` deep-copies each value (~25 µs a Check)."""
        d = {name: getattr(self, name) for name in _GRANT_FIELDS}
        d["model"] = self.model[:MAX_GRANT_MODEL_CHARS]
        d["end_user"] = self.end_user[:MAX_GRANT_USER_CHARS]
        return _ENCODE(d)

    @classmethod
    def decode(cls, text: str) -> Grant | None:
        """The grant in `text`, or None for anything that is not one (never raises)."""
        try:
            d = json.loads(text)
        except (ValueError, RecursionError):
            return None
        return cls.from_dict(d) if isinstance(d, dict) else None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Grant | None:
        key_id, rid = d.get("key_id"), d.get("reservation_id")
        if not isinstance(key_id, str) or not isinstance(rid, str) or not key_id or not rid:
            return None

        def num(name: str) -> int:
            v = d.get(name)
            return int(v) if isinstance(v, int | float) and not isinstance(v, bool) else 0

        def text(name: str) -> str:
            v = d.get(name)
            return v if isinstance(v, str) else ""

        granted = num("granted_completion")
        return cls(
            key_id=key_id,
            reservation_id=rid,
            reserved=num("reserved"),
            prompt_estimate=num("prompt_estimate"),
            model=text("model")[:MAX_GRANT_MODEL_CHARS],
            tpm=num("tpm"),
            granted_completion=granted if granted > 0 else None,
            degraded=d.get("degraded") is True,
            body_parsed=d.get("body_parsed") is True,
            stream=d.get("stream") is True,
            include_usage=d.get("include_usage") is True,
            priority=text("priority") or "normal",
            shadow_decision=text("shadow_decision"),
            route=text("route"),
            choices=max(1, num("choices")),
            continuous_usage=d.get("continuous_usage") is True,
            provider=text("provider")[:MAX_GRANT_NAME_CHARS],
            member=text("member")[:MAX_GRANT_NAME_CHARS],
            team=text("team")[:MAX_GRANT_NAME_CHARS],
            app=text("app")[:MAX_GRANT_NAME_CHARS],
            end_user=text("end_user")[:MAX_GRANT_USER_CHARS],
            idempotency=text("idempotency")[:32],
        )


_GRANT_FIELDS = tuple(f.name for f in fields(Grant))

#: Endpoints whose streams Atlas asks for usage (stream_options.include_usage).
_USAGE_INJECTED_ROUTES = frozenset(("chat", "completions"))
#: Non-streamed endpoints whose response extproc reads without its headers (ProcMode.JSON).
_JSON_ROUTES = frozenset(("chat", "completions", "responses"))


def proc_mode(
    grant: Grant, *, route_by_model: bool, sse_usage: bool = False, splice: bool = False
) -> str:
    """The ext_proc configuration an exchange needs (see `ProcMode`): authz names it for
    Envoy's matchers; extproc applies it itself when Envoy sends it the request headers
    (`sse_usage` and `splice` False there: a stream that reaches extproc is one it reads)."""
    return proc_mode_for(
        route=grant.route,
        body_parsed=grant.body_parsed,
        stream=grant.stream,
        include_usage=grant.include_usage,
        clamped=grant.granted_completion is not None,
        route_by_model=route_by_model,
        continuous_usage=grant.continuous_usage,
        idempotent=bool(grant.idempotency),
        sse_usage=sse_usage,
        splice=splice,
    )


def proc_mode_for(
    *,
    route: str,
    body_parsed: bool,
    stream: bool,
    include_usage: bool,
    clamped: bool,
    route_by_model: bool,
    continuous_usage: bool = False,
    idempotent: bool = False,
    sse_usage: bool = False,
    splice: bool = False,
) -> str:
    """:param sse_usage: Settings.stream_usage_from_envoy (Envoy reads a stream's usage).
    :param splice: Envoy's Lua filter may add `include_usage` to this body
        (authz/access_logged.py)."""
    if not body_parsed:
        # Not an LLM body (GET /v1/models, extra endpoints), or one authz could not read:
        # extproc reads it (or, with nothing to read, waits for the response).
        return ProcMode.OBSERVE if route not in _JSON_ROUTES else ProcMode.REWRITE
    rewrite = (
        route_by_model
        or clamped
        or (stream and route in _USAGE_INJECTED_ROUTES and (continuous_usage or not include_usage))
    )
    if rewrite:
        only_usage = not (route_by_model or clamped or continuous_usage or idempotent)
        return ProcMode.SPLICE if splice and only_usage else ProcMode.REWRITE
    if not stream and route in _JSON_ROUTES and not idempotent:
        # An idempotent request's response is kept for its duplicates: extproc must see it.
        return ProcMode.JSON
    if stream and sse_usage and route in _USAGE_INJECTED_ROUTES and not idempotent:
        # The client asked for usage (else: rewrite above): its last chunk carries it.
        return ProcMode.SSE
    return ProcMode.OBSERVE
