"""Who an internal app is, when it presents no API key: its mTLS principal (the SPIFFE id or
certificate SAN Envoy verified), or a shared secret with its app id. Each maps to a secret
hash in the ledger's index, so authz finds the app's record exactly as it finds a key's (the
key cache, one lookup on a miss).

Envoy's HCM (forward_client_cert_details: SANITIZE_SET) replaces any `x-forwarded-client-cert`
a client sends with the connection's verified certificate, or removes it: the principal here
is only as trustworthy as that setting in the Envoy in front (ATLAS_MTLS_IDENTITY=false turns
this path off where it is not set).
"""

from __future__ import annotations

from atlas.keymodel import app_secret_hash, principal_hash

__all__ = ["app_secret_hash", "principal_hash", "xfcc_principal"]

#: An XFCC value longer than this is not read (Envoy's own are a few hundred bytes).
MAX_XFCC_CHARS = 8192
#: A principal longer than this is not one (SPIFFE ids are at most 2048 bytes).
MAX_PRINCIPAL_CHARS = 2048
#: App ids are slugs (like team ids); secrets at most this long.
MAX_APP_SECRET_CHARS = 256


def _split(text: str, sep: str) -> list[str]:
    """`text` split at `sep` outside double quotes (XFCC quotes values holding , ; =)."""
    parts, cur, quoted, escaped = [], [], False, False
    for ch in text:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == sep and not quoted:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def xfcc_principal(value: str) -> str:
    """The principal of the last XFCC element (the one this Envoy set; with APPEND_FORWARD the
    earlier ones are a client's or another proxy's): its first URI SAN (a SPIFFE id), else its
    first DNS SAN; "" for none or a value out of bounds."""
    if not value or len(value) > MAX_XFCC_CHARS:
        return ""
    last = _split(value, ",")[-1]
    uri = dns = ""
    for pair in _split(last, ";"):
        name, eq, v = pair.partition("=")
        if not eq:
            continue
        name = name.strip().lower()
        v = v.strip()
        if name == "uri" and not uri:
            uri = v
        elif name == "dns" and not dns:
            dns = v
    principal = uri or dns
    return principal if 0 < len(principal) <= MAX_PRINCIPAL_CHARS else ""
