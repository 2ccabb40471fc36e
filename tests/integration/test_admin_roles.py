"""Admins are people: the bootstrap token is owner `bootstrap`; named credentials (stored as
hashes in Valkey) carry a role that every route checks (viewer reads, operator changes);
a disabled one is refused; JWTs from the configured issuer's JWKS carry their role, and a
wrong audience, an expired token, `alg: none` or an HMAC token are refused. The audit
stream names who did what."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import rsa

from admin.app import create_app
from admin.auth import new_admin_token, token_hash
from admin.auth_store import AdminRecord
from atlas.ledger.redis import RedisLedger
from atlas.ledger.redis.admins import RedisAdmins
from atlas.settings import Settings

ISSUER = "https://sso.example.test"
AUDIENCE = "atlas-admin"


@pytest.fixture
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def sso_settings(settings: Settings, signing_key: rsa.RSAPrivateKey, tmp_path: Path) -> Settings:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(signing_key.public_key()))
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]}))
    return settings.model_copy(
        update={
            "admin_jwt_issuer": ISSUER,
            "admin_jwt_audience": AUDIENCE,
            "admin_jwt_jwks_file": str(path),
        }
    )


@pytest_asyncio.fixture
async def api(sso_settings: Settings, ledger: RedisLedger) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(sso_settings, ledger)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://admin"
    ) as client:
        yield client


async def named(ledger: RedisLedger, name: str, role: str, *, disabled: bool = False) -> str:
    token = new_admin_token()
    rec = AdminRecord(name=name, role=role, token_hash=token_hash(token), disabled=disabled)  # type: ignore[arg-type]
    assert await RedisAdmins(ledger.conn).create_admin(name, rec.model_dump_json(), rec.token_hash)
    return token


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def sso(key: rsa.RSAPrivateKey, **claims: Any) -> str:
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "ada@example.test", "exp": time.time() + 60}
    return jwt.encode({**body, **claims}, key, algorithm="RS256", headers={"kid": "k1"})


async def test_roles_of_named_credentials(api: httpx.AsyncClient, ledger: RedisLedger) -> None:
    viewer = await named(ledger, "vera", "viewer")
    operator = await named(ledger, "otto", "operator")
    gone = await named(ledger, "gone", "owner", disabled=True)
    assert (await api.get("/v1/admin/keys", headers=bearer(viewer))).status_code == 200
    r = await api.post("/v1/admin/keys", json={"name": "x"}, headers=bearer(viewer))
    assert r.status_code == 403 and "operator" in r.json()["detail"]
    r = await api.post("/v1/admin/keys", json={"name": "x"}, headers=bearer(operator))
    assert r.status_code == 201, r.text
    for token in (gone, "atlas_adm_unknown", "x" * 9000, ""):
        r = await api.get("/v1/admin/keys", headers=bearer(token))
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    r = await api.get("/v1/admin/keys", headers=bearer("test-admin-token"))  # bootstrap
    assert r.status_code == 200
    entries = (await api.get("/v1/admin/audit", headers=bearer(viewer))).json()["entries"]
    (created,) = [e for e in entries if e["action"] == "key.create"]
    assert (created["actor"], created["via"]) == ("otto", "token")


async def test_single_sign_on_tokens(
    api: httpx.AsyncClient, signing_key: rsa.RSAPrivateKey
) -> None:
    ok = sso(signing_key, atlas_role="operator")
    r = await api.post("/v1/admin/keys", json={"name": "sso"}, headers=bearer(ok))
    assert r.status_code == 201, r.text
    # No role claim: a viewer (reads, no writes); a claim above owner cannot exist.
    viewer = sso(signing_key, sub="bob@example.test")
    assert (await api.get("/v1/admin/keys", headers=bearer(viewer))).status_code == 200
    r = await api.post("/v1/admin/keys", json={"name": "no"}, headers=bearer(viewer))
    assert r.status_code == 403
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    refused = [
        sso(signing_key, aud="someone-else"),
        sso(signing_key, iss="https://evil.test"),
        sso(signing_key, exp=time.time() - 60),
        sso(other, atlas_role="owner"),  # not the issuer's key
        jwt.encode(
            {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": time.time() + 60},
            None,
            algorithm="none",
        ),
        jwt.encode(
            {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": time.time() + 60},
            "guessable-secret-of-at-least-32-bytes!!",
            algorithm="HS256",
        ),
    ]
    for token in refused:
        r = await api.get("/v1/admin/keys", headers=bearer(token))
        assert r.status_code == 401, token
    entries = (await api.get("/v1/admin/audit", headers=bearer(ok))).json()["entries"]
    (created,) = [e for e in entries if e["action"] == "key.create"]
    assert (created["actor"], created["via"]) == ("ada@example.test", "jwt")


async def test_owners_manage_named_credentials(api: httpx.AsyncClient, ledger: RedisLedger) -> None:
    owner = bearer("test-admin-token")
    r = await api.post("/v1/admin/admins", json={"name": "olga", "role": "operator"}, headers=owner)
    assert r.status_code == 201, r.text
    created = r.json()
    token = created["token"]
    assert created["role"] == "operator" and "token_hash" not in created
    assert (
        await api.post("/v1/admin/admins", json={"name": "olga"}, headers=owner)
    ).status_code == 409
    assert (
        await api.post("/v1/admin/admins", json={"name": "bootstrap"}, headers=owner)
    ).status_code == 409
    assert (
        await api.post("/v1/admin/admins", json={"name": "Bad Name"}, headers=owner)
    ).status_code == 422
    # An operator may change keys but not admins.
    assert (await api.get("/v1/admin/admins", headers=bearer(token))).status_code == 403
    assert (
        await api.post("/v1/admin/keys", json={"name": "k"}, headers=bearer(token))
    ).status_code == 201
    listed = (await api.get("/v1/admin/admins", headers=owner)).json()["items"]
    assert [a["name"] for a in listed] == ["olga"]
    r = await api.post("/v1/admin/admins/olga/rotate", headers=owner)
    fresh = r.json()["token"]
    assert (await api.get("/v1/admin/keys", headers=bearer(token))).status_code == 401
    assert (await api.get("/v1/admin/keys", headers=bearer(fresh))).status_code == 200
    r = await api.patch("/v1/admin/admins/olga", json={"disabled": True}, headers=owner)
    assert r.status_code == 200 and r.json()["disabled"]
    assert (await api.get("/v1/admin/keys", headers=bearer(fresh))).status_code == 401
    assert (await api.delete("/v1/admin/admins/olga", headers=owner)).status_code == 204
    assert (await api.get("/v1/admin/admins/olga", headers=owner)).status_code == 404
    entries = (await api.get("/v1/admin/audit", headers=owner)).json()["entries"]
    actions = [e["action"] for e in entries if e.get("subject") == "olga"]
    assert actions == ["admin.delete", "admin.update", "admin.rotate", "admin.create"]
    assert all(e["actor"] == "bootstrap" for e in entries if e.get("subject") == "olga")
