"""Team records in Redis: the record and the limits admit.lua enforces (one hash tag with the
team's keys, atlas/ledger/keys.py), the index of team ids, the members, and the team's own
windows as reports read them (`atlas.ledger.protocol.TeamStore`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from atlas.ledger import keys
from atlas.ledger.protocol import Window
from atlas.ledger.redis.client import Conn
from atlas.ledger.redis.history import window_of
from atlas.teammodel import TeamRecord
from atlas.windows import Zone, window_names


class RedisTeams:
    def __init__(self, conn: Conn) -> None:
        self._c = conn
        self._r = conn.r

    async def create_team(self, team: TeamRecord) -> None:
        """:raises ValueError: a team with this id exists."""

        async def run() -> bool:
            if not await self._r.set(keys.team_record(team.id), team.model_dump_json(), nx=True):
                return False
            await self._r.hset(keys.team_limits(team.id), mapping=team.enforced())
            await self._r.zadd(keys.TEAM_INDEX, {team.id: int(team.created_at.timestamp() * 1000)})
            return True

        if not await self._c.call("create_team", run):
            raise ValueError(f"team {team.id!r} already exists")

    async def put_team(self, team: TeamRecord) -> None:
        """Replace a record and its enforced limits in one transaction (one slot): admissions
        see the old limits or the new ones, never a mix."""

        async def run() -> None:
            pipe = self._r.pipeline(transaction=True)
            pipe.set(keys.team_record(team.id), team.model_dump_json())
            pipe.hset(keys.team_limits(team.id), mapping=team.enforced())
            await pipe.execute()

        await self._c.call("put_team", run)

    async def get_team(self, team_id: str) -> TeamRecord | None:
        raw = await self._c.call("get_team", lambda: self._r.get(keys.team_record(team_id)))
        return TeamRecord.model_validate_json(raw) if raw else None

    async def list_teams(self, offset: int = 0, limit: int = 100) -> list[TeamRecord]:
        ids = await self._c.call(
            "list_teams", lambda: self._r.zrange(keys.TEAM_INDEX, offset, offset + limit - 1)
        )
        teams = [await self.get_team(t) for t in ids]
        return [t for t in teams if t is not None]

    async def count_teams(self) -> int:
        return int(await self._c.call("count_teams", lambda: self._r.zcard(keys.TEAM_INDEX)))

    async def team_key_ids(self, team_id: str) -> list[str]:
        ids = await self._c.call("team_keys", lambda: self._r.smembers(keys.team_members(team_id)))
        return sorted(ids)

    async def delete_team(self, team_id: str) -> None:
        """Remove a team with no keys (its windows expire on their own).

        :raises ValueError: the team still has keys."""

        async def run() -> bool:
            if await self._r.scard(keys.team_members(team_id)):
                return False
            pipe = self._r.pipeline(transaction=True)
            pipe.delete(
                keys.team_record(team_id),
                keys.team_limits(team_id),
                keys.team_request_bucket(team_id),
                keys.team_token_bucket(team_id),
            )
            await pipe.execute()
            await self._r.zrem(keys.TEAM_INDEX, team_id)
            return True

        if not await self._c.call("delete_team", run):
            raise ValueError(f"team {team_id!r} still has keys: delete or revoke them first")

    async def team_windows(self, team: TeamRecord, zone: Zone, now_s: int) -> tuple[Window, Window]:
        """The team's day and month windows now (in its zone)."""
        names = window_names(now_s, zone)
        prefix = keys.team_window_prefix(team.id)

        async def run() -> Sequence[Any]:
            pipe = self._r.pipeline(transaction=False)
            pipe.hgetall(f"{prefix}d:{names.day}")
            pipe.hgetall(f"{prefix}m:{names.month}")
            return await pipe.execute()

        day, month = await self._c.call("team_windows", run)
        return (
            window_of(day, team.daily_limit or 0, names.day_reset_s),
            window_of(month, team.monthly_limit or 0, names.month_reset_s),
        )
