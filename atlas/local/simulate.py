"""`atlas simulate`: backfill realistic usage history (diurnal and weekly cycles, growth,
noise; several keys and models) so a new installation shows forecasts at once."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from atlas.forecast import synthetic_series
from atlas.keymodel import KeyRecord, hash_secret, new_key_id, new_secret, secret_hint
from atlas.ledger.admin_protocol import AdminLedger
from atlas.ledger.protocol import GLOBAL_HISTORY, HistoryScope
from atlas.windows import local_day_month

#: Prompt share of the tokens and tokens per request, typical of chat traffic.
PROMPT_SHARE = 0.4
TOKENS_PER_REQUEST = 400


@dataclass(slots=True, frozen=True)
class Team:
    name: str
    tokens_per_hour: float
    growth_per_day: float  # tokens/hour added per day
    daily_quota_share: float  # daily limit / typical day: < 1 puts the key at risk


TEAMS = (
    Team("search", 6000, 40, 1.6),
    Team("support-bot", 2500, 5, 1.3),
    Team("analytics", 900, 0, 2.0),
    Team("growth", 3000, 120, 0.8),  # growing fast: forecast to exhaust its daily quota
    Team("research", 400, 0, 3.0),
    Team("mobile", 1500, 10, 1.5),
)


async def backfill(
    ledger: AdminLedger,
    *,
    days: int = 28,
    keys: int = 4,
    models: Sequence[str] = ("demo-small", "demo-large"),
    seed: int = 1,
    now_s: float | None = None,
) -> list[tuple[KeyRecord, str]]:
    """Create `keys` keys with `days` of hourly history up to now; (record, secret) pairs."""
    now = now_s if now_s is not None else await ledger.server_time()
    this_hour = ledger.hour_start(now)
    first = this_hour - 3600 * 24 * days
    zone = ledger.zone_of(None)  # the simulated keys have no zone of their own
    today_day, today_month = local_day_month(int(now), zone)
    created: list[tuple[KeyRecord, str]] = []
    for i in range(keys):
        team = TEAMS[i % len(TEAMS)]
        series = synthetic_series(
            days,
            base=team.tokens_per_hour,
            daily_amplitude=0.6,
            weekly_amplitude=0.35,
            trend_per_day=team.growth_per_day,
            noise=0.08,
            seed=seed * 100 + i,
            first_ts=first,
        )
        typical_day = team.tokens_per_hour * 24 + team.growth_per_day * 24 * days
        secret = new_secret()
        rec = KeyRecord(
            id=new_key_id(),
            name=f"sim-{team.name}" + (f"-{i}" if i >= len(TEAMS) else ""),
            secret_hash=hash_secret(secret),
            secret_hint=secret_hint(secret),
            daily_limit=int(typical_day * team.daily_quota_share),
            monthly_limit=int(typical_day * 30 * max(1.1, team.daily_quota_share)),
            rate_per_sec=20,
            burst=40,
            metadata={"team": team.name, "simulated": True},
        )
        await ledger.create_key(rec)
        created.append((rec, secret))
        rows: list[tuple[HistoryScope, int, dict[str, int]]] = []
        day_used = month_used = day_requests = month_requests = 0
        for h, total in enumerate(series):
            ts = first + 3600 * h
            if ts > this_hour:
                break
            tokens = int(total)
            prompt = int(tokens * PROMPT_SHARE)
            requests = max(1, math.ceil(tokens / TOKENS_PER_REQUEST)) if tokens else 0
            fields = {"requests": requests, "prompt": prompt, "completion": tokens - prompt}
            rows.append((HistoryScope.key(rec.id), ts, fields))
            rows.append((GLOBAL_HISTORY, ts, fields))
            split = _split(fields, len(models), i + h)
            rows += [
                (HistoryScope.model(m), ts, part) for m, part in zip(models, split, strict=True)
            ]
            day, month = local_day_month(ts, zone)
            if month == today_month:
                month_used += tokens
                month_requests += requests
                if day == today_day:
                    day_used += tokens
                    day_requests += requests
        await ledger.add_history(rows)
        # Today's and this month's quota windows, as the history implies.
        await ledger.add_day_window(rec.id, today_day, {"used": day_used, "requests": day_requests})
        await ledger.add_month_window(
            rec.id, today_month, {"used": month_used, "requests": month_requests}
        )
    return created


def _split(fields: dict[str, int], n: int, salt: int) -> list[dict[str, int]]:
    """Share one hour between models, the first taking most."""
    weights = [0.7 if j == 0 else 0.3 / max(1, n - 1) for j in range(n)]
    parts = [{k: int(v * w) for k, v in fields.items()} for w in weights]
    for k, v in fields.items():  # rounding remainder to the first model
        parts[0][k] += v - sum(p[k] for p in parts)
    return parts
