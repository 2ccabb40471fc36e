"""The anomaly alert on a real valkey-server: when an hour closes, a key whose hour's tokens
lie far outside the forecast learned from its history fires one `anomaly` alert (above or
below), a key within its usual range does not, a key without a day of history is not judged,
and a second round (or a second replica) never fires it again."""

from __future__ import annotations

import random

import httpx

from atlas.alerts.alerter import Alerter
from atlas.alerts.anomaly import MIN_DEVIATION, judge
from atlas.forecast import HOUR_S, hour_floor
from atlas.ledger.protocol import HistoryScope
from atlas.ledger.redis import RedisLedger
from atlas.ledger.redis.alerts import RedisAlerts
from atlas.settings import Settings

DAYS = 4


async def write_history(ledger: RedisLedger, key_id: str, closed: int, last_hour: int) -> None:
    """DAYS days of about 20,000 tokens an hour, then `last_hour` tokens in the closed hour."""
    rng = random.Random(key_id)
    rows = []
    for h in range(DAYS * 24, 0, -1):
        tokens = 20_000 + rng.randint(-1500, 1500)
        rows.append((HistoryScope.key(key_id), closed - h * HOUR_S, {"prompt": tokens}))
    rows.append((HistoryScope.key(key_id), closed, {"prompt": last_hour}))
    await ledger.add_history(rows)


def test_judge_widens_the_interval_by_the_margin() -> None:
    assert judge(150, 100, 80, 120, 0.5) is None  # deviations under MIN_DEVIATION are noise
    lo, hi = 10_000.0, 30_000.0
    assert judge(39_000, 20_000, lo, hi, 0.5) is None  # 30,000 + 0.5 x 20,000 = 40,000
    assert judge(41_000, 20_000, lo, hi, 0.5) == "above"
    assert judge(41_000, 20_000, lo, hi, 1.0) is None
    assert judge(0, 20_000, lo, hi, 0.4) == "below"  # under 10,000 - 8,000
    assert judge(hi + MIN_DEVIATION - 1, 20_000, lo, hi, 0.0) is None


async def test_an_hour_far_outside_the_forecast_fires_once(
    ledger: RedisLedger, settings: Settings, api: httpx.AsyncClient
) -> None:
    store = RedisAlerts(ledger.conn)
    closed = hour_floor(await ledger.server_time()) - HOUR_S
    await write_history(ledger, "key_spike", closed, 200_000)
    await write_history(ledger, "key_silent", closed, 0)
    await write_history(ledger, "key_usual", closed, 20_500)
    await ledger.add_history([(HistoryScope.key("key_new"), closed, {"prompt": 900_000})])
    scopes = ["key:key_spike", "key:key_usual", "key:key_new"]
    await store.mark_active(closed, scopes, 3 * HOUR_S)
    await store.mark_active(closed - HOUR_S, ["key:key_silent"], 3 * HOUR_S)  # then went quiet

    first, second = Alerter(ledger, store, settings), Alerter(ledger, store, settings)
    assert await first.round() == 2
    assert await first.round() == 0 and await second.round() == 0  # once per scope and hour
    fired = [e for e in await store.events(20) if e["event"] == "fired"]
    got = {(e["scope"], e["direction"]) for e in fired}
    assert got == {("key:key_spike", "above"), ("key:key_silent", "below")}
    spike = next(e for e in fired if e["scope"] == "key:key_spike")
    assert spike["kind"] == "anomaly" and spike["limit"] == "key.hourly_tokens"
    assert spike["used"] == 200_000 and 15_000 < spike["expected"] < 25_000
    assert spike["upper"] < 200_000 and spike["margin"] == settings.alert_anomaly_margin

    listed = (await api.get("/v1/admin/alerts")).json()["items"]
    messages = {a["scope"]: a["message"] for a in listed}
    assert messages["key:key_spike"].startswith("key.hourly_tokens above forecast")
    assert "expected" in messages["key:key_silent"]
