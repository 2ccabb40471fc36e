"""What admin keeps about people: named admin credentials and key owners, the records as
stored (JSON) and the small store seams admin calls (`atlas.ledger.redis.admins` /
`owners` implement them; unit tests may pass fakes)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal, Protocol

from pydantic import BaseModel, Field

Role = Literal["viewer", "operator", "owner"]
#: Each role may do what the roles before it may: read < change keys/teams/apps < manage admins.
ROLES: tuple[Role, ...] = ("viewer", "operator", "owner")
#: An admin's or an owner's id: a lowercase slug (it names them in the audit stream).
SLUG_PATTERN = r"^[a-z0-9][a-z0-9_.@-]{0,62}$"


def role_rank(role: Role) -> int:
    return ROLES.index(role)


def _now() -> datetime:
    return datetime.now(UTC)


class AdminRecord(BaseModel):
    """A named admin credential. `token_hash` is the sha256 of its token (never the token)."""

    name: str
    role: Role
    token_hash: str
    disabled: bool = False
    created_at: datetime = Field(default_factory=_now)
    updated_at: datetime = Field(default_factory=_now)


class AdminStore(Protocol):
    """Admin records by name (JSON) and the token-hash -> name index."""

    async def create_admin(self, name: str, record: str, token_hash: str) -> bool:
        """False when an admin with this name exists."""
        ...

    async def get_admin(self, name: str) -> str | None: ...

    async def admin_records(self) -> dict[str, str]: ...

    async def admin_for_token(self, token_hash: str) -> str | None: ...

    async def put_admin(
        self, name: str, record: str, *, old_token_hash: str | None, new_token_hash: str | None
    ) -> None: ...

    async def delete_admin(self, name: str, token_hash: str) -> None: ...
