"""Reservation ids: unique, 24 hex digits, across the blocks they are read in."""

from authz.reservation_ids import BLOCK_IDS, ReservationIds


def test_ids_are_24_hex_digits_and_never_repeat_across_blocks() -> None:
    ids = ReservationIds()
    got = [ids() for _ in range(BLOCK_IDS * 3 + 7)]
    assert all(len(i) == 24 and int(i, 16) >= 0 for i in got)
    assert len(set(got)) == len(got)


def test_two_generators_do_not_share_ids() -> None:
    a, b = ReservationIds(), ReservationIds()
    assert not {a() for _ in range(100)} & {b() for _ in range(100)}
