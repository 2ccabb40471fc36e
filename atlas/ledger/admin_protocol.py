"""What admin's side keeps in the ledger besides key records and their accounting: teams,
apps, owners, the request log and alert state, and `AdminLedger`, every port admin uses
(atlas/ledger/protocol.py has the request path's). Implemented by atlas.ledger.redis."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from atlas.ledger.protocol import Audit, History, KeyStore, Pools, Probe, Window
from atlas.ownermodel import OwnerRecord
from atlas.requestlog import RequestRecord
from atlas.teammodel import TeamRecord


class TeamStore(Protocol):
    """Teams: records, the limits admit.lua enforces beside their keys', members, windows."""

    async def create_team(self, team: TeamRecord) -> None: ...

    async def put_team(self, team: TeamRecord) -> None: ...

    async def get_team(self, team_id: str) -> TeamRecord | None: ...

    async def list_teams(self, offset: int = 0, limit: int = 100) -> list[TeamRecord]: ...

    async def count_teams(self) -> int: ...

    async def team_key_ids(self, team_id: str) -> list[str]: ...

    async def delete_team(self, team_id: str) -> None: ...

    async def team_usage(self, team: TeamRecord) -> tuple[Window, Window]: ...


class AppIndex(Protocol):
    """Internal apps: app id -> the key record holding the app's limits and identities."""

    async def claim_app(self, app_id: str, key_id: str) -> bool: ...

    async def app_key_id(self, app_id: str) -> str | None: ...

    async def app_ids(self) -> dict[str, str]: ...

    async def drop_app(self, app_id: str) -> None: ...


class RequestLog(Protocol):
    """The request log (atlas/requestlog.py): batches written off the request path, read by
    day newest first."""

    async def log_requests(self, records: Sequence[RequestRecord], dirty: Sequence[str]) -> None:
        """Append `records`; mark `dirty` scopes for the alerter."""

    async def request_log_page(
        self, day: str, before: str | None, count: int
    ) -> list[tuple[str, list[RequestRecord]]]: ...


class OwnerStore(Protocol):
    """The people keys belong to (atlas/ownermodel.py); each key copies its owner's
    `valid_until`, so authz never reads this store."""

    async def create_owner(self, owner: OwnerRecord) -> bool:
        """False when the id is taken."""

    async def put_owner(self, owner: OwnerRecord) -> None: ...

    async def get_owner(self, owner_id: str) -> OwnerRecord | None: ...

    async def list_owners(self) -> list[OwnerRecord]: ...

    async def delete_owner(self, owner_id: str) -> None: ...

    async def owner_key_ids(self, owner_id: str) -> list[str]:
        """Ids listed for the owner; a caller checks each record's `owner` (a key moved to
        another owner stays listed until `forget_owner_keys`)."""

    async def forget_owner_keys(self, owner_id: str, key_ids: Sequence[str]) -> None: ...


class AlertStore(Protocol):
    """Alert state: the scopes whose usage changed, the once-per-window fired sets, the
    webhooks, each scope's own thresholds and the stream of alert events."""

    async def pop_dirty(self, count: int) -> list[str]: ...

    async def first_time(self, scope: str, window: str, member: str, ttl_s: int) -> bool: ...

    async def mark_active(self, hour_ts: int, scopes: list[str], ttl_s: int) -> None: ...

    async def active_scopes(self, hours: list[int]) -> list[str]:
        """The scopes marked active in any of these hours."""

    async def webhooks(self) -> dict[str, dict[str, Any]]: ...

    async def rules(self) -> dict[str, list[int]]:
        """Scopes with their own thresholds (an empty list: no threshold alerts)."""

    async def add_event(self, event: dict[str, Any]) -> None: ...


class AdminLedger(
    Probe,
    KeyStore,
    History,
    Audit,
    Pools,
    TeamStore,
    AppIndex,
    OwnerStore,
    RequestLog,
    Protocol,
):
    """What admin uses: key records, history, the audit stream, provider pools, teams, apps,
    owners and the request log (alert state is its own store: atlas/ledger/redis/alerts.py)."""
