"""What admin writes to the audit stream for each change."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import Request
from pydantic import BaseModel

from admin.auth import Admin
from admin.schemas import KeyPublic
from atlas.keymodel import KeyRecord
from atlas.ledger.protocol import Audit


def _public(rec: KeyRecord | None) -> dict[str, Any] | None:
    return None if rec is None else KeyPublic.of(rec).model_dump(mode="json")


def snapshot(record: BaseModel | None) -> dict[str, Any] | None:
    """A stored record (a team, an owner) as an audit entry's before/after."""
    return None if record is None else record.model_dump(mode="json")


def _actor(who: object) -> dict[str, Any]:
    """The admin's name and how they signed in (`who` from another caller: as given)."""
    if isinstance(who, Admin):
        return {"actor": who.name, "via": who.via, "role": who.role}
    return {"actor": str(who)}


async def record_change(
    ledger: Audit,
    request: Request,
    who: Admin,
    action: str,
    *,
    before: KeyRecord | None,
    after: KeyRecord | None,
) -> None:
    """Who (the admin's name and sign-in, from which address and client), what, before/after,
    when.
    Secrets and their hashes are never written."""
    record = after or before
    key_id = record.id if record is not None else None
    await ledger.audit(
        {
            "at": datetime.now(UTC).isoformat(),
            **_actor(who),
            "client": request.client.host if request.client else None,
            "user_agent": request.headers.get("user-agent"),
            "action": action,
            "key_id": key_id,
            "before": _public(before),
            "after": _public(after),
        }
    )


async def record_event(
    ledger: Audit,
    request: Request,
    who: object,
    action: str,
    *,
    subject: str,
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
) -> None:
    """A change to something other than a key (a team, an app, an alert rule): who did it,
    what, its id, before/after (never a secret), when."""
    await ledger.audit(
        {
            "at": datetime.now(UTC).isoformat(),
            **_actor(who),
            "client": request.client.host if request.client else None,
            "user_agent": request.headers.get("user-agent"),
            "action": action,
            "subject": subject,
            "before": before,
            "after": after,
        }
    )
