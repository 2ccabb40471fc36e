"""`RedisLedger`: every port of `atlas.ledger.protocol` on one Redis/Valkey connection, composed
from one part per concern (key store, admissions, settlements, history, audit)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from atlas.keymodel import KeyRecord
from atlas.ledger.admin_protocol import AdminLedger
from atlas.ledger.protocol import (
    Admission,
    Admissions,
    AdmitRequest,
    HourRow,
    KeyUsage,
    Leases,
    Ledger,
    PoolObservation,
    PoolPick,
    Pools,
    PoolState,
    Reaping,
    ReapTotals,
    Settlement,
    Settlements,
    SettleOutcome,
    SettleResult,
    Window,
)
from atlas.ledger.redis.admission import RedisAdmissions
from atlas.ledger.redis.apps import RedisApps
from atlas.ledger.redis.audit import RedisAudit
from atlas.ledger.redis.client import Conn, connect
from atlas.ledger.redis.history import RedisHistory, ScopeOrPrefix
from atlas.ledger.redis.keystore import RedisKeyStore
from atlas.ledger.redis.owners import RedisOwners
from atlas.ledger.redis.pools import RedisPools
from atlas.ledger.redis.requestlog import RedisRequestLog
from atlas.ledger.redis.scripts import Scripts
from atlas.ledger.redis.settlement import RedisSettlements
from atlas.ledger.redis.teams import RedisTeams
from atlas.ledger.redis.zones import Zones
from atlas.ownermodel import OwnerRecord
from atlas.requestlog import RequestRecord
from atlas.settings import Settings
from atlas.teammodel import TeamRecord
from atlas.windows import Zone


class RedisLedger:
    def __init__(
        self,
        client: Any,
        settings: Settings,
        *,
        buffer_history: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """:param buffer_history: sum settlements' shared (per-model, global) history in
        memory until `flush_history` (extproc: one pipeline a second).
        :param clock: epoch s; picks the hour whose zone spec the scripts get (Lua itself
        reads Redis TIME)."""
        self.conn = Conn(client, settings)
        self.scripts = Scripts.register(client)
        self.zones = Zones(settings, clock=clock)
        self.key_store = RedisKeyStore(self.conn)
        self.admissions = RedisAdmissions(self.conn, self.scripts, self.zones, settings)
        self.settlements = RedisSettlements(
            self.conn, self.scripts, self.zones, settings, buffer_history=buffer_history
        )
        self.windows = RedisHistory(self.conn, self.zones, settings)
        self.audit_log = RedisAudit(self.conn)
        self.pools = RedisPools(self.conn)
        self.teams = RedisTeams(self.conn)
        self.owners = RedisOwners(self.conn)
        self.apps = RedisApps(self.conn)
        self.requests = RedisRequestLog(self.conn, settings)

    @classmethod
    def from_settings(cls, settings: Settings, *, buffer_history: bool = False) -> RedisLedger:
        return cls(connect(settings), settings, buffer_history=buffer_history)

    async def close(self) -> None:
        await self.conn.close()

    async def ping(self) -> None:
        await self.conn.call("ping", self.conn.r.ping)

    # ---- KeyStore ----------------------------------------------------------------------
    async def create_key(self, rec: KeyRecord) -> None:
        await self.key_store.create_key(rec)

    async def put_key(
        self,
        rec: KeyRecord,
        *,
        old_secret_hash: str | None = None,
        old_lookup_hashes: list[str] | None = None,
    ) -> None:
        await self.key_store.put_key(
            rec, old_secret_hash=old_secret_hash, old_lookup_hashes=old_lookup_hashes
        )

    async def delete_key(self, rec: KeyRecord) -> None:
        await self.key_store.delete_key(rec)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        return await self.key_store.get_key(key_id)

    async def find_key(self, secret_hash: str) -> KeyRecord | None:
        return await self.key_store.find_key(secret_hash)

    async def get_keys(self, key_ids: Sequence[str]) -> list[KeyRecord]:
        return await self.key_store.get_keys(key_ids)

    async def list_key_ids(self, offset: int = 0, limit: int = 100) -> list[str]:
        return await self.key_store.list_key_ids(offset, limit)

    async def count_keys(self) -> int:
        return await self.key_store.count_keys()

    def key_changes(self) -> AsyncIterator[str]:
        return self.key_store.key_changes()

    # ---- Admissions and Leases ---------------------------------------------------------
    async def admit(self, rec: KeyRecord, req: AdmitRequest) -> Admission:
        return await self.admissions.admit(rec, req)

    async def lease(self, leases: Mapping[str, Collection[str]]) -> int:
        return await self.admissions.lease(leases)

    async def release(self, releases: Mapping[str, Collection[str]]) -> int:
        return await self.admissions.release(releases)

    async def add_inflight(self, delta: int) -> int:
        return await self.admissions.add_inflight(delta)

    # ---- Settlements and Reaping -------------------------------------------------------
    async def settle(self, s: Settlement) -> SettleResult:
        return await self.settlements.settle(s)

    async def settle_many(self, ss: Sequence[Settlement]) -> list[SettleOutcome]:
        return await self.settlements.settle_many(ss)

    async def flush_history(self) -> None:
        await self.settlements.flush_history()

    async def reap(self, key_id: str, *, charge: bool = True) -> tuple[int, int]:
        return await self.settlements.reap(key_id, charge=charge)

    async def reap_keys(self, key_ids: Sequence[str], *, charge: bool = True) -> ReapTotals:
        return await self.settlements.reap_keys(key_ids, charge=charge)

    async def try_lock(self, name: str, owner: str, ttl_ms: int) -> bool:
        return await self.settlements.try_lock(name, owner, ttl_ms)

    # ---- History -----------------------------------------------------------------------
    @property
    def hour_offset_s(self) -> int:
        """Offset of the history-hour grid, s."""
        return self.zones.hour_offset_s

    def zone_of(self, rec: KeyRecord | None) -> Zone:
        return self.zones.zone_of(rec)

    def hour_start(self, epoch_s: float) -> int:
        return self.zones.hour_start(epoch_s)

    async def server_time(self) -> float:
        return await self.windows.server_time()

    async def usage(self, rec: KeyRecord) -> KeyUsage:
        return await self.windows.usage(rec)

    async def history(self, scope: ScopeOrPrefix, start_ts: int, hours: int) -> list[HourRow]:
        return await self.windows.history(scope, start_ts, hours)

    async def day_windows(self, key_ids: Sequence[str], day: str) -> list[dict[str, int]]:
        return await self.windows.day_windows(key_ids, day)

    async def add_history(
        self, entries: Sequence[tuple[ScopeOrPrefix, int, dict[str, int]]]
    ) -> None:
        await self.windows.add_history(entries)

    async def add_day_window(self, key_id: str, day: str, fields: dict[str, int]) -> None:
        await self.windows.add_day_window(key_id, day, fields)

    async def add_month_window(self, key_id: str, month: str, fields: dict[str, int]) -> None:
        await self.windows.add_month_window(key_id, month, fields)

    async def add_window_fields(self, key_id: str, window: str, fields: dict[str, int]) -> None:
        await self.windows.add_window_fields(key_id, window, fields)

    # ---- Pools -------------------------------------------------------------------------
    async def pick(
        self, provider: str, strategy: str, estimate: int, members: Sequence[tuple[str, int, int]]
    ) -> PoolPick:
        return await self.pools.pick(provider, strategy, estimate, members)

    async def report(self, provider: str, observations: Sequence[PoolObservation]) -> None:
        await self.pools.report(provider, observations)

    async def pool_state(self, provider: str, minutes: int) -> PoolState:
        return await self.pools.pool_state(provider, minutes)

    # ---- Teams -------------------------------------------------------------------------
    async def create_team(self, team: TeamRecord) -> None:
        await self.teams.create_team(team)

    async def put_team(self, team: TeamRecord) -> None:
        await self.teams.put_team(team)

    async def get_team(self, team_id: str) -> TeamRecord | None:
        return await self.teams.get_team(team_id)

    async def list_teams(self, offset: int = 0, limit: int = 100) -> list[TeamRecord]:
        return await self.teams.list_teams(offset, limit)

    async def count_teams(self) -> int:
        return await self.teams.count_teams()

    async def team_key_ids(self, team_id: str) -> list[str]:
        return await self.teams.team_key_ids(team_id)

    async def delete_team(self, team_id: str) -> None:
        await self.teams.delete_team(team_id)

    async def team_usage(self, team: TeamRecord) -> tuple[Window, Window]:
        now = int(await self.windows.server_time())
        return await self.teams.team_windows(team, self.zones.zone_of(team), now)

    # ---- Owners ------------------------------------------------------------------------
    async def create_owner(self, owner: OwnerRecord) -> bool:
        return await self.owners.create_owner(owner)

    async def put_owner(self, owner: OwnerRecord) -> None:
        await self.owners.put_owner(owner)

    async def get_owner(self, owner_id: str) -> OwnerRecord | None:
        return await self.owners.get_owner(owner_id)

    async def list_owners(self) -> list[OwnerRecord]:
        return await self.owners.list_owners()

    async def delete_owner(self, owner_id: str) -> None:
        await self.owners.delete_owner(owner_id)

    async def owner_key_ids(self, owner_id: str) -> list[str]:
        return await self.owners.owner_key_ids(owner_id)

    async def forget_owner_keys(self, owner_id: str, key_ids: Sequence[str]) -> None:
        await self.owners.forget_owner_keys(owner_id, key_ids)

    # ---- Apps --------------------------------------------------------------------------
    async def claim_app(self, app_id: str, key_id: str) -> bool:
        return await self.apps.claim_app(app_id, key_id)

    async def app_key_id(self, app_id: str) -> str | None:
        return await self.apps.app_key_id(app_id)

    async def app_ids(self) -> dict[str, str]:
        return await self.apps.app_ids()

    async def drop_app(self, app_id: str) -> None:
        await self.apps.drop_app(app_id)

    # ---- Request log -------------------------------------------------------------------
    async def log_requests(self, records: Sequence[RequestRecord], dirty: Sequence[str]) -> None:
        await self.requests.log_requests(records, dirty)

    async def request_log_page(
        self, day: str, before: str | None, count: int
    ) -> list[tuple[str, list[RequestRecord]]]:
        return await self.requests.request_log_page(day, before, count)

    # ---- Audit -------------------------------------------------------------------------
    async def audit(self, entry: dict[str, Any]) -> None:
        await self.audit_log.audit(entry)

    async def audit_entries(self, limit: int, before: str | None = None) -> list[dict[str, Any]]:
        return await self.audit_log.audit_entries(limit, before)


if TYPE_CHECKING:  # mypy checks RedisLedger against every port

    def _ports(
        led: RedisLedger,
    ) -> tuple[Ledger, AdminLedger, Admissions, Leases, Settlements, Reaping, Pools]:
        return led, led, led, led, led, led, led
