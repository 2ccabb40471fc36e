"""Redis key names are a storage format: pin the literal strings."""

from __future__ import annotations

from atlas.ledger import keys


def test_per_key_names_share_one_hash_tag() -> None:
    assert keys.record("key_1") == "atlas:{k:key_1}:rec"
    assert keys.request_bucket("key_1") == "atlas:{k:key_1}:rb"
    assert keys.token_bucket("key_1") == "atlas:{k:key_1}:tb"
    assert keys.reservations("key_1") == "atlas:{k:key_1}:resv"
    assert keys.reservation_expiry("key_1") == "atlas:{k:key_1}:resv:exp"
    assert keys.window_prefix("key_1") == "atlas:{k:key_1}:"


def test_window_and_hour_names_are_the_ones_the_scripts_build() -> None:
    assert keys.day_window("key_1", "20261123") == "atlas:{k:key_1}:d:20261123"
    assert keys.month_window("key_1", "202611") == "atlas:{k:key_1}:m:202611"
    assert keys.history_hour(keys.GLOBAL_PREFIX, "2026112314") == "atlas:{g}:h:2026112314"
    assert keys.history_hour(keys.model_prefix("m"), "2026112314") == "atlas:{m:m}:h:2026112314"


def test_global_names() -> None:
    assert keys.secret_index("ab") == "atlas:secret:ab"
    assert keys.KEY_INDEX == "atlas:{g}:keys"
    assert keys.INFLIGHT == "atlas:{g}:inflight"
    assert keys.lock("reaper") == "atlas:{g}:lock:reaper"
    assert keys.AUDIT == "atlas:{g}:audit"
    assert keys.model_prefix("a{b}") == "atlas:{m:a(b)}:"
    assert keys.GLOBAL_PREFIX == "atlas:{g}:"
    assert keys.model_prefix("gpt-x") == "atlas:{m:gpt-x}:"
    assert keys.KEY_CHANGED_CHANNEL == "atlas:keys:changed"
