"""Liveness of Atlas and its dependencies, and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from admin.deps import LedgerDep, SettingsDep
from admin.health import check_components

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz(settings: SettingsDep, ledger: LedgerDep) -> JSONResponse:
    """Status of each component; 503 when any is down."""
    components = await check_components(settings, ledger)
    ok = all(c["status"] == "ok" for c in components.values())
    return JSONResponse(
        {"status": "ok" if ok else "degraded", "components": components},
        status_code=200 if ok else 503,
    )


@router.get("/livez")
async def livez() -> dict[str, str]:
    """The admin process answers (its dependencies are not checked)."""
    return {"status": "ok"}


@router.get("/metrics")
async def metrics() -> Response:
    """Prometheus metrics of the admin process."""
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
