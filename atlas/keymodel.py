"""The API key record: what an admin configures and authz enforces.

Secrets are never stored: a key is found by the sha256 of its secret. The record is stored
as JSON by the ledger and cached by authz.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from atlas.errors import Denied
from atlas.settings import PRIORITIES, Priority

SECRET_PREFIX = "sk-atlas-"
KeyStatus = Literal["active", "disabled"]
#: Prefixes that say what kind of secret it is and hold none of its entropy: a hint may show them.
PUBLIC_PREFIXES = (SECRET_PREFIX, "sk-")
#: A hint shows at most this many of a secret's characters (its last ones).
HINT_CHARS = 4
ELLIPSIS = "…"


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


#: A team id: a short slug an admin chooses (it appears in key ids, refusals and metrics).
TEAM_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,31}$"
#: Between a key id's own part and its team: `key_<hex>.<team>`.
TEAM_SEPARATOR = "."


def new_key_id(team: str | None = None) -> str:
    """`key_<16 hex>`, or `key_<16 hex>.<team>` for a key of a team: the ledger derives the
    hash tag from the id (atlas/ledger/keys.py), so a team's keys and the team's own limits
    share one Redis Cluster slot and one admission script checks both."""
    own = "key_" + secrets.token_hex(8)
    return own + TEAM_SEPARATOR + team if team else own


def team_of(key_id: str) -> str:
    """The team a key id names ("" for a key of no team)."""
    _, sep, team = key_id.partition(TEAM_SEPARATOR)
    return team if sep else ""


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def principal_hash(principal: str) -> str:
    """The secret-index hash an app's mTLS principal is found by (atlas/identity.py)."""
    return hash_secret("mtls:" + principal)


def app_secret_hash(app_id: str, secret: str) -> str:
    """The secret-index hash an app's shared secret is found by (scoped to its app id)."""
    return hash_secret(f"app:{app_id}:{secret}")


def _public_prefix(text: str) -> str:
    return next((p for p in PUBLIC_PREFIXES if text.startswith(p)), "")


def secret_hint(secret: str) -> str:
    """`sk-atlas-…abcd`: a public prefix and at most the last 4 characters, fewer for a short
    secret (never more than a quarter of what follows the prefix)."""
    prefix = _public_prefix(secret)
    rest = secret[len(prefix) :]
    shown = min(HINT_CHARS, len(rest) // 4)
    return prefix + ELLIPSIS + (rest[-shown:] if shown else "")


def bounded_hint(hint: str) -> str:
    """A stored hint with at most 4 secret characters. Hints of older versions held the
    first 12 characters (`team-a-chose…`); those keep a public prefix and 4 more."""
    prefix = _public_prefix(hint)
    rest = hint[len(prefix) :]
    if rest.startswith(ELLIPSIS) and len(rest) <= len(ELLIPSIS) + HINT_CHARS:
        return hint
    return prefix + rest.replace(ELLIPSIS, "")[:HINT_CHARS] + ELLIPSIS


def priority_rank(p: Priority) -> int:
    return PRIORITIES.index(p)


def cap_priority(asked: Priority, ceiling: Priority) -> Priority:
    """A request may lower its priority but never rise above the key's `max_priority`."""
    return asked if priority_rank(asked) <= priority_rank(ceiling) else ceiling


class KeyRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    name: str
    secret_hash: str
    secret_hint: str = Field(description="at most 4 characters of the secret, for people")
    daily_limit: int
    monthly_limit: int
    rate_per_sec: float
    burst: int
    tokens_per_minute: int | None = None
    max_concurrent: int | None = None
    monthly_budget_usd: float | None = None
    #: Limits of each end user the caller names (x-atlas-end-user or the body's `user`):
    #: tokens a day and requests a minute, within this key (None: none).
    end_user_daily_limit: int | None = None
    end_user_requests_per_minute: int | None = None
    priority: Priority = "normal"
    max_priority: Priority = "critical"
    models: list[str] | None = None
    expires_at: datetime | None = None
    status: KeyStatus = "active"
    shadow: bool = False
    #: IANA zone of the daily and monthly windows (None: the deployment's
    #: ATLAS_WINDOW_TIMEZONE). Validated by admin; the ledger falls back to the default for a
    #: name this machine's tz database does not know.
    window_timezone: str | None = None
    #: The team whose limits also apply (fixed at creation: the key id carries it).
    team: str | None = None
    #: The person the key belongs to (an owner record, admin/owners), and that owner's
    #: `valid_until`, copied here by admin so authz refuses the key without another lookup.
    owner: str | None = None
    owner_valid_until: datetime | None = None
    #: An internal app's record (admin/routes/apps.py): its id, the mTLS principals it is
    #: known by, and the hash of its shared secret. Its `secret_hash` is of a secret nobody
    #: was shown: an app is found by principal or shared secret, not by a bearer key.
    app: str | None = None
    principals: list[str] = Field(default_factory=list)
    app_secret_hash: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    updated_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    _hint = field_validator("secret_hint")(bounded_hint)

    def lookup_hashes(self) -> list[str]:
        """Every secret-index entry that finds this record: its key's, and an app's
        principals' and shared secret's."""
        found_by = [self.secret_hash, *(principal_hash(p) for p in self.principals)]
        return found_by + ([self.app_secret_hash] if self.app_secret_hash else [])

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now

    def check_usable(self, now: datetime) -> None:
        """Raise the 403 `Denied` for a disabled or expired key (authz and admin's self-serve
        routes refuse them alike)."""
        if self.status != "active":
            raise Denied(
                403, "This API key is disabled.", type="permission_denied", code="key_disabled"
            )
        if self.expired(now):
            raise Denied(
                403, "This API key has expired.", type="permission_denied", code="key_expired"
            )
        if self.owner_valid_until is not None and self.owner_valid_until <= now:
            raise Denied(
                403,
                "The owner of this API key is no longer valid.",
                type="permission_denied",
                code="owner_expired",
            )


def end_user_tag(rec: KeyRecord, end_user: str) -> str:
    """What admit.lua knows an end user by: 16 hex digits of a hash of the name, when the key
    limits its end users and the request names one ('' otherwise: no end-user limit)."""
    if not end_user or not (rec.end_user_daily_limit or rec.end_user_requests_per_minute):
        return ""
    return hashlib.sha256(end_user.encode()).hexdigest()[:16]
