"""Which bodies Envoy's Lua filter may append include_usage to, and how long an exchange
Envoy settles holds its reservation (authz/access_logged.py)."""

from __future__ import annotations

from atlas.ledger.protocol import UNATTENDED, UNATTENDED_STREAM
from atlas.requestbody import parse_llm_request
from atlas.settings import Settings
from authz.access_logged import spliceable, unattended
from authz.policy import CheckInput

LENGTH = {"content-length": "1"}  # its value is Envoy's business: only its presence counts


def _inp(body: bytes, headers: dict[str, str] | None = None, complete: bool = True) -> CheckInput:
    return CheckInput(
        headers=LENGTH if headers is None else headers,
        path="/v1/chat/completions",
        body=body,
        body_complete=complete,
    )


def test_only_a_whole_utf8_object_without_stream_options_is_spliceable() -> None:
    body = b'{"model":"m","stream":true}'
    assert spliceable(_inp(body))
    assert spliceable(_inp(b" \r\n\t" + body + b"\n\n "))  # JSON blanks around it
    assert not spliceable(_inp(body, headers={}))  # chunked: the script would invent a length
    assert not spliceable(_inp(body, complete=False))
    assert not spliceable(_inp(b'{"stream":true,"stream_options":{"x":1}}'))  # merged by extproc
    assert not spliceable(_inp(b"\xef\xbb\xbf" + body))  # a BOM
    assert not spliceable(_inp(body.decode().encode("utf-16-le")))
    assert not spliceable(_inp(body.decode().encode("utf-16-be")))
    for odd in (b"", b"{}", b"[1]", b'{"a":1', b"{ }", b" "):
        assert not spliceable(_inp(odd)), odd
    # A string that merely mentions the key has its quotes escaped: still spliceable.
    assert spliceable(_inp(b'{"stream":true,"user":"\\"stream_options\\""}'))


def test_streams_envoy_settles_hold_their_reservation_for_the_ttl() -> None:
    s = Settings()
    stream = b'{"model":"m","stream":true,"messages":[]}'
    plain = b'{"model":"m","messages":[]}'

    def held(body: bytes, settings: Settings = s, idempotent: bool = False) -> int:
        req = parse_llm_request(body)
        splice = settings.settle_from_access_log and spliceable(_inp(body))
        return unattended(settings, "chat", req, idempotent=idempotent, splice=splice)

    assert held(stream) == UNATTENDED_STREAM  # spliced
    assert held(plain) == UNATTENDED  # json_to_metadata and the access log
    assert held(stream, idempotent=True) == 0  # extproc keeps its response
    assert held(b'{"stream":true,"stream_options":{"include_usage":true}}') == 0  # observe
    off = Settings(settle_from_access_log=False)
    assert held(stream, off) == 0 and held(plain, off) == 0
