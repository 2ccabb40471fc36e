"""The providers file as Envoy clusters and routes (atlas.envoy_config.render puts them in the
bootstrap; the Istio and Envoy Gateway renderings patch the same objects in).

One cluster per provider, `provider_<name>`: its TLS, connect timeout, health-independent
outlier detection and circuit breakers. One route per provider on the `/v1/` (and, for
Gemini, `/v1beta/`) prefix, matched by the `x-atlas-provider` header authz sets on admission
(a client's is removed before routes are matched again): the base URL's path replaces `/v1`,
the host is the provider's, and the header goes no further. Envoy retries another host of
the same provider on 5xx and connection failures; a provider's 429 is not retried (the
member cools and authz picks another for the next request).
"""

from __future__ import annotations

from typing import Any

from atlas.envoy_config import CIRCUIT_BREAKERS, OUTLIER_DETECTION, Upstream, discovery_type
from atlas.grant import PROVIDER_HEADER
from atlas.providers.config import Provider, ProvidersFile

PROVIDER_RETRY_POLICY = {
    "retry_on": "5xx,reset,connect-failure,refused-stream",
    "num_retries": 1,
    "retry_host_predicate": [
        {
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions"
                ".retry.host.previous_hosts.v3.PreviousHostsPredicate"
            },
        }
    ],
    "host_selection_retry_max_attempts": "3",
}


def cluster_name(provider: str) -> str:
    return f"provider_{provider}"


def _seconds(s: float) -> str:
    return f"{s:g}s"


def cluster(p: Provider) -> dict[str, Any]:
    up = Upstream.parse(p.base_url)
    name = cluster_name(p.name)
    c: dict[str, Any] = {
        "name": name,
        "type": discovery_type([up.host]),
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": _seconds(p.timeouts.connect_s),
        "lb_policy": "LEAST_REQUEST",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": up.host, "port_value": up.port}
                                },
                                "hostname": up.host,
                            }
                        }
                    ]
                }
            ],
        },
        "outlier_detection": OUTLIER_DETECTION,
        "circuit_breakers": CIRCUIT_BREAKERS,
    }
    if up.tls:
        tls: dict[str, Any] = {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
            ".UpstreamTlsContext",
            "sni": p.tls.sni or up.host,
        }
        if p.tls.ca_file:
            tls["common_tls_context"] = {
                "validation_context": {
                    "trusted_ca": {"filename": p.tls.ca_file},
                    "match_typed_subject_alt_names": [
                        {"san_type": "DNS", "matcher": {"exact": p.tls.sni or up.host}}
                    ],
                }
            }
        c["transport_socket"] = {"name": "envoy.transport_sockets.tls", "typed_config": tls}
    return c


def routes(p: Provider) -> list[dict[str, Any]]:
    up = Upstream.parse(p.base_url)
    header = [{"name": PROVIDER_HEADER, "string_match": {"exact": p.name}}]
    action: dict[str, Any] = {
        "cluster": cluster_name(p.name),
        "timeout": "0s",  # a stream's whole length is unbounded; silence is not
        "idle_timeout": _seconds(p.timeouts.idle_s),
        "host_rewrite_literal": up.host,
        "retry_policy": PROVIDER_RETRY_POLICY,
    }
    out = []
    prefixes = ["/v1/"] + (["/v1beta/"] if p.api == "gemini" else [])
    for prefix in prefixes:
        a = dict(action)
        if prefix == "/v1/" and up.path and up.path != "/v1":
            a["prefix_rewrite"] = up.path + "/"
        out.append(
            {
                "match": {"prefix": prefix, "headers": header},
                "route": a,
                "request_headers_to_remove": [PROVIDER_HEADER],
            }
        )
    return out


def envoy_objects(config: ProvidersFile) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(routes, clusters) for every provider, routes in file order."""
    rs: list[dict[str, Any]] = []
    cs: list[dict[str, Any]] = []
    for p in config.providers:
        rs += routes(p)
        cs.append(cluster(p))
    return rs, cs
