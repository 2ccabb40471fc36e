"""The alerter (runs in admin): every ATLAS_ALERT_INTERVAL_S it takes the scopes whose usage
changed (`key:<id>`, `team:<id>`, marked by the request log writer), measures each quota and
budget in its current window, and fires each threshold (the scope's own rule, else
ATLAS_ALERT_THRESHOLDS) once per window (a Redis set per scope and window decides, so
replicas never fire twice): an audit entry, a metric, an event
in the alert stream and a signed delivery to every matching webhook (as tasks, bounded, so
a slow receiver never holds the loop). Each delivery's result is an event too. When an hour
closes, the anomaly alert (atlas/alerts/anomaly.py) judges it."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import httpx

from atlas import metrics
from atlas.alerts.anomaly import Anomaly, check_hour
from atlas.alerts.delivery import deliver
from atlas.alerts.thresholds import Measure, reached
from atlas.errors import LedgerUnavailable
from atlas.forecast import HOUR_S, hour_floor
from atlas.ledger.admin_protocol import AdminLedger, AlertStore
from atlas.ledger.protocol import Window
from atlas.settings import Settings

log = logging.getLogger("atlas.alerts")

#: Scopes one round evaluates at most (the rest stay marked for the next).
MAX_SCOPES_PER_ROUND = 500
#: Deliveries in flight at most.
MAX_DELIVERIES = 32
#: A fired set outlives its window by this (a month window is at most 31 days).
FIRED_TTL_S = 32 * 86_400
#: An hour's set of active scopes is kept until the hour after next has been judged.
ACTIVE_TTL_S = 3 * HOUR_S


def _measures(prefix: str, day: Window, month: Window, budget_usd: float | None) -> list[Measure]:
    return [
        Measure(f"{prefix}.daily", day.used, day.limit, str(day.resets_at_s)),
        Measure(f"{prefix}.monthly", month.used, month.limit, str(month.resets_at_s)),
        Measure(
            f"{prefix}.budget",
            month.spend_micros / 1e6,
            budget_usd or 0.0,
            str(month.resets_at_s),
        ),
    ]


class Alerter:
    def __init__(
        self,
        ledger: AdminLedger,
        store: AlertStore,
        settings: Settings,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._ledger = ledger
        self._store = store
        self._thresholds: Sequence[int] = settings.alert_thresholds
        self._interval_s = settings.alert_interval_s
        self._margin = settings.alert_anomaly_margin
        #: The last closed hour this replica judged (0: it judges the one before it starts).
        self._judged_hour = 0
        secret = settings.alert_signing_secret
        self._secret = secret.get_secret_value() if secret else None
        self._client = client or httpx.AsyncClient(timeout=5.0)
        self._slots = asyncio.Semaphore(MAX_DELIVERIES)
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self._interval_s)
                try:
                    await self.round()
                except LedgerUnavailable:
                    pass  # the marks stay; next round
                except Exception:
                    log.exception("alert round failed")
        finally:
            for t in self._tasks:
                t.cancel()
            with contextlib.suppress(Exception):
                await self._client.aclose()

    async def round(self) -> int:
        """Evaluate the changed scopes, and the anomaly alert once an hour closes; the alerts
        fired."""
        fired = 0
        scopes = await self._store.pop_dirty(MAX_SCOPES_PER_ROUND)
        hour = hour_floor(await self._ledger.server_time())
        await self._store.mark_active(hour, scopes, ACTIVE_TTL_S)
        rules = await self._store.rules() if scopes else {}
        for scope in scopes:
            thresholds = rules.get(scope, self._thresholds)
            for m in await self._measure(scope) if thresholds else []:
                for t in reached(m, thresholds):
                    if await self._store.first_time(scope, m.window, f"{m.limit}:{t}", FIRED_TTL_S):
                        await self._fire(scope, m, t)
                        fired += 1
        closed = hour - HOUR_S
        if closed > self._judged_hour:
            self._judged_hour = closed
            fired += await self._judge(closed)
        return fired

    async def _judge(self, hour_ts: int) -> int:
        """The anomaly alert for the hour that just closed (once per scope and hour)."""
        active = await self._store.active_scopes([hour_ts, hour_ts - HOUR_S])
        fired = 0
        for a in await check_hour(self._ledger, active, hour_ts, self._margin):
            if await self._store.first_time(a.scope, str(hour_ts), "anomaly", FIRED_TTL_S):
                await self._fire_anomaly(a)
                fired += 1
        return fired

    async def _measure(self, scope: str) -> list[Measure]:
        kind, _, ident = scope.partition(":")
        if kind == "key":
            rec = await self._ledger.get_key(ident)
            if rec is None:
                return []
            u = await self._ledger.usage(rec)
            return _measures("key", u.daily, u.monthly, rec.monthly_budget_usd)
        if kind == "team":
            team = await self._ledger.get_team(ident)
            if team is None:
                return []
            day, month = await self._ledger.team_usage(team)
            return _measures("team", day, month, team.monthly_budget_usd)
        return []

    async def _fire(self, scope: str, m: Measure, threshold: int) -> None:
        alert = {
            "id": "alrt_" + secrets.token_hex(8),
            "kind": "threshold",
            "scope": scope,
            "limit": m.limit,
            "threshold": threshold,
            "used": m.used,
            "limit_value": m.limit_value,
            "window_resets_at": datetime.fromtimestamp(int(m.window), UTC).isoformat(),
            "at": datetime.now(UTC).isoformat(),
        }
        await self._emit(alert, str(threshold))

    async def _fire_anomaly(self, a: Anomaly) -> None:
        alert = {
            "id": "alrt_" + secrets.token_hex(8),
            "kind": "anomaly",
            "scope": a.scope,
            "limit": ("key" if a.scope.startswith("key:") else "global") + ".hourly_tokens",
            "direction": a.direction,
            "used": a.used,
            "expected": round(a.expected, 1),
            "lower": round(a.lower, 1),
            "upper": round(a.upper, 1),
            "margin": self._margin,
            "hour": datetime.fromtimestamp(a.hour_ts, UTC).isoformat(),
            "at": datetime.now(UTC).isoformat(),
        }
        await self._emit(alert, a.direction)

    async def _emit(self, alert: dict[str, Any], threshold: str) -> None:
        """An alert as a metric, an event, an audit entry and a delivery to each webhook whose
        scope patterns match."""
        scope = str(alert["scope"])
        metrics.ALERTS_FIRED.labels(
            kind=alert["kind"], limit=alert["limit"], threshold=threshold
        ).inc()
        await self._store.add_event({"event": "fired", **alert})
        await self._ledger.audit(
            {
                "at": alert["at"],
                "actor": "alerter",
                "action": "alert.fired",
                "subject": scope,
                "before": None,
                "after": alert,
            }
        )
        body = json.dumps(alert, separators=(",", ":")).encode()
        for hook_id, hook in (await self._store.webhooks()).items():
            if any(fnmatch.fnmatchcase(scope, p) for p in hook.get("scopes") or ["*"]):
                task = asyncio.create_task(self._deliver(hook_id, hook["url"], body, alert))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _deliver(self, hook_id: str, url: str, body: bytes, alert: dict[str, Any]) -> None:
        async with self._slots:
            d = await deliver(self._client, url, body, alert["id"], self._secret)
        result = "delivered" if d.ok else "failed"
        metrics.ALERT_DELIVERIES.labels(result=result).inc()
        with contextlib.suppress(LedgerUnavailable):
            await self._store.add_event(
                {
                    "event": result,
                    "id": alert["id"],
                    "webhook": hook_id,
                    "attempts": d.attempts,
                    "status": d.status,
                    "error": d.error,
                    "at": datetime.now(UTC).isoformat(),
                }
            )
