"""The admin FastAPI app: keys, usage, health, metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from admin.routes import audit, dashboard, forecasting, health, history, keys, usage
from atlas import metrics
from atlas.errors import LedgerUnavailable
from atlas.ledger.redis import RedisLedger
from atlas.settings import Settings


def create_app(settings: Settings, ledger: RedisLedger | None = None) -> FastAPI:
    own_ledger = ledger is None
    the_ledger = ledger if ledger is not None else RedisLedger.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if own_ledger:
            await the_ledger.close()

    app = FastAPI(
        title="Atlas admin",
        version="0.1.0",
        description="API keys, limits, usage and health of Atlas (LLM governance for Envoy).",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.ledger = the_ledger

    @app.exception_handler(LedgerUnavailable)
    async def ledger_down(request: Request, exc: LedgerUnavailable) -> JSONResponse:
        route = request.scope.get("route")
        metrics.LEDGER_ERRORS.labels(service="admin", op=getattr(route, "path", "other")).inc()
        return JSONResponse(
            {"detail": "ledger unavailable"}, status_code=503, headers={"Retry-After": "1"}
        )

    app.include_router(health.router)
    app.include_router(keys.router)
    app.include_router(usage.router)
    app.include_router(history.router)
    app.include_router(audit.router)
    app.include_router(forecasting.router)
    app.include_router(dashboard.router)
    return app
