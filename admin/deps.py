"""Dependencies shared by the admin routes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status

from admin.auth import Admin, Authenticator
from admin.auth_store import Role
from admin.selfserve import SelfServe
from atlas.credentials import bearer, client_key
from atlas.errors import Denied
from atlas.keymodel import KeyRecord, hash_secret
from atlas.ledger.admin_protocol import AdminLedger
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


def get_auth(request: Request) -> Authenticator:
    auth: Authenticator | None = getattr(request.app.state, "auth", None)
    if auth is None:  # an app not built by create_app: the bootstrap token only
        auth = request.app.state.auth = Authenticator(request.app.state.settings, None)
    return auth


AuthDep = Annotated[Authenticator, Depends(get_auth)]


def _presented_token(request: Request) -> str | None:
    token = bearer(request.headers.get("authorization", ""))
    return token if token is not None else request.headers.get("x-admin-key")  # Atlas's


async def require_admin(request: Request, auth: AuthDep) -> Admin:
    """Any admin (viewer or above); 401 without a valid admin credential."""
    admin = await auth.authenticate(_presented_token(request))
    if admin is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "admin token required (Authorization: Bearer <token>)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return admin


def require_role(role: Role) -> Callable[[Admin], Admin]:
    def check(admin: Annotated[Admin, Depends(require_admin)]) -> Admin:
        if not admin.may(role):
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"this needs the {role} role; {admin.name!r} is {admin.role}",
            )
        return admin

    return check


#: Reading anything admin shows (role viewer or above).
AdminDep = Annotated[Admin, Depends(require_admin)]
#: Changing keys, teams, apps, owners, alert rules (role operator or above).
OperatorDep = Annotated[Admin, Depends(require_role("operator"))]
#: Managing admin credentials (role owner).
OwnerDep = Annotated[Admin, Depends(require_role("owner"))]


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
    """Who is asking: an admin (any key) or a key holder (their own key only)."""

    key: KeyRecord | None  # None for an admin
    admin: Admin | None = None

    @property
    def is_admin(self) -> bool:
        return self.key is None


async def identify_caller(
    request: Request, auth: AuthDep, ledger: LedgerDep, guard: SelfServeDep
) -> Caller:
    admin = await auth.authenticate(_presented_token(request))
    if admin is not None:
        return Caller(None, admin)
    return Caller(await require_client_key(request, ledger, guard))


CallerDep = Annotated[Caller, Depends(identify_caller)]
