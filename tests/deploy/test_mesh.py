"""deploy/istio and deploy/gateway: every resource validates against a focused schema of its
API (tests/deploy/schemas/{istio,gateway}.schema.json, hand-written: see schemas/README.md),
and the resources point at each other and at deploy/k8s/base correctly.

Not checked here: what Istio or Envoy Gateway generate from them (their controllers do not
run here); test_envoy_configs.py validates the filter settings with Envoy itself.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest

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
    errors = []
    for doc in (eep, fds, route):
        errors += schema_errors(validator("gateway.schema.json", kind_key(doc)), doc)
    assert len(errors) >= 4, errors


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


def test_istio_provider_is_registered_and_reachable() -> None:
    (policy,) = by_kind(resources(ISTIO), "AuthorizationPolicy").values()
    (operator,) = load_docs(ISTIO / "install" / "istio-operator.yaml")
    providers = {p["name"]: p for p in operator["spec"]["meshConfig"]["extensionProviders"]}
    provider = providers[policy["spec"]["provider"]["name"]]["envoyExtAuthzGrpc"]
    name, _, rest = provider["service"].partition(".")
    assert rest == "atlas.svc.cluster.local"
    assert service_port(name, provider["port"])["appProtocol"] == "grpc"


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
    (ref,) = ext_auth["grpc"]["backendRefs"]
    assert service_port(ref["name"], ref["port"])["appProtocol"] == "grpc"
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
