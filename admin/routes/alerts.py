"""Alerts: the fired ones with their deliveries, newest first, and the webhooks they go to
(url and a scope filter; nothing secret is stored: deliveries are signed with
ATLAS_ALERT_SIGNING_SECRET)."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, status
from pydantic import BaseModel, ConfigDict, Field, field_validator

from admin.audit import record_event
from admin.deps import AdminDep, LedgerDep, OperatorDep
from atlas.ledger.redis.alerts import RedisAlerts

router = APIRouter(prefix="/v1/admin/alerts", tags=["alerts"])

MAX_WEBHOOKS = 50


def get_store(request: Request) -> RedisAlerts:
    store: RedisAlerts | None = getattr(request.app.state, "alerts", None)
    if store is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "alerts need the Redis ledger")
    return store


class WebhookCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(max_length=2048, description="http(s) URL the alerts are POSTed to")
    scopes: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=lambda: ["*"],
        max_length=20,
        description="Scope patterns (key:*, team:eng, ...) whose alerts it gets",
    )

    @field_validator("url")
    @classmethod
    def _http(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")) or any(c in v for c in " \r\n"):
            raise ValueError("an http:// or https:// URL")
        return v


class WebhookOut(BaseModel):
    id: str
    url: str
    scopes: list[str]


class WebhookList(BaseModel):
    items: list[WebhookOut]


class AlertList(BaseModel):
    items: list[dict[str, Any]] = Field(description="Fired alerts, each with its deliveries")


@router.get("", response_model=AlertList)
async def fired_alerts(
    _: AdminDep, request: Request, limit: Annotated[int, Query(ge=1, le=500)] = 100
) -> AlertList:
    """Fired alerts, newest first, with each webhook delivery's result."""
    events = await get_store(request).events(min(5000, limit * 20))
    deliveries: dict[str, list[dict[str, Any]]] = {}
    fired: list[dict[str, Any]] = []
    for e in events:
        if e.get("event") == "fired":
            fired.append(e)
        else:
            deliveries.setdefault(str(e.get("id")), []).append(
                {
                    "webhook": e.get("webhook"),
                    "status": e.get("event"),
                    "code": e.get("status"),
                    "attempts": e.get("attempts"),
                    "error": e.get("error") or None,
                }
            )
    items = [
        {
            **a,
            "message": f"{a['limit']} reached {a['threshold']}% ({a['used']:g} of "
            f"{a['limit_value']:g})",
            "deliveries": deliveries.get(str(a["id"]), []),
        }
        for a in fired[:limit]
    ]
    return AlertList(items=items)


@router.get("/webhooks", response_model=WebhookList)
async def list_webhooks(_: AdminDep, request: Request) -> WebhookList:
    hooks = await get_store(request).webhooks()
    return WebhookList(items=[WebhookOut(id=k, **v) for k, v in hooks.items()])


@router.post("/webhooks", status_code=status.HTTP_201_CREATED, response_model=WebhookOut)
async def add_webhook(
    body: WebhookCreate, who: OperatorDep, ledger: LedgerDep, request: Request
) -> WebhookOut:
    store = get_store(request)
    if len(await store.webhooks()) >= MAX_WEBHOOKS:
        raise HTTPException(status.HTTP_409_CONFLICT, f"at most {MAX_WEBHOOKS} webhooks")
    hook = WebhookOut(id="wh_" + secrets.token_hex(6), url=body.url, scopes=body.scopes)
    await store.put_webhook(hook.id, hook.model_dump(exclude={"id"}))
    await record_event(
        ledger,
        request,
        who,
        "webhook.create",
        subject=hook.id,
        before=None,
        after=hook.model_dump(),
    )
    return hook


@router.delete("/webhooks/{hook_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_webhook(
    hook_id: str, who: OperatorDep, ledger: LedgerDep, request: Request
) -> None:
    if not await get_store(request).drop_webhook(hook_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"webhook {hook_id!r} not found")
    await record_event(
        ledger, request, who, "webhook.delete", subject=hook_id, before=None, after=None
    )
