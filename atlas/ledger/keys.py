"""Every Redis key name Atlas uses, built in one place.

All state of one API key shares the hash tag `{k:<id>}`: Redis Cluster hashes only the part
between the first `{` and `}`, so every key of one API key lands in one slot and each Lua
script (admit, settle, reap) can touch all of them atomically. Global state lives under the
tag `{g}` and is updated by separate commands, never inside a per-key script.

Teams: a key of a team (id `key_<hex>.<team>`, atlas/keymodel.py) is tagged `{t:<team>}`
instead, beside the team's own limits, buckets and windows, so one admit.lua call checks the
key's limits and its team's atomically, in one slot, in Redis Cluster too. The price: a
team's traffic is one slot's (one shard's) load, and a key cannot change teams (its state
lives under the team's tag; moving means a new key in the other team).

Windows and history are named by the script itself from a prefix and Redis `TIME`
(`<prefix>d:20261123`, `<prefix>m:202611`, `<prefix>h:2026112314`), so a prefix carrying the
key's hash tag is what the script receives in KEYS.
"""

from __future__ import annotations

ROOT = "atlas"

#: pub/sub channel announcing a changed key record (payload: key id).
KEY_CHANGED_CHANNEL = f"{ROOT}:keys:changed"
#: sorted set of every key id, scored by creation time (ms).
KEY_INDEX = f"{ROOT}:{{g}}:keys"
#: integer: reserved tokens of requests in flight, all keys (for shedding by priority).
INFLIGHT = f"{ROOT}:{{g}}:inflight"
#: stream of admin changes (who, what, before/after, when).
AUDIT = f"{ROOT}:{{g}}:audit"
#: hourly global history prefix (hash per hour).
GLOBAL_PREFIX = f"{ROOT}:{{g}}:"


def secret_index(secret_hash: str) -> str:
    """String: secret sha256 -> key id. Its own slot; read only on a cache miss."""
    return f"{ROOT}:secret:{secret_hash}"


def lock(name: str) -> str:
    """String with a PX expiry: a lease one replica holds (e.g. the reaper's)."""
    return f"{ROOT}:{{g}}:lock:{name}"


def tag(key_id: str) -> str:
    _, sep, team = key_id.partition(".")  # atlas.keymodel.TEAM_SEPARATOR
    return f"{ROOT}:{{t:{team}}}:k:{key_id}:" if sep else f"{ROOT}:{{k:{key_id}}}:"


#: hash app id -> the key id of the app's record (internal apps, atlas/identity.py).
APP_INDEX = f"{ROOT}:{{g}}:apps"
#: Hash admin name -> JSON record (role, token hash): named admin credentials (admin/auth).
ADMIN_INDEX = f"{ROOT}:{{g}}:admins"
#: Hash token hash -> admin name: how a presented admin token finds its admin.
ADMIN_TOKENS = f"{ROOT}:{{g}}:admins:tokens"
#: Set of "key:<id>" / "team:<id>" whose usage changed since the alerter last looked (the
#: request log writer adds them in its batch, off the request path).
ALERT_DIRTY = f"{ROOT}:{{g}}:alerts:dirty"
#: Hash webhook id -> JSON (url, scopes): where alerts are delivered.
ALERT_WEBHOOKS = f"{ROOT}:{{g}}:alerts:webhooks"
#: Hash "<scope>:<id>" -> JSON thresholds overriding ATLAS_ALERT_THRESHOLDS.
ALERT_RULES = f"{ROOT}:{{g}}:alerts:rules"
#: Stream of fired alerts and their deliveries (bounded).
ALERT_EVENTS = f"{ROOT}:{{g}}:alerts:events"
#: sorted set of every team id, scored by creation time (ms).
TEAM_INDEX = f"{ROOT}:{{g}}:teams"
#: Owner id -> owner record JSON (atlas/ownermodel.py).
OWNERS = f"{ROOT}:{{g}}:owners"


def team_tag(team: str) -> str:
    """The hash tag a team's state shares with its keys' (see the module's docstring)."""
    return f"{ROOT}:{{t:{team}}}:team:"


def team_record(team: str) -> str:
    """String: the team record as JSON (admin's view)."""
    return team_tag(team) + "rec"


def team_limits(team: str) -> str:
    """Hash {rate, burst, tpm, daily, monthly, budget}: what admit.lua enforces for the team
    (0 = no limit), written with the record."""
    return team_tag(team) + "lim"


def team_members(team: str) -> str:
    """Set of the team's key ids."""
    return team_tag(team) + "keys"


def team_request_bucket(team: str) -> str:
    return team_tag(team) + "rb"


def team_token_bucket(team: str) -> str:
    return team_tag(team) + "tb"


def team_window_prefix(team: str) -> str:
    """Prefix of the team's `d:<YYYYMMDD>` and `m:<YYYYMM>` windows (its keys' zone)."""
    return team_tag(team)


def record(key_id: str) -> str:
    """String: the key record as JSON."""
    return tag(key_id) + "rec"


def request_bucket(key_id: str) -> str:
    """Hash {t: tokens left (float), ts: last refill ms}: requests/s with burst."""
    return tag(key_id) + "rb"


def token_bucket(key_id: str) -> str:
    """Hash {t, ts}: tokens/minute bucket."""
    return tag(key_id) + "tb"


def reservations(key_id: str) -> str:
    """Hash rid -> "amount|day|month|priority|model": open reservations."""
    return tag(key_id) + "resv"


def reservation_expiry(key_id: str) -> str:
    """Sorted set rid -> expiry ms, for the reaper."""
    return tag(key_id) + "resv:exp"


def reservation_claims(key_id: str) -> str:
    """Set of rids an ext_proc stream has claimed (the request reached Envoy's upstream side);
    an expired reservation outside it was abandoned before any stream saw it."""
    return tag(key_id) + "resv:claimed"


def window_prefix(key_id: str) -> str:
    """Prefix for `d:<YYYYMMDD>`, `m:<YYYYMM>`, `h:<YYYYMMDDHH>`, `done:<rid>` and `tz` keys."""
    return tag(key_id)


def window_zone(key_id: str) -> str:
    """String: the zone argument of the key's last admission (atlas/windows.py `ZoneSpec`),
    which settle and reap read (they run without the record). admit.lua writes it as
    `<window prefix>tz`."""
    return window_prefix(key_id) + "tz"


def model_prefix(model: str) -> str:
    """Prefix for per-model hourly history. The model name is client input: braces would
    change the hash tag, and its length is bounded."""
    safe = model.replace("{", "(").replace("}", ")")[:128] or "unknown"
    return f"{ROOT}:{{m:{safe}}}:"


def history_hour(prefix: str, hour: str) -> str:
    """Hash of one history hour (`YYYYMMDDHH` of the hour grid) under a key's, model's or the
    global prefix."""
    return f"{prefix}h:{hour}"


def day_window(key_id: str, day: str) -> str:
    """Hash {used, reserved, requests, spend, ...}: one key's day window (`YYYYMMDD`)."""
    return f"{window_prefix(key_id)}d:{day}"


def month_window(key_id: str, month: str) -> str:
    """Hash, as the day window: one key's month window (`YYYYMM`)."""
    return f"{window_prefix(key_id)}m:{month}"


def alert_active(hour_ts: int) -> str:
    """Set of the scopes whose usage changed in the hour starting at `hour_ts` (the anomaly
    alert judges them when the hour closes)."""
    return f"{ROOT}:{{g}}:alerts:active:{hour_ts}"


def alert_fired(scope: str, window: str) -> str:
    """Set of "<limit>:<threshold>" an alert already fired for, in one window of one scope
    (`key:<id>` or `team:<id>`; window `d:<YYYYMMDD>` or `m:<YYYYMM>`): once per window."""
    return f"{ROOT}:{{g}}:alerts:fired:{scope}:{window}"


def request_log_day(day: str) -> str:
    """Stream of one UTC day's (`YYYYMMDD`) request records (atlas/requestlog.py); each day its
    own hash tag, so a cluster spreads the log's days over its slots."""
    return f"{ROOT}:{{rl:{day}}}:requests"


def request_log_count(day: str) -> str:
    """Records one UTC day's request log stream holds (log_append.lua keeps it; the
    stream's hash tag)."""
    return f"{ROOT}:{{rl:{day}}}:requests:n"


def pool_tag(provider: str) -> str:
    """Every key of one provider's pool shares this hash tag (pool_pick.lua, pool_report.lua)."""
    return f"{ROOT}:{{p:{provider}}}:"


def pool_keys(provider: str) -> list[str]:
    """[cooling hash, per-minute use prefix, round-robin cursor, per-minute stats prefix]
    (the scripts append the minute to a prefix)."""
    t = pool_tag(provider)
    return [t + "cool", t + "use:", t + "rr", t + "stats:"]


def owner_keys(owner_id: str) -> str:
    """Ids of the keys created for (or moved to) an owner; a key moved away stays listed
    until read (readers check each record's owner)."""
    return f"{ROOT}:{{g}}:owners:keys:{owner_id}"
