"""Admissions and the claims on them: admit.lua once per Check, lease.lua for live streams,
release.lua for requests that never reached the upstream (`Admissions`, `Leases`), and the
global in-flight total shedding reads."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

from atlas.keymodel import KeyRecord
from atlas.ledger import keys
from atlas.ledger.protocol import Admission, AdmitRequest, check_admit
from atlas.ledger.redis.client import Conn
from atlas.ledger.redis.scripts import AdmitCodec, LeaseCodec, ReleaseCodec, Scripts
from atlas.ledger.redis.zones import Zones
from atlas.settings import Settings


class RedisAdmissions:
    def __init__(self, conn: Conn, scripts: Scripts, zones: Zones, settings: Settings) -> None:
        self._c = conn
        self._scripts = scripts
        self._zones = zones
        ttl_ms = settings.reservation_ttl_s * 1000
        self.admit_codec = AdmitCodec(
            ttl_ms=ttl_ms,
            history_ttl_s=settings.history_days * 86400,
            claim_ms=round(settings.claim_timeout_s * 1000),
        )
        self._lease = LeaseCodec(ttl_ms)
        self._release = ReleaseCodec()

    def call(self, rec: KeyRecord, req: AdmitRequest) -> tuple[list[str], list[Any]]:
        """KEYS and ARGV of admit.lua for this admission (the generic, cluster form)."""
        return self.admit_codec.keys(rec.id), self.admit_codec.args(
            rec, req, self._zones.text(rec.window_timezone)
        )

    def command(self, rec: KeyRecord, req: AdmitRequest) -> bytes:
        """The same EVALSHA as `call`, pre-encoded (the plain-server form)."""
        zone = self._zones.arg(rec.window_timezone)[3]
        return self.admit_codec.command(self._scripts.admit.sha, rec, req, zone)

    async def admit(self, rec: KeyRecord, req: AdmitRequest) -> Admission:
        """:raises LedgerInputError: a number of `req` outside `atlas.limits` (nothing written)."""
        check_admit(req)
        script = self._scripts.admit
        if self._c.lane is None:  # cluster: redis-py routes the script by its keys
            ks, args = self.call(rec, req)
            r: Sequence[Any] = await self._c.call("admit", lambda: script(keys=ks, args=args))
        else:
            command = self.command(rec, req)
            r = await self._c.call("admit", lambda: self._c.run_lane(script, command))
        return AdmitCodec.decode(r, rec)

    async def lease(self, leases: Mapping[str, Collection[str]]) -> int:
        """Claim or renew open reservations (key id -> reservation ids) for live streams:
        each deadline moves to now + the reservation TTL, in one pipelined round trip. Ids
        already settled or reaped are skipped. Returns how many were claimed or renewed."""
        kids = [k for k, rids in leases.items() if rids]
        if not kids:
            return 0
        calls = [(self._lease.keys(k), self._lease.args(leases[k])) for k in kids]
        rows = await self._c.run_per_key("lease", self._scripts.lease, calls)
        return self._lease.decode(self._c.ok_rows("lease", kids, rows))

    async def release(self, releases: Mapping[str, Collection[str]]) -> int:
        """Give up open reservations (key id -> reservation ids) whose request never reached
        the upstream: the reaper releases them, charged nothing, on its next pass."""
        kids = [k for k, rids in releases.items() if rids]
        if not kids:
            return 0
        calls = [(self._release.keys(k), self._release.args(releases[k])) for k in kids]
        rows = await self._c.run_per_key("release", self._scripts.release, calls)
        return self._release.decode(self._c.ok_rows("release", kids, rows))

    async def add_inflight(self, delta: int) -> int:
        """Add to the global in-flight reserved tokens; the new total."""
        return int(await self._c.call("inflight", lambda: self._c.r.incrby(keys.INFLIGHT, delta)))
