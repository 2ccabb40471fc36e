"""The providers file (ATLAS_PROVIDERS_FILE): upstream providers, their key pools, and which
providers serve which model alias. Declarative YAML, validated whole before anything uses it;
an error names the file and the field (`providers[1].pool.members[0].credential.env`).

Secrets never appear in the file: a pool member names an environment variable or a file (a
mounted Kubernetes Secret) holding its credential. `render-envoy` reads the file without the
secrets; authz resolves them when it loads the file (atlas/providers/credentials.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from atlas.errors import ConfigError

#: Names become Envoy cluster names, header values and Redis key parts: short and plain.
NAME = r"^[a-z0-9][a-z0-9_-]{0,47}$"
_NAME_RE = re.compile(NAME)
MAX_PROVIDERS = 64
MAX_MEMBERS = 64
MAX_ALIASES = 512
#: Bounds of the file itself: it is read whole, before any field is checked.
MAX_FILE_BYTES = 1 << 20

Api = Literal["openai", "anthropic", "gemini"]
#: The header each wire API takes its credential in, and the value's prefix.
CREDENTIAL_HEADER: dict[str, tuple[str, str]] = {
    "openai": ("authorization", "Bearer "),
    "anthropic": ("x-api-key", ""),
    "gemini": ("x-goog-api-key", ""),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CredentialRef(_Strict):
    """Where a member's secret lives: exactly one of `env` and `file`."""

    env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")] | None = None
    file: Annotated[str, Field(min_length=1, max_length=4096)] | None = None

    @model_validator(mode="after")
    def _one(self) -> CredentialRef:
        if (self.env is None) == (self.file is None):
            raise ValueError("give exactly one of env and file")
        return self


class Member(_Strict):
    """One provider credential of a pool, known everywhere by its id, never by its secret."""

    id: Annotated[str, Field(pattern=NAME)]
    credential: CredentialRef
    requests_per_minute: Annotated[int, Field(ge=1, le=10_000_000)] | None = None
    tokens_per_minute: Annotated[int, Field(ge=1, le=10_000_000_000)] | None = None


class Pool(_Strict):
    strategy: Literal["round_robin", "least_used"] = "round_robin"
    members: Annotated[list[Member], Field(min_length=1, max_length=MAX_MEMBERS)]

    @field_validator("members")
    @classmethod
    def _unique(cls, v: list[Member]) -> list[Member]:
        ids = [m.id for m in v]
        if len(set(ids)) != len(ids):
            raise ValueError(f"member ids must be unique: {ids}")
        return v


class Tls(_Strict):
    sni: Annotated[str, Field(max_length=253)] | None = None
    #: A CA bundle to verify the provider with; without it, the certificate is not verified
    #: against a CA (Envoy's default for an UpstreamTlsContext without validation_context).
    ca_file: Annotated[str, Field(max_length=4096)] | None = None


class Timeouts(_Strict):
    connect_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    #: The longest silence within a response (time to first token included).
    idle_s: Annotated[float, Field(gt=0, le=3600)] = 300.0


class Cooldown(_Strict):
    """How long a member (429, 401/403) or the provider (5xx, connection failures) sits out
    when the provider sends no Retry-After, seconds. A Retry-After is honoured up to `max_s`."""

    rate_limited_s: Annotated[float, Field(ge=0, le=3600)] = 30.0
    unauthorized_s: Annotated[float, Field(ge=0, le=86400)] = 300.0
    server_error_s: Annotated[float, Field(ge=0, le=3600)] = 15.0
    max_s: Annotated[float, Field(gt=0, le=86400)] = 3600.0


class Provider(_Strict):
    name: Annotated[str, Field(pattern=NAME)]
    base_url: Annotated[str, Field(max_length=2048)]
    api: Api = "openai"
    tls: Tls = Tls()
    timeouts: Timeouts = Timeouts()
    cooldown: Cooldown = Cooldown()
    #: No pool: a provider that takes no credential (self-hosted vLLM, Ollama).
    pool: Pool | None = None

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        from atlas.envoy_config import Upstream  # the one URL parser renderings use

        try:
            Upstream.parse(v)
        except ConfigError as exc:
            raise ValueError(str(exc)) from exc
        return v


class Target(_Strict):
    provider: Annotated[str, Field(pattern=NAME)]
    #: Lower first (priority routing and the failover order of the others).
    priority: Annotated[int, Field(ge=0, le=100)] = 0
    #: Share of first choices under weighted routing.
    weight: Annotated[int, Field(ge=0, le=10_000)] = 1
    #: The model name ATLAS_MODEL_PRICES prices this target by (cheapest routing); default
    #: the alias.
    price_model: Annotated[str, Field(min_length=1, max_length=256)] | None = None


class Alias(_Strict):
    """A model name (or `prefix*`) clients send, and the providers that serve it."""

    alias: Annotated[str, Field(min_length=1, max_length=256)]
    routing: Literal["priority", "weighted", "cheapest"] = "priority"
    targets: Annotated[list[Target], Field(min_length=1, max_length=MAX_PROVIDERS)]

    @field_validator("alias")
    @classmethod
    def _glob(cls, v: str) -> str:
        if "*" in v[:-1]:
            raise ValueError("only a trailing * is allowed (a prefix)")
        return v

    @model_validator(mode="after")
    def _targets(self) -> Alias:
        names = [t.provider for t in self.targets]
        if len(set(names)) != len(names):
            raise ValueError(f"a provider may be a target once per alias: {names}")
        if self.routing == "weighted" and not any(t.weight for t in self.targets):
            raise ValueError("weighted routing needs a target with weight > 0")
        return self

    def matches(self, model: str) -> bool:
        if self.alias.endswith("*"):  # a plain prefix: `?` and `[` are not glob syntax here
            return model.startswith(self.alias[:-1])
        return model == self.alias


class ProvidersFile(_Strict):
    providers: Annotated[list[Provider], Field(min_length=1, max_length=MAX_PROVIDERS)]
    models: Annotated[list[Alias], Field(default_factory=list, max_length=MAX_ALIASES)]

    @model_validator(mode="after")
    def _references(self) -> ProvidersFile:
        names = [p.name for p in self.providers]
        if len(set(names)) != len(names):
            raise ValueError(f"provider names must be unique: {names}")
        known = set(names)
        for i, alias in enumerate(self.models):
            for j, t in enumerate(alias.targets):
                if t.provider not in known:
                    raise ValueError(
                        f"models[{i}].targets[{j}].provider: unknown provider {t.provider!r}"
                        f" (known: {', '.join(names)})"
                    )
        seen: set[str] = set()
        for i, alias in enumerate(self.models):
            if alias.alias in seen:
                raise ValueError(f"models[{i}].alias: {alias.alias!r} is listed twice")
            seen.add(alias.alias)
        return self

    def provider(self, name: str) -> Provider:
        return next(p for p in self.providers if p.name == name)

    def alias_for(self, model: str) -> Alias | None:
        """The first alias (in file order; exact names before prefixes) serving `model`."""
        for alias in self.models:
            if not alias.alias.endswith("*") and alias.alias == model:
                return alias
        for alias in self.models:
            if alias.matches(model):
                return alias
        return None


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse(text: str, source: str = "<providers>") -> ProvidersFile:
    """The providers file in `text`; ConfigError naming `source` and the field otherwise."""
    if len(text.encode()) > MAX_FILE_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_FILE_BYTES} bytes")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: must be a mapping with `providers` (and `models`)")
    try:
        return ProvidersFile.model_validate(data)
    except ValidationError as exc:
        problems = [
            f"{source}: {_where(e['loc']) or '(top level)'}: {e['msg']}" for e in exc.errors()
        ]
        raise ConfigError("\n".join(problems)) from None


def load(path: str | Path) -> ProvidersFile:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot read the providers file: {exc}") from exc
    return parse(text, str(p))


def valid_name(name: str) -> bool:
    return _NAME_RE.match(name) is not None
