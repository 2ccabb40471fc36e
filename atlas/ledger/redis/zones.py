"""The time zone of each key's windows, and the zone argument the scripts get for it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from atlas.keymodel import KeyRecord
from atlas.ledger.redis.scripts import bulk
from atlas.settings import Settings
from atlas.teammodel import TeamRecord
from atlas.windows import Zone, default_zone, hour_start, load_zone, zone_spec

log = logging.getLogger("atlas.ledger.redis")

#: Zone arguments kept, one per distinct zone name of keys (cleared past this many).
MAX_CACHED_ZONES = 1024


class Zones:
    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.time) -> None:
        """:param clock: epoch s; picks the hour whose zone spec the scripts get (Lua itself
        reads Redis TIME)."""
        self._clock = clock
        #: Offset of the history-hour grid (`h:` keys), s.
        self.hour_offset_s = settings.window_utc_offset_min * 60
        self._default = default_zone(settings.window_timezone, settings.window_utc_offset_min)
        # Zone name (None: the default) -> (hour start s, hour end s, text, RESP bulk) of its
        # zone argument.
        self._args: dict[str | None, tuple[float, float, str, bytes]] = {}

    def zone_of(self, rec: KeyRecord | TeamRecord | None) -> Zone:
        """The zone of a key's (or a team's) day and month windows: its own, else the default
        (also for a name this machine's tz database does not know). None: the default."""
        name = rec.window_timezone if rec is not None else None
        if name is None:
            return self._default
        try:
            return load_zone(name)
        except ValueError:
            return self._default

    def hour_start(self, epoch_s: float) -> int:
        """Start (epoch s) of the history hour holding `epoch_s`."""
        return hour_start(epoch_s, self.hour_offset_s)

    def text(self, name: str | None) -> str:
        return self.arg(name)[2]

    def arg(self, name: str | None) -> tuple[float, float, str, bytes]:
        """(hour start, hour end, text, RESP bulk) of the scripts' zone argument for a key's
        zone name: zoneinfo runs once per zone and hour (~130 µs), an admission pays a clock
        read and a lookup (~0.2 µs)."""
        now = self._clock()
        hit = self._args.get(name)
        if hit is not None and hit[0] <= now < hit[1]:
            return hit
        hour = int(now // 3600)
        zone: Zone = self._default
        if name is not None:
            try:
                zone = load_zone(name)
            except ValueError:
                log.warning("key zone %r unknown here: its windows use the default zone", name)
        text = zone_spec(zone, hour * 3600, self.hour_offset_s).text
        if len(self._args) >= MAX_CACHED_ZONES:
            self._args.clear()
        hit = self._args[name] = (hour * 3600, hour * 3600 + 3600, text, bulk(text.encode()))
        return hit
