"""The providers file as mesh resources (`atlas render-mesh`), for meshes whose Envoy Atlas
does not bootstrap: the same providers, routes and policies as `render-envoy`'s clusters.

- Istio: per provider a ServiceEntry (the external host), a DestinationRule (TLS origination
  with SNI, outlier detection, connection limits) and one VirtualService for the gateway with
  a route per provider matched on `x-atlas-provider`, rewriting the path to the base URL's
  and the authority to the provider's host, the header removed.
- Envoy Gateway: per provider a Backend (the external endpoint) and, for https, a
  BackendTLSPolicy; one HTTPRoute with a rule per provider matched on the same header,
  with a URL rewrite and the header removed.

Both meshes match routes again after ext_authz changes headers only when told to: Istio's
`envoyExtAuthzHttp` provider routes on the headers authz set, and Envoy Gateway's
SecurityPolicy needs `extAuth.recomputeRoute: true` (docs/deploy.md).
"""

from __future__ import annotations

from typing import Any

from atlas.envoy_config import OUTLIER_DETECTION, Upstream, discovery_type
from atlas.grant import PROVIDER_HEADER
from atlas.providers.config import Provider, ProvidersFile


def _name(p: Provider) -> str:
    return "provider-" + p.name.replace("_", "-")


def _rewrite_path(up: Upstream) -> str:
    return (up.path or "/v1") + "/"


def istio(config: ProvidersFile, *, namespace: str, gateway: str) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    routes: list[dict[str, Any]] = []
    for p in config.providers:
        up = Upstream.parse(p.base_url)
        name = _name(p)
        ip = discovery_type([up.host]) == "STATIC"
        docs.append(
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "ServiceEntry",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {
                    "hosts": [up.host if not ip else f"{p.name}.atlas.internal"],
                    **({"addresses": [up.host]} if ip else {}),
                    "location": "MESH_EXTERNAL",
                    "resolution": "STATIC" if ip else "DNS",
                    **({"endpoints": [{"address": up.host}]} if ip else {}),
                    "ports": [{"number": up.port, "name": "https" if up.tls else "http",
                               "protocol": "HTTP"}],
                },
            }
        )  # fmt: skip
        policy: dict[str, Any] = {
            "outlierDetection": {
                "consecutive5xxErrors": OUTLIER_DETECTION["consecutive_5xx"],
                "interval": OUTLIER_DETECTION["interval"],
                "baseEjectionTime": OUTLIER_DETECTION["base_ejection_time"],
                "maxEjectionPercent": OUTLIER_DETECTION["max_ejection_percent"],
            },
            "connectionPool": {"tcp": {"connectTimeout": f"{p.timeouts.connect_s:g}s"}},
        }
        if up.tls:
            tls: dict[str, Any] = {"mode": "SIMPLE", "sni": p.tls.sni or up.host}
            if p.tls.ca_file:
                tls["caCertificates"] = p.tls.ca_file
            policy["tls"] = tls
        host = docs[-1]["spec"]["hosts"][0]
        docs.append(
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "DestinationRule",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"host": host, "trafficPolicy": policy},
            }
        )
        routes.append(
            {
                "name": name,
                "match": [
                    {
                        "uri": {"prefix": "/v1/"},
                        "headers": {PROVIDER_HEADER: {"exact": p.name}},
                    }
                ],
                "rewrite": {"uri": _rewrite_path(up), "authority": up.host},
                "headers": {"request": {"remove": [PROVIDER_HEADER]}},
                "route": [{"destination": {"host": host, "port": {"number": up.port}}}],
                "timeout": "0s",
                "retries": {"attempts": 1, "retryOn": "5xx,reset,connect-failure,refused-stream"},
            }
        )
    docs.append(
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "atlas-providers", "namespace": namespace},
            "spec": {"hosts": ["*"], "gateways": [gateway], "http": routes},
        }
    )
    return docs


def gateway(config: ProvidersFile, *, namespace: str, parent: str) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    rules: list[dict[str, Any]] = []
    for p in config.providers:
        up = Upstream.parse(p.base_url)
        name = _name(p)
        ip = discovery_type([up.host]) == "STATIC"
        endpoint = (
            {"ip": {"address": up.host, "port": up.port}}
            if ip
            else {"fqdn": {"hostname": up.host, "port": up.port}}
        )
        docs.append(
            {
                "apiVersion": "gateway.envoyproxy.io/v1alpha1",
                "kind": "Backend",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"endpoints": [endpoint]},
            }
        )
        if up.tls:
            validation: dict[str, Any] = {"hostname": p.tls.sni or up.host}
            if p.tls.ca_file:
                validation["caCertificateRefs"] = [
                    {"group": "", "kind": "ConfigMap", "name": f"{name}-ca"}
                ]
            else:
                validation["wellKnownCACertificates"] = "System"
            docs.append(
                {
                    "apiVersion": "gateway.networking.k8s.io/v1alpha3",
                    "kind": "BackendTLSPolicy",
                    "metadata": {"name": name, "namespace": namespace},
                    "spec": {
                        "targetRefs": [
                            {"group": "gateway.envoyproxy.io", "kind": "Backend", "name": name}
                        ],
                        "validation": validation,
                    },
                }
            )
        rules.append(
            {
                "matches": [
                    {
                        "path": {"type": "PathPrefix", "value": "/v1"},
                        "headers": [{"type": "Exact", "name": PROVIDER_HEADER, "value": p.name}],
                    }
                ],
                "filters": [
                    {
                        "type": "URLRewrite",
                        "urlRewrite": {
                            "hostname": up.host,
                            "path": {
                                "type": "ReplacePrefixMatch",
                                "replacePrefixMatch": up.path or "/v1",
                            },
                        },
                    },
                    {"type": "RequestHeaderModifier", "requestHeaderModifier": {
                        "remove": [PROVIDER_HEADER]}},
                ],
                "backendRefs": [{"group": "gateway.envoyproxy.io", "kind": "Backend",
                                 "name": name}],
            }
        )  # fmt: skip
    docs.append(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "atlas-providers", "namespace": namespace},
            "spec": {"parentRefs": [{"name": parent}], "rules": rules},
        }
    )
    return docs
