"""The Redis/Valkey ledger: the only package that talks to Redis.

One module per concern, sharing one connection (`client.Conn`):
`keystore` (key records), `admission` (admit, lease, release), `settlement` (settle, reap),
`history` (windows and hourly history), `audit`; `scripts` holds the Lua scripts and their
argument codecs, `zones` the windows' zone argument. `RedisLedger` composes them.
"""

from __future__ import annotations

from atlas.ledger.redis.client import connect
from atlas.ledger.redis.ledger import RedisLedger

__all__ = ["RedisLedger", "connect"]
