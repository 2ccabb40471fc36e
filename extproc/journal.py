"""Settlements that could not reach Redis, kept on local disk and replayed when it is back.

An append-only JSON-lines file, bounded in size. Settling is idempotent by reservation id, so
a replay after a crash, or of an entry the ledger already has, changes nothing. Replayed
after the reaper charged a reservation, a settlement corrects that charge (`late`).

An entry the ledger can never take (unreadable, or numbers out of bounds) must not block the
entries after it: replay moves it to a `.rejected` side file, counts and logs it, and goes on.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path

from atlas import metrics
from atlas.errors import LedgerUnavailable
from atlas.ledger.protocol import LedgerInputError, Settlement, SettleResult

log = logging.getLogger(__name__)


class SettlementJournal:
    def __init__(self, path: Path, *, max_bytes: int) -> None:
        self._path = path
        self._max_bytes = max_bytes
        path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def path(self) -> Path:
        return self._path

    def size(self) -> int:
        try:
            return self._path.stat().st_size
        except FileNotFoundError:
            return 0

    def append(self, s: Settlement) -> bool:
        """Keep `s` for replay; False when the journal is full (the reaper then charges the
        reservation, the safe side for a quota)."""
        line = (json.dumps(asdict(s), separators=(",", ":")) + "\n").encode()
        if self.size() + len(line) > self._max_bytes:
            metrics.JOURNAL.labels(event="dropped").inc()
            log.error(
                "settlement journal full (%d bytes): %s left to the reaper",
                self._max_bytes,
                s.reservation_id,
            )
            return False
        # O_APPEND writes of one line are atomic with respect to other appends; fsync keeps
        # the settlement across a crash of this process or the host.
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        metrics.JOURNAL.labels(event="written").inc()
        return True

    def entries(self) -> list[Settlement]:
        return [s for path in (self._path, self._replaying) for _, s in _read(path) if s]

    @property
    def _replaying(self) -> Path:
        return self._path.with_suffix(".replaying")

    @property
    def rejected_path(self) -> Path:
        """Entries replay could not settle, kept for an operator (JSON lines with a reason)."""
        return self._path.with_suffix(".rejected")

    def _reject(self, line: bytes, reason: str) -> None:
        metrics.JOURNAL.labels(event="rejected").inc()
        log.error("journal entry rejected (%s): %r", reason, line[:200])
        record = {"reason": reason[:500], "line": line.decode("utf-8", "replace")}
        with self.rejected_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, separators=(",", ":")) + "\n")

    async def replay(self, settle: Callable[[Settlement], Awaitable[SettleResult]]) -> int:
        """Settle every entry; those that still fail go back to the journal. Returns how many
        were settled. New appends during a replay go to a fresh file (the old one is renamed
        first), so none is lost."""
        work = self._replaying
        if not work.exists():  # else: a replay interrupted by a crash, finish it first
            if not self._path.exists():
                return 0
            os.replace(self._path, work)
        pending = _read(work)
        done = 0
        for i, (line, s) in enumerate(pending):
            if s is None:
                self._reject(line, "unreadable")
                continue
            try:
                await settle(s)
                done += 1
            except LedgerUnavailable:
                for _, rest in pending[i:]:
                    if rest is not None:
                        self.append(rest)
                break
            except LedgerInputError as exc:
                self._reject(line, str(exc))
        work.unlink(missing_ok=True)
        metrics.JOURNAL.labels(event="replayed").inc(done)
        if done:
            log.warning("replayed %d journaled settlements (%d left)", done, len(pending) - done)
        return done


def _read(path: Path) -> list[tuple[bytes, Settlement | None]]:
    """Each line with its settlement, or None when it does not parse as one."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    out: list[tuple[bytes, Settlement | None]] = []
    for line in raw.splitlines():
        if not line.strip():
            continue
        try:
            out.append((line, Settlement(**json.loads(line))))
        except (ValueError, TypeError, RecursionError):
            out.append((line, None))
    return out
