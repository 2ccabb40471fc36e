"""deploy/istio and deploy/gateway: every resource validates against a focused schema of its
API (tests/deploy/schemas/{istio,gateway}.schema.json, hand-written: see schemas/README.md),
and the resources point at each other and at deploy/k8s/base correctly.

Not checked here: what Istio or Envoy Gateway generate from them (their controllers do not
run here); test_envoy_configs.py validates the filter settings with Envoy itself.
"""

from __future__ import annotations

import copy
import re
import string
from pathlib import Path
from typing import Any

import pytest

from atlas.credentials import CLIENT_KEY_HEADERS
from atlas.grant import GRANT_HEADER, KEY_ID_HEADER, PRIORITY_HEADER
from atlas.settings import Settings
from authz.http_server import PATH_PREFIX
from tests.deploy.conftest import (
    DEPLOY,
    K8S_BASE,
    kind_key,
    kustomize_build,
    load_docs,
    load_yaml,
    schema_errors,
    validator,
)

ISTIO = DEPLOY / "istio"
GATEWAY = DEPLOY / "gateway"
SCHEMA_OF = {ISTIO: "istio.schema.json", GATEWAY: "gateway.schema.json"}


def resources(folder: Path) -> list[dict[str, Any]]:
    out = []
    for name in load_yaml(folder / "kustomization.yaml")["resources"]:
        out.extend(load_docs(folder / name))
    return out


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def k8s_services() -> dict[str, dict[str, Any]]:
    out = {}
    for name in load_yaml(K8S_BASE / "kustomization.yaml")["resources"]:
        for doc in load_docs(K8S_BASE / name):
            if doc["kind"] == "Service":
                out[doc["metadata"]["name"]] = doc
    return out


def service_port(name: str, port: int) -> dict[str, Any]:
    svc = k8s_services().get(name)
    assert svc is not None, f"no Service {name} in deploy/k8s/base"
    ports = {p["port"]: p for p in svc["spec"]["ports"]}
    assert port in ports, f"Service {name} has no port {port}"
    return ports[port]


# --- files and schemas ----------------------------------------------------------------------


@pytest.mark.parametrize("folder", [ISTIO, GATEWAY], ids=["istio", "gateway"])
def test_kustomization_lists_every_manifest(folder: Path) -> None:
    listed = set(load_yaml(folder / "kustomization.yaml")["resources"])
    on_disk = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


@pytest.mark.parametrize("folder", [ISTIO, GATEWAY], ids=["istio", "gateway"])
def test_resources_match_their_schemas(folder: Path) -> None:
    problems = []
    for doc in resources(folder):
        v = validator(SCHEMA_OF[folder], kind_key(doc))
        problems += [f"{doc['kind']}/{doc['metadata']['name']}: {e}" for e in schema_errors(v, doc)]
    assert not problems, "\n".join(problems)


def test_istio_install_files_match_their_schemas() -> None:
    (operator,) = load_docs(ISTIO / "install" / "istio-operator.yaml")
    errors = schema_errors(validator("istio.schema.json", kind_key(operator)), operator)
    values = load_yaml(ISTIO / "install" / "istiod-values.yaml")
    errors += schema_errors(validator("istio.schema.json", "helm.istiod.values"), values)
    assert not errors, errors
    assert values["meshConfig"] == operator["spec"]["meshConfig"], "the two install files differ"


@pytest.mark.parametrize("folder", [ISTIO, GATEWAY], ids=["istio", "gateway"])
def test_kustomize_build(folder: Path) -> None:
    rendered = kustomize_build(folder)
    assert len(rendered) == len(resources(folder))


def test_schemas_catch_mistakes() -> None:
    docs = {d["kind"]: d for d in resources(ISTIO)}
    ef = copy.deepcopy(docs["EnvoyFilter"])
    ef["spec"]["configPatches"][1]["applyTo"] = "HTTP_FILTERS"
    ef["spec"]["configPatches"][1]["patch"]["operation"] = "INSERT_BEFOR"
    ap = copy.deepcopy(docs["AuthorizationPolicy"])
    del ap["spec"]["provider"]  # CUSTOM without a provider
    vs = copy.deepcopy(docs["VirtualService"])
    vs["spec"]["http"][-1]["timeout"] = "forever"
    errors = []
    for doc in (ef, ap, vs):
        errors += schema_errors(validator("istio.schema.json", kind_key(doc)), doc)
    assert len(errors) >= 4, errors

    gw = {d["kind"]: d for d in resources(GATEWAY)}
    eep = copy.deepcopy(gw["EnvoyExtensionPolicy"])
    eep["spec"]["extProc"][0]["processingMode"]["response"]["body"] = "Streaming"
    eep["spec"]["extProc"][0]["metadata"]["writableNamespaces"] = ["envoy.filters.http.x"]
    fds = copy.deepcopy(gw["EnvoyExtensionPolicy"])
    fds["spec"]["extProc"][0]["processingMode"]["response"]["body"] = "FullDuplexStreamed"
    fds["spec"]["extProc"][0]["failOpen"] = True  # CEL rule: not with FullDuplexStreamed
    route = copy.deepcopy(next(d for d in resources(GATEWAY) if d["metadata"]["name"] == "llm-v1"))
    route["spec"]["rules"][0]["timeouts"]["request"] = "0"
    btp = copy.deepcopy(gw["BackendTrafficPolicy"])
    btp["spec"]["responseOverride"][0]["match"]["statusCodes"][0]["type"] = "Exact"
    btp["spec"]["responseOverride"][1]["response"]["statusCode"] = 5000
    errors = []
    for doc in (eep, fds, route, btp):
        errors += schema_errors(validator("gateway.schema.json", kind_key(doc)), doc)
    assert len(errors) >= 6, errors

    # Istio refuses a lone "*" header pattern; a provider without a service is incomplete.
    values = copy.deepcopy(load_yaml(ISTIO / "install" / "istiod-values.yaml"))
    http = values["meshConfig"]["extensionProviders"][0]["envoyExtAuthzHttp"]
    http["includeRequestHeadersInCheck"] = ["*"]
    http["pathPrefix"] = "check"
    del http["service"]
    errors = schema_errors(validator("istio.schema.json", "helm.istiod.values"), values)
    assert len(errors) >= 3, errors


# --- Istio wiring ------------------------------------------------------------------------------


def istio_path_matches(pattern: str, path: str) -> bool:
    """Istio AuthorizationPolicy path semantics: exact, `prefix*`, `*suffix`, or `*`."""
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return path.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return path.endswith(pattern[1:])
    return path == pattern


def authz_applies(policy: dict[str, Any], path: str) -> bool:
    for rule in policy["spec"]["rules"]:
        for to in rule["to"]:
            op = to["operation"]
            if any(istio_path_matches(p, path) for p in op.get("paths", ["*"])) and not any(
                istio_path_matches(p, path) for p in op.get("notPaths", [])
            ):
                return True
    return False


def test_istio_authz_covers_the_llm_paths_only() -> None:
    (policy,) = by_kind(resources(ISTIO), "AuthorizationPolicy").values()
    assert policy["spec"]["action"] == "CUSTOM"
    checked = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"]
    skipped = ["/v1/usage", "/v1/forecasting/forecast", "/v1/admin/keys", "/healthz", "/"]
    for path in checked:
        assert authz_applies(policy, path), path
    for path in skipped:
        assert not authz_applies(policy, path), path


def k8s_authz_protocol() -> str:
    """ATLAS_AUTHZ_PROTOCOL as deploy/k8s/base's ConfigMap sets it (else the default)."""
    for doc in load_docs(K8S_BASE / "configmap.yaml"):
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "atlas-config":
            return doc["data"].get("ATLAS_AUTHZ_PROTOCOL", "")
    return Settings.model_fields["authz_protocol"].default


def istio_provider() -> tuple[str, dict[str, Any]]:
    """(kind, settings) of the provider the AuthorizationPolicy names."""
    (policy,) = by_kind(resources(ISTIO), "AuthorizationPolicy").values()
    (operator,) = load_docs(ISTIO / "install" / "istio-operator.yaml")
    providers = {p["name"]: p for p in operator["spec"]["meshConfig"]["extensionProviders"]}
    provider = dict(providers[policy["spec"]["provider"]["name"]])
    provider.pop("name")
    ((kind, settings),) = provider.items()
    return kind, settings


def istio_header_matches(patterns: list[str], name: str) -> bool:
    """Istio's ext_authz header patterns: exact, `prefix*`, `*suffix`; case-insensitive."""
    name = name.lower()
    for p in (p.lower() for p in patterns):
        if p.endswith("*") and name.startswith(p[:-1]):
            return True
        if p.startswith("*") and name.endswith(p[1:]):
            return True
        if p == name:
            return True
    return False


#: Request headers authz reads or must see to remove (atlas/grant.py, authz/answer.py).
AUTHZ_READS = (
    *CLIENT_KEY_HEADERS,
    "content-type",
    "accept-encoding",
    "x-request-priority",
    GRANT_HEADER,
    KEY_ID_HEADER,
    PRIORITY_HEADER,
)
#: What authz's admission hands the upstream (and, in a mesh, extproc: the grant).
UPSTREAM_ON_ALLOW = (GRANT_HEADER, KEY_ID_HEADER, PRIORITY_HEADER, "authorization")


def test_istio_provider_is_registered_and_reachable() -> None:
    kind, provider = istio_provider()
    # The protocol authz serves (deploy/k8s/base) is the one the provider speaks.
    assert kind == {"http": "envoyExtAuthzHttp", "grpc": "envoyExtAuthzGrpc"}[k8s_authz_protocol()]
    name, _, rest = provider["service"].partition(".")
    assert rest == "atlas.svc.cluster.local"
    assert service_port(name, provider["port"])["appProtocol"] == k8s_authz_protocol()


def test_istio_http_provider_carries_what_atlas_needs() -> None:
    """Without dynamic metadata the grant must reach extproc as a request header, authz must
    see every header and the whole body, under the path prefix it serves checks on."""
    kind, provider = istio_provider()
    assert kind == "envoyExtAuthzHttp"
    assert provider["pathPrefix"] == PATH_PREFIX == "/check"
    for name in UPSTREAM_ON_ALLOW:
        assert istio_header_matches(provider["headersToUpstreamOnAllow"], name), name
    body = provider["includeRequestBodyInCheck"]
    assert body["maxRequestBytes"] >= Settings.model_fields["max_request_bytes"].default
    assert body["allowPartialMessage"] is True
    assert body.get("packAsBytes", False) is False
    sent = provider["includeRequestHeadersInCheck"]
    assert "*" not in sent, "istiod refuses a single wildcard"
    for name in (*AUTHZ_READS, "X-Atlas-Anything", "x_atlas_key_id"):
        assert istio_header_matches(sent, name), name
    # Every header name: each first character a token can start with in practice.
    for c in string.ascii_lowercase + string.digits:
        assert istio_header_matches(sent, c + "-header"), c
    on_allow = provider["headersToDownstreamOnAllow"]
    for name in ("x-ratelimit-remaining-tokens", "x-atlas-degraded"):
        assert istio_header_matches(on_allow, name), name
    on_deny = provider["headersToDownstreamOnDeny"]
    for name in ("content-type", "retry-after", "retry-after-ms", "x-ratelimit-limit-tokens"):
        assert istio_header_matches(on_deny, name), name
    assert istio_header_matches(on_deny, "x-atlas-refusal")
    assert provider["failOpen"] is False and provider["statusOnError"] == "503"


def test_istio_resources_select_the_same_gateway() -> None:
    docs = resources(ISTIO)
    (gateway,) = by_kind(docs, "Gateway").values()
    selector = gateway["spec"]["selector"]
    namespace = gateway["metadata"]["namespace"]
    (policy,) = by_kind(docs, "AuthorizationPolicy").values()
    (envoyfilter,) = by_kind(docs, "EnvoyFilter").values()
    assert policy["spec"]["selector"]["matchLabels"] == selector
    assert envoyfilter["spec"]["workloadSelector"]["labels"] == selector
    # Workload-selecting policies take effect in the workload's namespace.
    assert policy["metadata"]["namespace"] == envoyfilter["metadata"]["namespace"] == namespace
    (vs,) = by_kind(docs, "VirtualService").values()
    assert vs["spec"]["gateways"] == [f"{namespace}/{gateway['metadata']['name']}"]


def _uri_paths(http: dict[str, Any]) -> list[str]:
    out = []
    for match in http["match"]:
        uri = match["uri"]
        out.append(uri["exact"] if "exact" in uri else uri["prefix"] + "*")
    return out


def test_istio_routes_and_extproc_switches_agree() -> None:
    docs = resources(ISTIO)
    (vs,) = by_kind(docs, "VirtualService").values()
    (policy,) = by_kind(docs, "AuthorizationPolicy").values()
    (envoyfilter,) = by_kind(docs, "EnvoyFilter").values()
    routes = {h["name"]: h for h in vs["spec"]["http"]}
    no_extproc = {
        p["match"]["routeConfiguration"]["vhost"]["route"]["name"]
        for p in envoyfilter["spec"]["configPatches"]
        if p["applyTo"] == "HTTP_ROUTE"
    }
    assert no_extproc <= set(routes)
    for name, http in routes.items():
        for path in _uri_paths(http):
            sample = path.rstrip("*") + ("x" if path.endswith("*") else "")
            # ext_authz and ext_proc are skipped on exactly the same routes.
            assert authz_applies(policy, sample) == (name not in no_extproc), name
    llm = routes["llm"]
    assert llm["timeout"] == "0s", "a route timeout would cut streams"
    assert list(routes)[-1] == "llm", "the /v1/ prefix route must come last"
    for http in vs["spec"]["http"]:
        for route in http.get("route", []):
            dest = route["destination"]
            host, _, rest = dest["host"].partition(".")
            if rest == "atlas.svc.cluster.local":
                service_port(host, dest["port"]["number"])


def test_mesh_ext_proc_receives_the_request_headers() -> None:
    """The grant arrives in the request headers: a mesh's ext_proc must be sent them, and
    may narrow each exchange (mode_override) from there."""
    (envoyfilter,) = by_kind(resources(ISTIO), "EnvoyFilter").values()
    (patch,) = [p for p in envoyfilter["spec"]["configPatches"] if p["applyTo"] == "HTTP_FILTER"]
    ext_proc = patch["patch"]["value"]["typed_config"]
    assert ext_proc["processing_mode"]["request_header_mode"] == "SEND"
    assert ext_proc["processing_mode"]["request_body_mode"] == "BUFFERED"
    assert ext_proc["allow_mode_override"] is True
    (eg,) = gw_docs()["EnvoyExtensionPolicy/atlas-extproc"]["spec"]["extProc"]
    # Envoy Gateway: request headers are sent when `request` is present.
    assert "request" in eg["processingMode"]
    assert eg["processingMode"]["allowModeOverride"] is True


def test_istio_extproc_cluster_is_the_extproc_service() -> None:
    (envoyfilter,) = by_kind(resources(ISTIO), "EnvoyFilter").values()
    (patch,) = [p for p in envoyfilter["spec"]["configPatches"] if p["applyTo"] == "HTTP_FILTER"]
    cluster = patch["patch"]["value"]["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
    m = re.fullmatch(r"outbound\|(\d+)\|\|([a-z0-9-]+)\.atlas\.svc\.cluster\.local", cluster)
    assert m, cluster
    assert service_port(m.group(2), int(m.group(1)))["appProtocol"] == "grpc"


# --- Envoy Gateway wiring ----------------------------------------------------------------------


def gw_docs() -> dict[str, dict[str, Any]]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in resources(GATEWAY)}


def test_gateway_routes_and_backends() -> None:
    docs = gw_docs()
    gateway = docs["Gateway/atlas"]
    for key, doc in docs.items():
        if doc["kind"] != "HTTPRoute":
            continue
        for parent in doc["spec"]["parentRefs"]:
            assert parent["name"] == gateway["metadata"]["name"], key
        for rule in doc["spec"]["rules"]:
            for ref in rule.get("backendRefs", []):
                namespace = ref.get("namespace", doc["metadata"]["namespace"])
                if namespace == "atlas":
                    service_port(ref["name"], ref["port"])
                    continue
                grants = [
                    g
                    for g in docs.values()
                    if g["kind"] == "ReferenceGrant" and g["metadata"]["namespace"] == namespace
                ]
                assert any(
                    {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute"}.items() <= f.items()
                    and f["namespace"] == doc["metadata"]["namespace"]
                    for g in grants
                    for f in g["spec"]["from"]
                ), f"{key}: no ReferenceGrant in {namespace}"
    llm = docs["HTTPRoute/llm-v1"]["spec"]["rules"][0]
    assert llm["timeouts"]["request"] == "0s", "a route timeout would cut streams"
    paths = [
        m["path"]["value"]
        for m in docs["HTTPRoute/atlas-self-serve"]["spec"]["rules"][0]["matches"]
    ]
    assert paths == ["/v1/usage", "/v1/forecasting/"]


def test_gateway_policies_attach_to_the_llm_route_only() -> None:
    docs = gw_docs()
    for key in (
        "SecurityPolicy/atlas-authz",
        "EnvoyExtensionPolicy/atlas-extproc",
        "BackendTrafficPolicy/llm-timeouts",
    ):
        targets = docs[key]["spec"]["targetRefs"]
        assert [(t["kind"], t["name"]) for t in targets] == [("HTTPRoute", "llm-v1")], key
        assert (
            docs[key]["metadata"]["namespace"] == docs["HTTPRoute/llm-v1"]["metadata"]["namespace"]
        )
    (target,) = docs["ClientTrafficPolicy/atlas-client"]["spec"]["targetRefs"]
    assert (target["kind"], target["name"]) == ("Gateway", "atlas")


def test_gateway_policy_settings() -> None:
    docs = gw_docs()
    ext_auth = docs["SecurityPolicy/atlas-authz"]["spec"]["extAuth"]
    assert ext_auth["failOpen"] is False
    assert k8s_authz_protocol() in ext_auth, "the protocol authz serves"
    http = ext_auth["http"]
    (ref,) = http["backendRefs"]
    assert service_port(ref["name"], ref["port"])["appProtocol"] == "http"
    assert http["path"] == PATH_PREFIX == "/check"
    # Exact names only in Envoy Gateway (case-insensitive).
    to_backend = {h.lower() for h in http["headersToBackend"]}
    assert set(UPSTREAM_ON_ALLOW) <= to_backend
    to_authz = {h.lower() for h in ext_auth["headersToExtAuth"]}
    assert set(AUTHZ_READS) <= to_authz
    assert ext_auth["bodyToExtAuth"]["maxRequestBytes"] >= (
        Settings.model_fields["max_request_bytes"].default
    )
    (ext_proc,) = docs["EnvoyExtensionPolicy/atlas-extproc"]["spec"]["extProc"]
    (ref,) = ext_proc["backendRefs"]
    assert service_port(ref["name"], ref["port"])["appProtocol"] == "grpc"
    assert ext_proc["failOpen"] is False
    assert ext_proc["processingMode"] == {
        "request": {"body": "Buffered"},
        "response": {"body": "Streamed"},
        "allowModeOverride": True,
    }
    assert ext_proc["metadata"] == {
        "accessibleNamespaces": ["envoy.filters.http.ext_authz"],
        "writableNamespaces": ["atlas.extproc"],
    }
    timeout = docs["BackendTrafficPolicy/llm-timeouts"]["spec"]["timeout"]["http"]
    assert timeout["requestTimeout"] == "0s"
