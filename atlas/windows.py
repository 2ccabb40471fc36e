"""Calendar windows in a time zone: day, month and history-hour names, and when they reset.

Lua cannot read time-zone rules, so Python turns a zone (an IANA name, read with zoneinfo) into
what a script needs: a `ZoneSpec`, the UTC offsets in effect from shortly before now until
weeks ahead and the instants at which they change. The scripts pick the offset by Redis
`TIME`, so a Redis clock up to an hour behind (`SPEC_BEFORE_S`) or weeks ahead of the Python
clock around a transition still names the right day. `_clock.lua` and `window_names` compute
names and resets from a spec the same way (tests/unit/test_windows.py;
tests/integration/test_windows_lua.py runs the Lua against this mirror).

- A day is the local calendar day: 23 or 25 hours long on a DST change, 23.5 or 24.5 on Lord
  Howe's. It resets at the first instant whose local time reaches the next midnight (the
  transition itself where DST skips midnight, as in America/Havana).
- History hours (`h:` keys) are named on a fixed-offset grid (`ATLAS_WINDOW_UTC_OFFSET_MIN`,
  UTC by default), not in the key's zone: a DST zone repeats one local hour and skips
  another, and keys of different zones share the model and global history. In a zone whose
  offset is not a whole number of hours (Asia/Kolkata) an hour bucket straddles the local
  midnight, so per-day sums of history (forecasts, what-if) are exact to the hour only.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

#: A spec lists transitions from this long before its hour (a Redis clock behind ours)...
SPEC_BEFORE_S = 3600
#: ...until this long after it: the month reset of any instant in the hour, and more than
#: `_clock.lua`'s ZONE_TTL_S (30 days) that a key's stored zone is used for.
SPEC_AFTER_S = 40 * 86400
#: A zone: an IANA zone (tzinfo), or a fixed offset in s east of UTC (the legacy
#: ATLAS_WINDOW_UTC_OFFSET_MIN; any size, as tests shift windows by whole days with it).
Zone = tzinfo | int

#: Offsets are sampled this far apart, then each change is bisected to the second (no zone
#: changes its offset twice within 6 hours).
_SAMPLE_S = 6 * 3600


@dataclass(slots=True, frozen=True)
class WindowNames:
    day: str  # YYYYMMDD, local
    month: str  # YYYYMM, local
    hour: str  # YYYYMMDDHH on the history grid
    day_reset_s: int  # epoch s: the next local day starts
    month_reset_s: int  # epoch s: the next local month starts


@dataclass(slots=True, frozen=True)
class ZoneSpec:
    """What `_clock.lua` needs of a zone, as one ARGV text (`text`).

    `offsets[0]` is in effect before `transitions[0]`, `offsets[i + 1]` from `transitions[i]`
    on (epoch s; offsets in s east of UTC). `hour_offset_s` is the history grid's offset.
    """

    hour_offset_s: int
    offsets: tuple[int, ...]
    transitions: tuple[int, ...] = ()

    @classmethod
    def fixed(cls, offset_s: int, hour_offset_s: int | None = None) -> ZoneSpec:
        return cls(offset_s if hour_offset_s is None else hour_offset_s, (offset_s,))

    @property
    def text(self) -> str:
        """`<hour offset> <offset> [<transition> <offset>]...`: the scripts' zone argument."""
        parts = [self.hour_offset_s, self.offsets[0]]
        for at, off in zip(self.transitions, self.offsets[1:], strict=True):
            parts += [at, off]
        return " ".join(str(p) for p in parts)

    def segment(self, epoch_s: float) -> int:
        """Index into `offsets` of the one in effect at `epoch_s`."""
        i = 0
        while i < len(self.transitions) and self.transitions[i] <= epoch_s:
            i += 1
        return i

    def first_local(self, i: int, wall_s: int) -> int:
        """The first instant, from segment `i` on, whose local time (`epoch + offset`) reaches
        `wall_s`. Where DST skips `wall_s` it is the transition; where the clock falls back
        over it, its first occurrence."""
        while True:
            at = wall_s - self.offsets[i]
            if i > 0:
                at = max(at, self.transitions[i - 1])
            if i == len(self.transitions) or at < self.transitions[i]:
                return at
            i += 1


def _civil(days: int) -> tuple[int, int, int]:
    d = datetime(1970, 1, 1) + timedelta(days=days)
    return d.year, d.month, d.day


def names_at(epoch_s: int, spec: ZoneSpec) -> WindowNames:
    """The windows holding `epoch_s` under `spec`: `_clock.lua`'s `clock_at`, rule for rule."""
    i = spec.segment(epoch_s)
    days = (epoch_s + spec.offsets[i]) // 86400
    y, m, d = _civil(days)
    ny, nm = (y + 1, 1) if m == 12 else (y, m + 1)
    next_month = (datetime(ny, nm, 1) - datetime(1970, 1, 1)).days * 86400
    hour_s = epoch_s + spec.hour_offset_s
    hy, hm, hd = _civil(hour_s // 86400)
    return WindowNames(
        day=f"{y:04d}{m:02d}{d:02d}",
        month=f"{y:04d}{m:02d}",
        hour=f"{hy:04d}{hm:02d}{hd:02d}{hour_s % 86400 // 3600:02d}",
        day_reset_s=spec.first_local(i, (days + 1) * 86400),
        month_reset_s=spec.first_local(i, next_month),
    )


def hour_name(epoch_s: int, hour_offset_s: int = 0) -> str:
    """The history hour (`h:` key suffix) holding `epoch_s`."""
    return datetime.fromtimestamp(epoch_s + hour_offset_s, UTC).strftime("%Y%m%d%H")


def hour_start(epoch_s: float, hour_offset_s: int = 0) -> int:
    """Start (epoch s) of the history hour holding `epoch_s`."""
    return int((epoch_s + hour_offset_s) // 3600 * 3600 - hour_offset_s)


@functools.cache
def _known_zones() -> frozenset[str]:
    # `localtime` and `posixrules` are files of some tz databases, not zones: they would
    # mean whatever this machine is set to.
    return frozenset(available_timezones()) - {"localtime", "posixrules"}


@functools.lru_cache(maxsize=1024)
def load_zone(name: str) -> tzinfo:
    """The IANA zone `name` (`UTC` works without a tz database).

    :raises ValueError: no such zone in the tz database (system or `tzdata` package).
    """
    if name == "UTC":
        return UTC
    if name not in _known_zones():
        raise ValueError(f"unknown time zone {name!r}: an IANA name such as Europe/Berlin")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {name!r}: {exc}") from exc


def default_zone(name: str, legacy_offset_min: int) -> Zone:
    """The deployment's zone: `ATLAS_WINDOW_TIMEZONE`, or the legacy fixed offset
    (`ATLAS_WINDOW_UTC_OFFSET_MIN`) when the zone is left at UTC."""
    if name == "UTC" and legacy_offset_min:
        return legacy_offset_min * 60
    return load_zone(name)


def _offset(zone: tzinfo, epoch_s: int) -> int:
    delta = datetime.fromtimestamp(epoch_s, zone).utcoffset()
    return int(delta.total_seconds()) if delta is not None else 0


def _zone_spec(zone: tzinfo, hour: int, hour_offset_s: int) -> ZoneSpec:
    start = hour * 3600 - SPEC_BEFORE_S
    end = hour * 3600 + 3600 + SPEC_AFTER_S
    offsets = [_offset(zone, start)]
    transitions: list[int] = []
    if isinstance(zone, timezone):  # UTC or another fixed offset: nothing to look for
        return ZoneSpec(hour_offset_s, tuple(offsets))
    t = start
    while t < end:
        nxt = min(t + _SAMPLE_S, end)
        off = _offset(zone, nxt)
        if off != offsets[-1]:
            lo, hi = t, nxt  # offsets[-1] at lo, off at hi: the change is in (lo, hi]
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if _offset(zone, mid) == offsets[-1]:
                    lo = mid
                else:
                    hi = mid
            transitions.append(hi)
            offsets.append(_offset(zone, hi))
        t = nxt
    return ZoneSpec(hour_offset_s, tuple(offsets), tuple(transitions))


@functools.lru_cache(maxsize=4096)
def _cached_spec(zone: tzinfo, hour: int, hour_offset_s: int) -> ZoneSpec:
    return _zone_spec(zone, hour, hour_offset_s)


def zone_spec(zone: Zone, epoch_s: float, hour_offset_s: int = 0) -> ZoneSpec:
    """The spec of `zone` for the hour holding `epoch_s` (cached per zone and hour)."""
    if isinstance(zone, int):
        return ZoneSpec(hour_offset_s, (zone,))
    return _cached_spec(zone, math.floor(epoch_s / 3600), hour_offset_s)


def window_names(epoch_s: int, zone: Zone = 0, *, hour_offset_s: int | None = None) -> WindowNames:
    """The windows holding `epoch_s` in `zone`. For a fixed offset the history grid is that
    offset too (as before zones), unless `hour_offset_s` says otherwise; else UTC."""
    if isinstance(zone, int):
        return names_at(epoch_s, ZoneSpec.fixed(zone, hour_offset_s))
    return names_at(epoch_s, zone_spec(zone, epoch_s, hour_offset_s or 0))


def local_day_month(epoch_s: int, zone: Zone) -> tuple[str, str]:
    """(YYYYMMDD, YYYYMM) of `epoch_s` in `zone`, without a spec (per-row sums of history)."""
    if isinstance(zone, int):
        local = datetime.fromtimestamp(epoch_s + zone, UTC)
    else:
        local = datetime.fromtimestamp(epoch_s, zone)
    return local.strftime("%Y%m%d"), local.strftime("%Y%m")


def local_date(epoch_s: float, zone: Zone) -> date:
    """The calendar date at `epoch_s` in `zone` (a tz or a legacy fixed offset in seconds)."""
    if isinstance(zone, int):
        return datetime.fromtimestamp(epoch_s + zone, UTC).date()
    return datetime.fromtimestamp(epoch_s, zone).date()


def day_bounds(day: date, zone: Zone) -> tuple[int, int]:
    """(start, end) epoch s of the local calendar day `day` in `zone` (23, 24 or 25 hours)."""
    if isinstance(zone, int):
        start = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()) - zone
        return start, start + 86400
    noon_before = datetime(day.year, day.month, day.day, 12, tzinfo=zone) - timedelta(days=1)
    start = window_names(int(noon_before.timestamp()), zone).day_reset_s
    return start, window_names(start, zone).day_reset_s
