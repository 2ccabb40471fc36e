"""The admission decision, free of gRPC: identify the key, pick the priority, estimate the
tokens, run the ledger's admit script, and say yes (a `Verdict`) or no (`Denied`)."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from atlas import metrics
from atlas.credentials import client_key
from atlas.errors import Denied, LedgerUnavailable
from atlas.grant import (
    APP_ID_HEADER,
    APP_SECRET_HEADER,
    END_USER_HEADER,
    XFCC_HEADER,
)
from atlas.idempotency import request_tags
from atlas.identity import MAX_APP_SECRET_CHARS, app_secret_hash, principal_hash, xfcc_principal
from atlas.keymodel import KeyRecord, cap_priority, end_user_tag, hash_secret
from atlas.ledger.protocol import Admission, Admissions, AdmitRequest, LedgerInputError
from atlas.limits import MAX_END_USER_CHARS, MAX_RESERVATION_TOKENS
from atlas.local_limiter import LocalLimiter
from atlas.modelnames import ModelNames
from atlas.pricing import PriceBook
from atlas.providers.routing import Choice, ProviderRouter
from atlas.requestbody import LLMRequest, parse_llm_request
from atlas.requestlog_writer import RequestLogWriter
from atlas.settings import PRIORITIES, Priority, Settings
from authz.access_logged import spliceable, unattended
from authz.bodyparse import BodyParser
from authz.endpoints import GEMINI, Endpoints, Route, gemini_call, request_path
from authz.keycache import KeyCache
from authz.refusals import count_refusal, refusal
from authz.reservation_ids import ReservationIds
from authz.shedding import Shedder

#: Without max_tokens a request reserves this share of the daily limit (Atlas's defaults),
#: capped by `max_reservation`.
DEFAULT_RESERVATION_SHARE: dict[str, float] = {
    "low": 0.05,
    "normal": 0.10,
    "high": 0.20,
    "critical": 0.30,
}


@dataclass(slots=True, frozen=True)
class CheckInput:
    headers: dict[str, str]  # lower-case names
    path: str
    body: bytes
    body_complete: bool
    body_size: int = 0  # the whole body's length when Envoy sent only its start
    method: str = "POST"
    #: The mTLS principal Envoy verified (gRPC CheckRequest source.principal); over HTTP it
    #: comes in the XFCC header.
    principal: str = ""


@dataclass(slots=True, frozen=True)
class Verdict:
    """An admitted request. `key` is None only in global shadow mode for a request that would
    have been refused before reaching the ledger (nothing reserved, nothing to settle)."""

    key: KeyRecord | None
    reservation_id: str
    priority: Priority
    request: LLMRequest
    admission: Admission | None
    shadow_reason: str  # the rule that would have refused, in shadow mode
    degraded: bool = False  # decided without Redis (fail mode local)
    route: str = ""  # the endpoint's bounded name (authz.endpoints.Route.name)
    upstream: Choice | None = None  # the provider and member chosen (atlas/providers)
    idempotency: str = ""  # the Idempotency-Key's tag (atlas/idempotency.py)
    end_user: str = ""  # whom the caller attributes the request to (header or body `user`)
    #: Envoy's Lua filter may add include_usage to the body (authz/access_logged.py).
    spliceable: bool = False


#: What a request without an LLM body (GET /v1/models, ATLAS_EXTRA_ENDPOINTS) is counted as.
_NO_BODY = LLMRequest(
    parsed=False, model="", stream=False, include_usage=False, max_tokens=None, n=1, prompt_tokens=0
)


#: Raw model names whose folded form `Authorizer` keeps (then it starts over).
MAX_FOLDED_NAMES = 4096


def _checked(req: LLMRequest) -> LLMRequest:
    """`req`, or the 400 for a body that must be refused."""
    if req.invalid:
        raise Denied(
            400,
            req.invalid,
            type="invalid_request_error",
            code="invalid_value",
            param=req.invalid_param,
        )
    return req


def _denied_401(message: str) -> Denied:
    return Denied(401, message, type="invalid_request_error", code="invalid_api_key")


def _gemini_request(req: LLMRequest, path: str) -> LLMRequest:
    """Gemini names the model and whether it streams in the path, not the body."""
    call = gemini_call(path)
    if call is None or not req.parsed:
        return req
    model, stream = call
    return dataclasses.replace(req, model=model, stream=stream)


class Authorizer:
    def __init__(
        self,
        ledger: Admissions,
        cache: KeyCache,
        settings: Settings,
        *,
        shedder: Shedder | None = None,
        local: LocalLimiter | None = None,
        names: ModelNames | None = None,
        parser: BodyParser | None = None,
        providers: ProviderRouter | None = None,
        requests: RequestLogWriter | None = None,
        new_id: Callable[[], str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """:param names: folds model names for the ledger (built once per process).
        :param parser: parses bodies off the event loop when they are complex."""
        self._ledger = ledger
        self._names = names if names is not None else ModelNames.from_settings(settings)
        self._parser = parser if parser is not None else BodyParser(workers=0)
        self._providers = providers
        self.requests = requests  # refusals' request log records (answer.decide)
        self._endpoints = Endpoints(settings.extra_endpoints)
        self._cache = cache
        self._s = settings
        self._shedder = shedder
        self._local = local if local is not None else LocalLimiter()
        self._new_id = new_id if new_id is not None else ReservationIds()
        self._clock = clock
        self._prices = PriceBook(settings.model_prices)
        self._ceilings = {p: float(getattr(settings, f"ceiling_{p}")) for p in PRIORITIES}
        # `ModelNames.fold` is deterministic for a name once seen (it never forgets one), so
        # its answers can be kept; bounded, since model names are client input.
        self._folded: dict[str, str] = {}

    async def release(self, key_id: str, reservation_id: str) -> None:
        """Give up a reservation whose admission never reached Envoy (its connection closed
        before the answer was written): the reaper releases it, charged nothing."""
        try:
            await self._ledger.release({key_id: [reservation_id]})
        except LedgerUnavailable:
            metrics.LEDGER_ERRORS.labels(service="authz", op="release").inc()

    async def check(self, inp: CheckInput) -> Verdict:
        try:
            return await self._check(inp)
        except Denied as d:
            if not self._s.shadow_mode or d.status == 503:
                raise
            # Shadow mode: the refusal is recorded (metrics, access log) and the request goes on.
            metrics.DECISIONS.labels(service="authz", decision="shadow_" + (d.code or "")).inc()
            return Verdict(None, "", "normal", parse_llm_request(b""), None, d.code or "")

    async def _check(self, inp: CheckInput) -> Verdict:
        path = request_path(inp.path)  # 400 before anything else: the path is malformed
        secret = client_key(inp.headers)
        key, degraded = None, False
        if secret:
            secret_hash = hash_secret(secret)
            hit = self._cache.fresh(secret_hash)  # a known key's every Check: no coroutine
            key, degraded = (hit[0], False) if hit else await self._find_key(secret_hash)
        if key is None:
            # An internal app: SDKs insist on some api_key, so a bearer Atlas does not know
            # (a placeholder) gives way to the app's verified identity.
            app_hash = self._app_identity(inp)
            if app_hash is not None:
                key, degraded = await self._lookup(app_hash)
            if key is None:
                raise _denied_401(
                    "This app identity (certificate or app secret) is not known to Atlas."
                    if app_hash is not None
                    else "Incorrect API key provided."
                    if secret
                    else "Missing API key. Send it as 'Authorization: Bearer <key>'."
                )
        try:
            return await self._admit_key(inp, path, key, degraded)
        except Denied as d:
            d.subject = key  # the request log names whom it refused
            raise

    async def _admit_key(
        self, inp: CheckInput, path: str, key: KeyRecord, degraded: bool
    ) -> Verdict:
        key.check_usable(datetime.fromtimestamp(self._clock(), UTC))
        route = self._endpoints.route(inp.method, path)
        req = self._simple_request(inp, route)
        if req is None:  # too complex to parse inline: the pool, or a refusal
            req = _checked(await self._parser.parse(inp.body, size=inp.body_size))
        if route is GEMINI:
            req = _gemini_request(req, path)
        if route.reads_body and key.models is not None and req.model not in key.models:
            raise Denied(
                403,
                f"This API key may not use model '{req.model}'.",
                type="permission_denied",
                code="model_not_allowed",
            )
        priority = self._priority(inp.headers, key)
        completion = self._completion_estimate(req, key, priority, route)
        estimate = req.prompt_tokens + completion
        shadow = key.shadow or self._s.shadow_mode
        if self._shedder is not None and self._shedder.sheds(priority, estimate):
            metrics.DECISIONS.labels(service="authz", decision="shed_" + priority).inc()
            if not shadow:
                raise Denied(
                    503,
                    "The model is overloaded; lower-priority requests are shed. Retry shortly.",
                    type="server_error",
                    code="overloaded",
                    retry_after_s=1,
                )
        rid = self._new_id()
        end_user = (inp.headers.get(END_USER_HEADER) or req.user)[:MAX_END_USER_CHARS]
        idem, body_hash = request_tags(inp.headers, inp.body)
        splice = self._s.settle_from_access_log and req.stream and spliceable(inp)
        admit = AdmitRequest(
            reservation_id=rid,
            prompt_tokens=req.prompt_tokens,
            completion_tokens=completion,
            priority=priority,
            # The allowlist and prices see the real name; the ledger's history a bounded one.
            model=self._fold(req.model) if route.reads_body else route.name,
            ceiling=self._ceilings[priority],
            shadow=shadow,
            # Gemini's limit sits in generationConfig: extproc's top-level rewrite cannot set it.
            clamp=self._s.clamp_max_tokens and route.generates and route is not GEMINI,
            cost_micros=self._prices.cost_micros(req.model, req.prompt_tokens, completion)
            if route.reads_body
            else 0,
            choices=req.choices if route.generates else 1,
            # Envoy's access log settles it (json, sse, splice: no ext_proc): nothing claims it.
            unattended=unattended(self._s, route.name, req, idempotent=bool(idem), splice=splice),
            end_user_tag=end_user_tag(key, end_user),
            idempotency_tag=idem,
            body_hash=body_hash,
        )
        if degraded:
            return self._admit_locally(key, admit, req, route, splice)
        try:
            admission = await self._ledger.admit(key, admit)
        except LedgerInputError as exc:
            raise Denied(
                400, f"Request out of bounds: {exc}", type="invalid_request_error", code=None
            ) from exc
        except LedgerUnavailable as exc:
            metrics.LEDGER_ERRORS.labels(service="authz", op="admit").inc()
            if self._s.fail_mode != "local":
                raise self._unavailable() from exc
            return self._admit_locally(key, admit, req, route, splice)
        if admission.reason:
            count_refusal(admission.reason, key.id)
        if not admission.admitted:
            raise refusal(admission, key)
        upstream = None
        if self._providers is not None and route.reads_body:
            try:
                upstream = await self._providers.choose(req.model, admission.reserved)
            except Denied:  # no provider can serve: nothing was used
                await self.release(key.id, rid)
                raise
        if self._shedder is not None:
            self._shedder.gauge.add(admission.reserved)
        return Verdict(
            key,
            rid,
            priority,
            req,
            admission,
            admission.reason,
            route=route.name,
            upstream=upstream,
            end_user=end_user,
            idempotency=idem,
            spliceable=splice,
        )

    async def _lookup(self, secret_hash: str) -> tuple[KeyRecord | None, bool]:
        hit = self._cache.fresh(secret_hash)
        return (hit[0], False) if hit is not None else await self._find_key(secret_hash)

    def _app_identity(self, inp: CheckInput) -> str | None:
        """The secret-index hash of an internal app without a key: its app id and shared
        secret, else (where the Envoy in front sanitizes XFCC) its verified mTLS principal."""
        h = inp.headers
        app_id, app_secret = h.get(APP_ID_HEADER, ""), h.get(APP_SECRET_HEADER, "")
        if app_id and app_secret and len(app_id) <= 64 and len(app_secret) <= MAX_APP_SECRET_CHARS:
            return app_secret_hash(app_id, app_secret)
        if self._s.mtls_identity:
            principal = inp.principal or xfcc_principal(h.get(XFCC_HEADER, ""))
            if principal:
                return principal_hash(principal)
        return None

    def _simple_request(self, inp: CheckInput, route: Route) -> LLMRequest | None:
        """What the body asks for, or None when it must be parsed off the event loop;
        refuses what cannot be accounted for."""
        if not route.reads_body:
            return _NO_BODY
        if not inp.body_complete:
            # Envoy reads up to max_request_bytes for authz: a partial body is one it did not
            # let us see whole, and a reservation for its unseen part would be a guess.
            raise Denied(
                413,
                "Request body too large for this gateway.",
                type="invalid_request_error",
                code="request_too_large",
            )
        req = self._parser.parse_inline(inp.body, size=inp.body_size)
        return None if req is None else _checked(req)

    def _fold(self, model: str) -> str:
        folded = self._folded.get(model)
        if folded is None:
            folded = self._names.fold(model)
            if len(self._folded) >= MAX_FOLDED_NAMES:
                self._folded.clear()
            self._folded[model] = folded
        return folded

    async def _find_key(self, secret_hash: str) -> tuple[KeyRecord | None, bool]:
        """The key record, and whether it came from the stale cache (Redis unreachable)."""
        try:
            return await self._cache.get(secret_hash), False
        except LedgerUnavailable as exc:
            metrics.LEDGER_ERRORS.labels(service="authz", op="find_key").inc()
            stale = self._cache.stale(secret_hash) if self._s.fail_mode == "local" else None
            if stale is None:
                raise self._unavailable() from exc
            return stale, True

    def _admit_locally(
        self, key: KeyRecord, admit: AdmitRequest, req: LLMRequest, route: Route, splice: bool
    ) -> Verdict:
        estimate = admit.prompt_tokens + admit.completion_tokens
        wait_s = self._local.admit(key, estimate)
        metrics.DECISIONS.labels(
            service="authz", decision="degraded_ok" if wait_s == 0 else "degraded_refused"
        ).inc()
        if wait_s and not admit.shadow:
            raise Denied(
                429,
                f"Rate limit reached (degraded mode). Retry after {math.ceil(wait_s)}s.",
                type="requests",
                code="rate_limit_exceeded",
                retry_after_s=wait_s,
            )
        now_ms = int(self._clock() * 1000)
        admission = Admission(
            admitted=True,
            reason="degraded",
            retry_after_ms=0,
            granted_completion=None,
            reserved=estimate,
            requests_remaining=0,
            requests_reset_ms=0,
            tokens_remaining=None,
            tokens_reset_ms=0,
            day_used=0,
            day_reserved=0,
            day_reset_s=now_ms // 1000,
            month_used=0,
            month_reserved=0,
            month_reset_s=now_ms // 1000,
            now_ms=now_ms,
        )
        return Verdict(
            key,
            admit.reservation_id,
            admit.priority,
            req,
            admission,
            "",
            degraded=True,
            route=route.name,
            spliceable=splice,
        )

    def _priority(self, headers: dict[str, str], key: KeyRecord) -> Priority:
        asked = headers.get("x-request-priority")
        if asked is None:  # records stored before admin refused priority > max_priority
            return cap_priority(key.priority, key.max_priority)
        asked = asked.strip().lower()
        for p in PRIORITIES:
            if p == asked:
                return cap_priority(p, key.max_priority)
        raise Denied(
            400,
            "x-request-priority must be one of: " + ", ".join(PRIORITIES),
            type="invalid_request_error",
            code="invalid_priority",
        )

    def _completion_estimate(
        self, req: LLMRequest, key: KeyRecord, priority: str, route: Route
    ) -> int:
        """Per choice times every choice of every prompt (`n`, `best_of`, prompt lists)."""
        if not route.generates:
            return 0
        if req.max_tokens is not None:
            return req.max_tokens * req.choices  # bounded by parse_llm_request
        share = math.ceil(key.daily_limit * DEFAULT_RESERVATION_SHARE[priority])
        per_choice = max(
            1, min(share or self._s.default_stream_reservation, self._s.max_reservation)
        )
        return min(per_choice * req.choices, MAX_RESERVATION_TOKENS - req.prompt_tokens)

    def _unavailable(self) -> Denied:
        return Denied(
            503,
            "Rate limiting is temporarily unavailable; retry shortly.",
            type="server_error",
            code="service_unavailable",
            retry_after_s=1,
        )
