"""The admin FastAPI app: keys, usage, health, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from admin.auth import Authenticator, JwtVerifier
from admin.routes import (
    admins,
    alerts,
    apps,
    audit,
    dashboard,
    forecasting,
    health,
    history,
    keys,
    owners,
    providers,
    requests,
    teams,
    usage,
)
from admin.selfserve import SelfServe
from atlas import metrics
from atlas.alerts.alerter import Alerter
from atlas.errors import Denied, LedgerUnavailable
from atlas.ledger.admin_protocol import AdminLedger
from atlas.ledger.redis import RedisLedger
from atlas.ledger.redis.admins import RedisAdmins
from atlas.ledger.redis.alerts import RedisAlerts
from atlas.openai_errors import error_body
from atlas.settings import Settings


def create_app(settings: Settings, ledger: AdminLedger | None = None) -> FastAPI:
    owned: RedisLedger | None = None  # built here, so closed here
    if ledger is None:
        ledger = owned = RedisLedger.from_settings(settings)
    the_ledger: AdminLedger = ledger

    conn = getattr(the_ledger, "conn", None)
    alert_store = RedisAlerts(conn) if conn is not None else None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        alerter = None
        if alert_store is not None:
            runner = Alerter(the_ledger, alert_store, settings)
            alerter = asyncio.create_task(runner.run())
        yield
        if alerter is not None:
            alerter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await alerter
        if owned is not None:
            await owned.close()

    app = FastAPI(
        title="Atlas admin",
        version="0.1.0",
        description="API keys, limits, usage and health of Atlas (LLM governance for Envoy).",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.ledger = the_ledger
    app.state.selfserve = SelfServe()
    app.state.alerts = alert_store
    admin_store = RedisAdmins(conn) if conn is not None else None
    app.state.auth = Authenticator(
        settings, admin_store, jwt_verifier=JwtVerifier.from_settings(settings)
    )

    @app.exception_handler(LedgerUnavailable)
    async def ledger_down(request: Request, exc: LedgerUnavailable) -> JSONResponse:
        route = request.scope.get("route")
        metrics.LEDGER_ERRORS.labels(service="admin", op=getattr(route, "path", "other")).inc()
        return JSONResponse(
            {"detail": "ledger unavailable"}, status_code=503, headers={"Retry-After": "1"}
        )

    @app.exception_handler(Denied)
    async def denied(request: Request, exc: Denied) -> Response:
        """Self-serve refusals, shaped like authz's so OpenAI SDKs raise the right error."""
        metrics.DECISIONS.labels(service="admin", decision=exc.code or "denied").inc()
        headers = dict(exc.headers)
        if exc.retry_after_s is not None:
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
        return Response(
            error_body(exc.message, type=exc.type, code=exc.code),
            status_code=exc.status,
            media_type="application/json",
            headers=headers,
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's 422, without echoing body input: a body may carry a secret (`api_key`)."""
        return JSONResponse({"detail": jsonable_encoder(_without_body_input(exc.errors()))}, 422)

    app.include_router(health.router)
    app.include_router(keys.router)
    app.include_router(usage.router)
    app.include_router(history.router)
    app.include_router(audit.router)
    app.include_router(forecasting.router)
    app.include_router(providers.router)
    app.include_router(teams.router)
    app.include_router(apps.router)
    app.include_router(requests.router)
    app.include_router(admins.router)
    app.include_router(owners.router)
    app.include_router(alerts.router)
    app.include_router(dashboard.router)
    return app


def _without_body_input(errors: Any) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in e.items() if k != "input"} if e["loc"][:1] == ("body",) else e
        for e in errors
    ]
