"""Each script's codec agrees with the KEYS, ARGV and reply its `.lua` header documents: the
argument order lives in the codec (atlas/ledger/redis/scripts.py) and the header only."""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

import pytest

from atlas.ledger.protocol import AdmitRequest, Settlement
from atlas.ledger.redis.scripts import (
    AdmitCodec,
    LeaseCodec,
    ReapCodec,
    ReleaseCodec,
    SettleCodec,
)
from tests.factories import key_record


def header(name: str) -> str:
    text = (resources.files("atlas.ledger") / "lua" / f"{name}.lua").read_text()
    lines = []
    for line in text.splitlines():
        if not line.startswith("--"):
            break
        lines.append(line)
    return "\n".join(lines)


def highest(kind: str, text: str) -> int:
    return max(int(n) for n in re.findall(rf"{kind}\[(\d+)", text))


def reply_size(text: str) -> int:
    match = re.search(r"Returns \{([^}]*)\}", text)
    assert match is not None
    return len(match.group(1).split(","))


REQ = AdmitRequest("r1", 1, 2, "normal", "m", 1.0)
SETTLE = Settlement("key_1", "r1", 1, 2, "m", True, "completed")


TEAM_KEY = "key_1.research"


@pytest.mark.parametrize(
    ("name", "keys_of", "own", "args"),
    [
        ("admit", AdmitCodec.keys, 6, AdmitCodec(1, 2, 3).args(key_record(), REQ, "0")),
        ("settle", SettleCodec.keys, 5, SettleCodec(1, True).args(SETTLE, "0")),
        ("reap", ReapCodec.keys, 4, ReapCodec(1).args("0", charge=True)),
    ],
)
def test_fixed_arguments_match_the_header(
    name: str, keys_of: Any, own: int, args: list[Any]
) -> None:
    """A key of a team passes every KEYS the header lists (the team's last); a key of no
    team only its own."""
    text = header(name)
    assert len(keys_of(TEAM_KEY)) == highest("KEYS", text)
    assert len(keys_of("key_1")) == own
    assert len(args) == highest("ARGV", text)


def test_a_team_keys_names_share_one_slot_with_its_team() -> None:
    tags = {k[k.index("{") : k.index("}") + 1] for k in AdmitCodec.keys(TEAM_KEY)}
    assert tags == {"{t:research}"}
    assert {k[k.index("{") : k.index("}") + 1] for k in AdmitCodec.keys("key_1")} == {"{k:key_1}"}


def test_admit_counts_are_the_headers() -> None:
    text = header("admit")
    assert highest("ARGV", text) == AdmitCodec.N_ARGS


def test_reservation_id_lists_follow_the_fixed_arguments() -> None:
    # lease: ARGV[1] ttl ms, ARGV[2..] ids; release: ARGV[1..] ids.
    assert highest("ARGV", header("lease")) == 2 and highest("ARGV", header("release")) == 1
    assert LeaseCodec(5000).args(["a", "b"]) == [5000, "a", "b"]
    assert ReleaseCodec.args(["a", "b"]) == ["a", "b"]
    for name in ("lease", "release"):
        assert len(LeaseCodec.keys("key_1")) == highest("KEYS", header(name)) == 3


@pytest.mark.parametrize(
    ("name", "decode"),
    [
        ("admit", lambda r: AdmitCodec.decode(r, key_record())),
        ("settle", SettleCodec.decode),
        ("reap", lambda r: ReapCodec.totals([r])),
    ],
)
def test_decoders_read_the_whole_reply(name: str, decode: Any) -> None:
    n = reply_size(header(name))
    decode(["1"] * n)
    with pytest.raises(IndexError):
        decode(["1"] * (n - 1))


def test_settle_decodes_its_fields_in_order() -> None:
    result, hour = SettleCodec.decode(["settled", "7", "3", "1000", "2026112314"])
    assert (result.status, result.charged, result.refunded, hour) == (
        "settled",
        7,
        3,
        "2026112314",
    )
