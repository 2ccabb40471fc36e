"""Alerts: the fired ones with their deliveries, newest first, and the webhooks they go to
(url and a scope filter; nothing secret is stored: deliveries are signed with
ATLAS_ALERT_SIGNING_SECRET)."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request, status
from pydantic import BaseModel, ConfigDict, Field, field_validator

from admin.audit import record_event
from admin.deps import AdminDep, LedgerDep, OperatorDep, SettingsDep
from atlas.ledger.admin_protocol import AdminLedger
from atlas.ledger.redis.alerts import RedisAlerts

router = APIRouter(prefix="/v1/admin/alerts", tags=["alerts"])

MAX_WEBHOOKS = 50
#: Scopes with their own thresholds, at most.
MAX_RULES = 10_000
#: A rule's scope: one key or one team.
RULE_SCOPE = r"^(key|team):[A-Za-z0-9._-]{1,100}$"


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


class RuleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    thresholds: list[Annotated[int, Field(ge=1, le=1000)]] = Field(
        max_length=10,
        description="Percentages of each quota and budget that alert (replacing"
        " ATLAS_ALERT_THRESHOLDS for this scope); [] silences its threshold alerts",
        examples=[[75, 95]],
    )


class RuleOut(BaseModel):
    scope: str
    thresholds: list[int]


class RuleList(BaseModel):
    items: list[RuleOut]
    default: list[int] = Field(description="ATLAS_ALERT_THRESHOLDS: every other scope's")


class AlertList(BaseModel):
    items: list[dict[str, Any]] = Field(description="Fired alerts, each with its deliveries")


def _message(a: dict[str, Any]) -> str:
    if a.get("kind") == "anomaly":
        return (
            f"{a['limit']} {a['direction']} forecast in the hour from {a['hour']}: "
            f"{a['used']:g} (expected {a['expected']:g}, interval {a['lower']:g}-{a['upper']:g})"
        )
    return f"{a['limit']} reached {a['threshold']}% ({a['used']:g} of {a['limit_value']:g})"


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
        {**a, "message": _message(a), "deliveries": deliveries.get(str(a["id"]), [])}
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


@router.get("/rules", response_model=RuleList)
async def list_rules(_: AdminDep, request: Request, settings: SettingsDep) -> RuleList:
    """Scopes with their own thresholds; every other scope uses the default."""
    rules = await get_store(request).rules()
    items = [RuleOut(scope=k, thresholds=v) for k, v in rules.items()]
    return RuleList(items=items, default=list(settings.alert_thresholds))


async def _scope_exists(ledger: AdminLedger, scope: str) -> None:
    kind, _, ident = scope.partition(":")
    found = await (ledger.get_key(ident) if kind == "key" else ledger.get_team(ident))
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"{kind} {ident!r} not found")


@router.put("/rules/{scope}", response_model=RuleOut)
async def put_rule(
    scope: Annotated[str, Path(pattern=RULE_SCOPE, description="key:<id> or team:<id>")],
    body: RuleIn,
    who: OperatorDep,
    ledger: LedgerDep,
    request: Request,
) -> RuleOut:
    """Give one key or team its own thresholds (from the next alert round)."""
    store = get_store(request)
    await _scope_exists(ledger, scope)
    rules = await store.rules()
    if scope not in rules and len(rules) >= MAX_RULES:
        raise HTTPException(status.HTTP_409_CONFLICT, f"at most {MAX_RULES} alert rules")
    rule = RuleOut(scope=scope, thresholds=sorted(set(body.thresholds)))
    await store.put_rule(scope, rule.thresholds)
    before = {"thresholds": rules[scope]} if scope in rules else None
    await record_event(
        ledger,
        request,
        who,
        "alert_rule.put",
        subject=scope,
        before=before,
        after={"thresholds": rule.thresholds},
    )
    return rule


@router.delete("/rules/{scope}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_rule(
    scope: Annotated[str, Path(pattern=RULE_SCOPE)],
    who: OperatorDep,
    ledger: LedgerDep,
    request: Request,
) -> None:
    """The scope goes back to the default thresholds."""
    if not await get_store(request).drop_rule(scope):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no alert rule for {scope!r}")
    await record_event(
        ledger, request, who, "alert_rule.delete", subject=scope, before=None, after=None
    )
