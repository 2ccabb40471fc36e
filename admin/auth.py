"""Who an admin request comes from: the bootstrap token (ATLAS_ADMIN_TOKEN, role owner), a
named admin token (looked up by its sha256), or a single-sign-on JWT (verified against the
issuer's JWKS). Lookups are cached in-process for at most `CACHE_TTL_S`, so disabling or
deleting an admin takes effect on every replica within that bound (at once on the replica
that made the change)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jwt

from admin.auth_store import ROLES, AdminRecord, AdminStore, Role, role_rank
from atlas.errors import ConfigError
from atlas.settings import Settings

#: Seconds a token's lookup (found or not) is reused before Redis is asked again.
CACHE_TTL_S = 5.0
#: Cached lookups kept at most (unknown tokens count too: a flood of them must not grow it).
CACHE_MAX_ENTRIES = 4096
#: Longest bearer token considered (bytes); longer ones are refused unread.
MAX_TOKEN_BYTES = 8192
#: Only asymmetric signatures: "none" and HS* (a shared secret anyone with the JWKS could
#: forge) are never accepted.
JWT_ALGORITHMS = ["RS256", "ES256"]
#: A JWKS URL is refetched for an unknown kid at most this often (seconds).
JWKS_REFETCH_S = 30.0
#: Longest admin name taken from a JWT's sub/email (characters).
MAX_JWT_NAME = 200
#: The bootstrap credential's name in the audit stream.
BOOTSTRAP_NAME = "bootstrap"
#: Prefix of generated admin tokens (tells them from API keys at a glance).
TOKEN_PREFIX = "atlas_adm_"

Via = Literal["token", "jwt", "bootstrap"]


@dataclass(slots=True, frozen=True)
class Admin:
    """An authenticated admin: their name (in the audit stream), role, and how they signed in."""

    name: str
    role: Role
    via: Via

    def may(self, role: Role) -> bool:
        return role_rank(self.role) >= role_rank(role)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_admin_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def role_of(claim: object) -> Role:
    """A JWT's role claim: a role name, or a list of them (the highest known counts);
    missing or unknown is viewer, and nothing is above owner."""
    names = claim if isinstance(claim, list) else [claim]
    known = [r for r in ROLES if r in names]
    return known[-1] if known else "viewer"


def _looks_like_jwt(token: str) -> bool:
    return token.startswith("eyJ") and token.count(".") == 2


class JwtVerifier:
    """Verifies admin JWTs: signature by a key of the issuer's JWKS (file, or URL fetched in
    a thread and cached), iss, aud and exp."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        if not settings.admin_jwt_issuer:
            raise ConfigError("admin_jwt_issuer: required for JWT sign-on")
        self.issuer = settings.admin_jwt_issuer
        self.audience = settings.admin_jwt_audience
        self.role_claim = settings.admin_jwt_role_claim
        self._clock = clock
        self._url = settings.admin_jwt_jwks_url
        self._jwks: jwt.PyJWKSet | None = None
        self._fetched_at = -JWKS_REFETCH_S
        self._lock = asyncio.Lock()
        if settings.admin_jwt_jwks_file:
            path = Path(settings.admin_jwt_jwks_file)
            try:
                self._jwks = jwt.PyJWKSet.from_dict(json.loads(path.read_text()))
            except (OSError, ValueError, jwt.PyJWKSetError) as exc:
                raise ConfigError(f"admin_jwt_jwks_file: {path}: {exc}") from exc
            self._url = None

    @classmethod
    def from_settings(cls, settings: Settings) -> JwtVerifier | None:
        """None unless the issuer and a JWKS (file or URL) are set."""
        if settings.admin_jwt_issuer and (
            settings.admin_jwt_jwks_file or settings.admin_jwt_jwks_url
        ):
            return cls(settings)
        return None

    async def _key(self, kid: str | None) -> jwt.PyJWK | None:
        key = self._find(kid)
        if key is None and self._url is not None:
            async with self._lock:
                key = self._find(kid)
                if key is None and self._clock() - self._fetched_at >= JWKS_REFETCH_S:
                    self._fetched_at = self._clock()
                    url = self._url
                    try:
                        # PyJWKClient fetches with urllib (blocking): off the event loop.
                        self._jwks = await asyncio.to_thread(
                            lambda: jwt.PyJWKClient(url, cache_keys=False).get_jwk_set()
                        )
                    except jwt.PyJWKClientError:
                        return None
                    key = self._find(kid)
        return key

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        if self._jwks is None:
            return None
        if kid is None:
            return self._jwks.keys[0] if len(self._jwks.keys) == 1 else None
        return next((k for k in self._jwks.keys if k.key_id == kid), None)

    async def verify(self, token: str) -> Admin | None:
        try:
            header = jwt.get_unverified_header(token)
            if header.get("alg") not in JWT_ALGORITHMS:
                return None
            key = await self._key(header.get("kid"))
            if key is None:
                return None
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=JWT_ALGORITHMS,
                issuer=self.issuer,
                audience=self.audience,
                options={"require": ["exp", "iss"]},
            )
        except (jwt.PyJWTError, ValueError):
            return None
        name = claims.get("sub") or claims.get("email")
        if not isinstance(name, str) or not name or len(name) > MAX_JWT_NAME:
            return None
        return Admin(name=name, role=role_of(claims.get(self.role_claim)), via="jwt")


class Authenticator:
    """Turns a presented admin credential into an `Admin`, or None."""

    def __init__(
        self,
        settings: Settings,
        store: AdminStore | None,
        *,
        jwt_verifier: JwtVerifier | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        bootstrap = settings.admin_token.get_secret_value() if settings.admin_token else None
        self._bootstrap = bootstrap.encode() if bootstrap else None
        self.store = store
        self._jwt = jwt_verifier
        self._clock = clock
        self._cache: dict[str, tuple[float, Admin | None]] = {}

    def forget(self) -> None:
        """Drop cached lookups (after a change to an admin, on this replica)."""
        self._cache.clear()

    async def authenticate(self, token: str | None) -> Admin | None:
        if not token or len(token) > MAX_TOKEN_BYTES:
            return None
        # Constant-time comparison: the token's prefix must not be guessable by timing.
        if self._bootstrap is not None and hmac.compare_digest(token.encode(), self._bootstrap):
            return Admin(name=BOOTSTRAP_NAME, role="owner", via="bootstrap")
        if self.store is None and self._jwt is None:
            return None
        digest = token_hash(token)
        now = self._clock()
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > now:
            return hit[1]
        found = await self._lookup(token, digest)
        if len(self._cache) >= CACHE_MAX_ENTRIES:
            self._cache = {d: e for d, e in self._cache.items() if e[0] > now}
            if len(self._cache) >= CACHE_MAX_ENTRIES:
                self._cache.clear()
        self._cache[digest] = (now + CACHE_TTL_S, found)
        return found

    async def _lookup(self, token: str, digest: str) -> Admin | None:
        if self._jwt is not None and _looks_like_jwt(token):
            return await self._jwt.verify(token)
        if self.store is None:
            return None
        name = await self.store.admin_for_token(digest)
        raw = await self.store.get_admin(name) if name else None
        if raw is None:
            return None
        rec = AdminRecord.model_validate_json(raw)
        # The index may lag a rotation by one transaction: the record's hash decides.
        if rec.disabled or not hmac.compare_digest(rec.token_hash, digest):
            return None
        return Admin(name=rec.name, role=rec.role, via="token")
