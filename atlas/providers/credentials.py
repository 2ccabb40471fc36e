"""Pool members' secrets, read from the environment or a file (a mounted Kubernetes Secret)
when authz loads the providers file. They live in this process's memory only: never in
Redis, logs, metrics or the audit stream; `repr` of a `Secrets` shows member ids only."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from atlas.errors import ConfigError
from atlas.providers.config import ProvidersFile

#: A credential is one line of printable ASCII (it becomes a header value).
MAX_SECRET_CHARS = 4096


def _checked(value: str, where: str) -> str:
    value = value.strip()
    if not value:
        raise ConfigError(f"{where}: the credential is empty")
    if len(value) > MAX_SECRET_CHARS or not all(" " < c <= "~" for c in value):
        raise ConfigError(f"{where}: the credential must be one line of printable ASCII")
    return value


class Secrets:
    """(provider, member id) -> secret."""

    __slots__ = ("_by_member",)

    def __init__(self, by_member: dict[tuple[str, str], str]) -> None:
        self._by_member = by_member

    def __repr__(self) -> str:
        return f"Secrets({sorted(m for _, m in self._by_member)})"

    def get(self, provider: str, member: str) -> str:
        return self._by_member[(provider, member)]


def resolve(config: ProvidersFile, environ: Mapping[str, str] | None = None) -> Secrets:
    """Every member's secret; ConfigError naming the member (never the value) otherwise."""
    env = os.environ if environ is None else environ
    out: dict[tuple[str, str], str] = {}
    for i, p in enumerate(config.providers):
        if p.pool is None:
            continue
        for j, m in enumerate(p.pool.members):
            where = f"providers[{i}].pool.members[{j}] ({p.name}/{m.id})"
            ref = m.credential
            if ref.env is not None:
                value = env.get(ref.env)
                if value is None:
                    raise ConfigError(f"{where}: environment variable {ref.env} is not set")
            else:
                assert ref.file is not None
                try:
                    value = Path(ref.file).read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    why = getattr(exc, "strerror", None) or "not UTF-8"
                    raise ConfigError(f"{where}: cannot read {ref.file}: {why}") from None
            out[(p.name, m.id)] = _checked(value, where)
    return Secrets(out)
