"""Dependencies shared by the admin routes."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from admin.selfserve import SelfServe
from atlas.credentials import bearer, client_key
from atlas.errors import Denied
from atlas.keymodel import KeyRecord, hash_secret
from atlas.ledger.protocol import AdminLedger
from atlas.settings import Settings


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_ledger(request: Request) -> AdminLedger:
    return request.app.state.ledger


def get_selfserve(request: Request) -> SelfServe:
    return request.app.state.selfserve


SettingsDep = Annotated[Settings, Depends(get_settings)]
LedgerDep = Annotated[AdminLedger, Depends(get_ledger)]
SelfServeDep = Annotated[SelfServe, Depends(get_selfserve)]


def _presented_token(request: Request) -> str | None:
    token = bearer(request.headers.get("authorization", ""))
    return token if token is not None else request.headers.get("x-admin-key")  # Atlas's


def require_admin(request: Request, settings: SettingsDep) -> str:
    token = _presented_token(request)
    expected = settings.admin_token.get_secret_value() if settings.admin_token else None
    # Constant-time comparison: the token's prefix must not be guessable by timing.
    if not token or not expected or not hmac.compare_digest(token.encode(), expected.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "admin token required (Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return "admin"


AdminDep = Annotated[str, Depends(require_admin)]


async def require_client_key(request: Request, ledger: LedgerDep, guard: SelfServeDep) -> KeyRecord:
    """Self-serve routes: the caller's own API key identifies (and limits) what they see.
    Refusals are OpenAI-shaped, as authz's are for the same key."""
    secret = client_key(request.headers)
    rec = await ledger.find_key(hash_secret(secret)) if secret else None
    if rec is None:
        raise Denied(
            401,
            "Incorrect API key provided." if secret else "Missing API key.",
            type="invalid_request_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    guard.admit(rec)
    return rec


ClientKeyDep = Annotated[KeyRecord, Depends(require_client_key)]


@dataclass(slots=True, frozen=True)
class Caller:
    """Who is asking: the admin (any key) or a key holder (their own key only)."""

    key: KeyRecord | None  # None for the admin

    @property
    def is_admin(self) -> bool:
        return self.key is None


async def identify_caller(
    request: Request, settings: SettingsDep, ledger: LedgerDep, guard: SelfServeDep
) -> Caller:
    token = _presented_token(request)
    expected = settings.admin_token.get_secret_value() if settings.admin_token else None
    if token and expected and hmac.compare_digest(token.encode(), expected.encode()):
        return Caller(None)
    return Caller(await require_client_key(request, ledger, guard))


CallerDep = Annotated[Caller, Depends(identify_caller)]
