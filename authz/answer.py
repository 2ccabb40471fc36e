"""What authz tells Envoy about an admitted request, whatever the protocol (HTTP or gRPC).

`admitted()` turns a `Verdict` into an `Answer`: headers for the upstream, client headers to
remove, headers for the client's response, the grant for extproc and the ext_proc mode. The
protocol modules only spell it (`authz.http_server`, `authz.server`).
"""

from __future__ import annotations

import fnmatch
import functools
import logging
import time
from dataclasses import dataclass, field

from atlas.credentials import CLIENT_KEY_HEADERS
from atlas.errors import Denied
from atlas.grant import (
    ATLAS_HEADER_PREFIX,
    DEGRADED_HEADER,
    GRANT_HEADER,
    KEY_ID_HEADER,
    PRIORITY_HEADER,
    PROVIDER_HEADER,
    Grant,
    ProcMode,
    proc_mode,
)
from atlas.metrics import DECISIONS
from atlas.settings import Settings
from authz.policy import Authorizer, CheckInput, Verdict
from authz.refusals import ratelimit_header_list, refusal_record

log = logging.getLogger("atlas.authz")

#: Removed from every admitted request: compressed responses would be unreadable to extproc
#: (Envoy's decompressor would run after ext_proc on the response path).
_ALWAYS_REMOVED = ("accept-encoding",)


@dataclass(slots=True)
class Answer:
    upstream_headers: list[tuple[str, str]] = field(default_factory=list)
    remove_headers: list[str] = field(default_factory=list)
    client_headers: list[tuple[str, str]] = field(default_factory=list)
    grant: Grant | None = None
    proc: str = ProcMode.REWRITE


def _normalized(name: str) -> str:
    # Upstreams that fold `_` into `-` (gunicorn, Werkzeug, CGI-style servers) would read
    # `x_atlas_key_id` as ours.
    return name.lower().replace("_", "-")


#: What a header name is to `client_headers_to_remove`: 0 nothing, 1 posing as Atlas, 2 a
#: carrier of the client's key. Kept per name (clients send the same few), bounded.
_KINDS: dict[str, int] = {}
MAX_KNOWN_HEADER_NAMES = 4096


def _kind(name: str) -> int:
    kind = _KINDS.get(name)
    if kind is None:
        n = _normalized(name)
        if n.startswith(ATLAS_HEADER_PREFIX) or n == "x-request-priority":
            kind = 1
        else:
            kind = 2 if n in CLIENT_KEY_HEADERS else 0
        if len(_KINDS) >= MAX_KNOWN_HEADER_NAMES:
            _KINDS.clear()
        _KINDS[name] = kind
    return kind


def client_headers_to_remove(headers: dict[str, str], *, strip_key: bool) -> list[str]:
    """Client headers that must not reach the upstream: anything posing as Atlas
    (`x-atlas-*` in any spelling), the raw `x-request-priority` (Atlas sends the capped
    `x-atlas-priority`), and with `strip_key` every header that can carry the client's key."""
    kinds = _KINDS
    remove = []
    for h in headers:
        kind = kinds.get(h)
        if kind is None:
            kind = _kind(h)
        if kind == 1 or (kind == 2 and strip_key):
            remove.append(h)
    return remove


#: Headers `admitted` sets on the upstream request (with an upstream credential of Atlas's
#: own, `authorization` too) and the grant: never also removed.
_SET = frozenset((KEY_ID_HEADER, PRIORITY_HEADER, GRANT_HEADER))
_SET_WITH_CREDENTIAL = _SET | {"authorization"}


@functools.lru_cache(maxsize=4096)
def continuous_usage(patterns: tuple[str, ...], model: str) -> bool:
    """Whether `model`'s upstream takes `stream_options.continuous_usage_stats` (vLLM)."""
    return any(fnmatch.fnmatchcase(model, p) for p in patterns)


INTERNAL_ERROR = Denied(
    500, "Internal error in the rate limiter.", type="server_error", code="internal_error"
)
#: Looked up once: counted on every admitted Check.
_ADMITTED = DECISIONS.labels(service="authz", decision="ok")


async def decide(authorizer: Authorizer, inp: CheckInput) -> Verdict | Denied:
    """The policy's verdict, or the refusal to answer (an unexpected error is a 500); each
    decision is counted. Both protocols spell what this returns."""
    try:
        verdict = await authorizer.check(inp)
    except Denied as d:
        DECISIONS.labels(service="authz", decision=d.code or str(d.status)).inc()
        if authorizer.requests is not None:
            authorizer.requests.add(refusal_record(inp.headers, d, time.time()))
        return d
    except Exception:
        log.exception("Check failed")
        DECISIONS.labels(service="authz", decision="internal_error").inc()
        return INTERNAL_ERROR
    _ADMITTED.inc()
    return verdict


def admitted(v: Verdict, inp: CheckInput, settings: Settings) -> Answer:
    # With an upstream credential of our own, the client's key is never needed upstream.
    strip_key = (
        settings.strip_client_key or settings.upstream_api_key is not None or v.upstream is not None
    )
    remove = client_headers_to_remove(inp.headers, strip_key=strip_key)
    if v.key is None or v.admission is None:  # global shadow mode, refused before the ledger
        return Answer(remove_headers=remove, proc=ProcMode.NONE)
    up = [(KEY_ID_HEADER, v.key.id), (PRIORITY_HEADER, v.priority)]
    ours = _SET
    choice = v.upstream
    # The default upstream's credential goes to the default upstream only.
    if settings.upstream_api_key is not None and choice is None:
        up.append(("authorization", "Bearer " + settings.upstream_api_key.get_secret_value()))
        ours = _SET_WITH_CREDENTIAL
    if choice is not None:
        # The provider's route, and its own credential (never the client's, never another's).
        up.append((PROVIDER_HEADER, choice.provider))
        ours = ours | {PROVIDER_HEADER}
        if choice.credential is not None:
            up.append(choice.credential)
            ours = ours | {choice.credential[0]}
    # Envoy applies removals after sets: a header we set must not also be removed (the grant:
    # meshes whose ext_authz cannot make metadata pass it to extproc as a request header, set
    # over any client's; Atlas's bootstrap removes a client's at the router).
    if remove:
        remove = [h for h in remove if h not in ours]
    for h in _ALWAYS_REMOVED:
        if h in inp.headers:
            remove.append(h)
    a = v.admission
    req = v.request
    grant = Grant(
        key_id=v.key.id,
        reservation_id=v.reservation_id,
        reserved=a.reserved,
        prompt_estimate=req.prompt_tokens,
        model=req.model,
        tpm=v.key.tokens_per_minute or 0,
        granted_completion=a.granted_completion,
        degraded=v.degraded,
        # What the body holds, so extproc can skip reading it when it needs nothing there.
        body_parsed=req.parsed,
        stream=req.stream,
        include_usage=req.include_usage,
        priority=v.priority,
        shadow_decision=v.shadow_reason,
        route=v.route,
        choices=req.choices,
        provider=choice.provider if choice is not None else "",
        member=choice.member if choice is not None else "",
        team=v.key.team or "",
        app=v.key.app or "",
        end_user=v.end_user,
        idempotency=v.idempotency,
        continuous_usage=req.stream
        and settings.continuous_usage_models != []
        and continuous_usage(tuple(settings.continuous_usage_models), req.model),
    )
    if v.degraded:
        client = [(DEGRADED_HEADER, "ledger-unavailable")]
    else:
        client = ratelimit_header_list(a, v.key)
    return Answer(
        upstream_headers=up,
        remove_headers=remove,
        client_headers=client,
        grant=grant,
        proc=proc_mode(
            grant,
            route_by_model=bool(settings.model_routes),
            sse_usage=settings.stream_usage_from_envoy,
            splice=v.spliceable,
        ),
    )
