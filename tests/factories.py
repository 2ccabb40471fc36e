"""Key records for tests, with generous limits unless a test says otherwise."""

from __future__ import annotations

from typing import Any

from atlas.keymodel import KeyRecord, hash_secret


def key_record(secret: str = "sk-atlas-test-secret-0123456789", **fields: Any) -> KeyRecord:
    base: dict[str, Any] = {
        "id": "key_1",
        "name": "test",
        "secret_hash": hash_secret(secret),
        "secret_hint": secret[:12],
        "daily_limit": 1_000_000,
        "monthly_limit": 10_000_000,
        "rate_per_sec": 1000,
        "burst": 1000,
    }
    base.update(fields)
    return KeyRecord(**base)
