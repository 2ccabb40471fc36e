"""The app identity read from Envoy's x-forwarded-client-cert: the last element's URI SAN,
else its DNS SAN; quoted values; bounds."""

from __future__ import annotations

import pytest

from atlas.identity import MAX_PRINCIPAL_CHARS, MAX_XFCC_CHARS, xfcc_principal
from atlas.keymodel import app_secret_hash, principal_hash

SPIFFE = "spiffe://cluster.local/ns/shop/sa/checkout"


@pytest.mark.parametrize(
    ("xfcc", "principal"),
    [
        (f"By=spiffe://envoy;Hash=ab12;URI={SPIFFE}", SPIFFE),
        (f"Hash=ab12;URI={SPIFFE};DNS=checkout.shop.svc", SPIFFE),
        ("Hash=ab12;DNS=checkout.shop.svc;DNS=other.svc", "checkout.shop.svc"),
        (f'Hash=ab;Subject="CN=x,O=a;b";URI={SPIFFE}', SPIFFE),  # quoted , and ;
        # With APPEND_FORWARD, earlier elements are another hop's: only the last counts.
        (f"URI=spiffe://forged,Hash=cd;URI={SPIFFE}", SPIFFE),
        ("URI=spiffe://forged,Hash=cd", ""),
        ('Hash=ab12;Subject="CN=x"', ""),
        ("", ""),
        ("garbage without pairs", ""),
        ("URI=", ""),
    ],
)
def test_principal_of_the_last_element(xfcc: str, principal: str) -> None:
    assert xfcc_principal(xfcc) == principal


def test_out_of_bounds_values_name_nobody() -> None:
    assert xfcc_principal("URI=" + "a" * (MAX_PRINCIPAL_CHARS + 1)) == ""
    assert xfcc_principal("Hash=" + "a" * MAX_XFCC_CHARS + f";URI={SPIFFE}") == ""


def test_lookup_hashes_are_distinct_per_kind_and_app() -> None:
    # A principal, an app's secret and a key secret of the same text never collide.
    assert len({principal_hash("s"), app_secret_hash("a", "s"), app_secret_hash("b", "s")}) == 3
