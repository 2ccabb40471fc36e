"""deploy/helm/atlas: the chart's metadata and values (against values.schema.json, and every
`.Values.x` a template reads exists in values.yaml), and, when a helm binary is found,
`helm lint` and `helm template` for each mesh mode and Redis choice, each rendered document
validated against the Kubernetes (or Istio / Gateway API) schemas as test_k8s.py does.

helm: $ATLAS_HELM, else .venv/bin/helm (scripts/install-helm.sh), else `helm` on PATH.
Not checked here (no cluster): what the cluster, Istio or Envoy Gateway make of the output.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.deploy.conftest import (
    DEPLOY,
    K8S_BASE,
    K8S_VERSIONS,
    ROOT,
    k8s_kind_key,
    kind_key,
    load_yaml,
    schema_errors,
    stats_port,
    validator,
)

CHART = DEPLOY / "helm" / "atlas"
VALUES = CHART / "values.yaml"
NAMESPACE = "atlas"
RELEASE = "atlas"  # fullname "atlas": names are atlas-authz, atlas-extproc, ...
MESH_SCHEMA = {
    "networking.istio.io": "istio.schema.json",
    "security.istio.io": "istio.schema.json",
    "gateway.networking.k8s.io": "gateway.schema.json",
    "gateway.envoyproxy.io": "gateway.schema.json",
}
# name -> --set flags; each is linted, rendered and validated.
VARIANTS: dict[str, list[str]] = {
    "default": [],
    "external-redis": ["valkey.enabled=false", "redis.url=rediss://redis.example:6380/0"],
    "redis-cluster": [
        "valkey.enabled=false",
        "redis.url=redis://redis-cluster.redis:6379",
        "redis.cluster=true",
    ],
    "existing-secret": ["valkey.enabled=false", "secrets.existingSecret=atlas-prod"],
    "istio": ["mesh.mode=istio"],
    "gateway": ["mesh.mode=gateway", "valkey.enabled=false", "redis.url=redis://r:6379/0"],
    "providers": [
        "providers.file=providers: []",
        "providers.credentials.OPENAI_KEY=sk-test",
        "authz.autoscaling.enabled=false",
    ],
}


def values() -> dict[str, Any]:
    return load_yaml(VALUES)


# --- static checks (always run) ---------------------------------------------------------------


def test_chart_yaml() -> None:
    chart = load_yaml(CHART / "Chart.yaml")
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "atlas"
    assert re.fullmatch(r"\d+\.\d+\.\d+", chart["version"]), chart["version"]
    kustomization = load_yaml(K8S_BASE / "kustomization.yaml")
    tags = {i["name"]: i["newTag"] for i in kustomization["images"]}
    # The image tag the chart defaults to is the one deploy/k8s/base pins.
    assert chart["appVersion"] == tags["atlas"]
    assert values()["envoy"]["image"]["tag"] == tags["envoyproxy/envoy"]


def values_validator() -> jsonschema.Validator:
    import json

    doc = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(doc)
    return jsonschema.Draft7Validator(doc)


def test_values_match_their_schema() -> None:
    assert schema_errors(values_validator(), values()) == []


@pytest.mark.parametrize(
    ("path", "bad"),
    [
        (("mesh", "mode"), "linkerd"),
        (("authz", "replica"), 2),  # typo: unknown key
        (("redis", "url"), "http://redis:6379"),
        (("config", "ATLAS_AUTHZ_PORT"), "1"),  # the chart owns it
        (("envoy", "service", "type"), "ExternalName"),
    ],
)
def test_schema_catches_mistakes(path: tuple[str, ...], bad: Any) -> None:
    doc = values()
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = bad
    assert schema_errors(values_validator(), doc), f"{'.'.join(path)}={bad!r} passed"


VALUES_REF = re.compile(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)")


def values_refs(text: str) -> set[str]:
    return {m.group(1).lstrip(".") for m in VALUES_REF.finditer(text)}


def missing_refs(refs: set[str], doc: dict[str, Any]) -> list[str]:
    out = []
    for ref in sorted(refs):
        node: Any = doc
        for key in ref.split("."):
            if not isinstance(node, dict) or key not in node:
                out.append(ref)
                break
            node = node[key]
    return out


def test_templates_read_only_values_that_exist() -> None:
    refs: set[str] = set()
    for path in sorted((CHART / "templates").rglob("*")):
        if path.is_file():
            refs |= values_refs(path.read_text())
    assert len(refs) > 30, refs  # the regex sees the templates' references
    assert missing_refs(refs, values()) == []


def test_values_ref_check_can_fail() -> None:
    refs = values_refs("{{ .Values.authz.replicas }} {{ $.Values.envoy.servcie.port }}")
    assert missing_refs(refs, values()) == ["envoy.servcie.port"]


def test_bootstrap_is_the_kustomize_one() -> None:
    # The chart cannot read files outside itself: it carries a copy and substitutes names.
    copy = CHART / "files" / "envoy.yaml"
    assert copy.read_text() == (K8S_BASE / "bootstrap" / "envoy.yaml").read_text(), (
        "cp deploy/k8s/base/bootstrap/envoy.yaml deploy/helm/atlas/files/envoy.yaml"
    )


# --- helm (when a binary is found) ------------------------------------------------------------


def find_helm() -> str | None:
    if env := os.environ.get("ATLAS_HELM"):
        return env
    venv = Path(sys.prefix) / "bin" / "helm"
    for candidate in (venv, ROOT / ".venv" / "bin" / "helm"):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("helm")


@pytest.fixture(scope="module")
def helm() -> str:
    exe = find_helm()
    if exe is None:
        pytest.skip(
            "helm not found ($ATLAS_HELM, .venv/bin/helm, PATH): run scripts/install-helm.sh;"
            " the static chart checks still ran"
        )
    return exe


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm, *args], capture_output=True, text=True, timeout=120, check=False, cwd=ROOT
    )


def set_args(flags: list[str]) -> list[str]:
    return [a for f in flags for a in ("--set", f)]


_rendered: dict[str, list[dict[str, Any]]] = {}


def render(helm: str, variant: str) -> list[dict[str, Any]]:
    if variant not in _rendered:
        proc = run_helm(
            helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
            *set_args(VARIANTS[variant]),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        _rendered[variant] = [d for d in yaml.safe_load_all(proc.stdout) if d is not None]
    return _rendered[variant]


def named(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_helm_lint(helm: str, variant: str) -> None:
    proc = run_helm(helm, "lint", "--strict", str(CHART), *set_args(VARIANTS[variant]))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_helm_lint_rejects_bad_values(helm: str) -> None:
    proc = run_helm(helm, "lint", str(CHART), "--set", "mesh.mode=linkerd")
    assert proc.returncode != 0
    proc = run_helm(helm, "template", RELEASE, str(CHART), "--set", "valkey.enabled=false")
    assert proc.returncode != 0 and "redis.url" in proc.stderr, proc.stderr


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_documents_match_their_schemas(helm: str, variant: str, version: str) -> None:
    problems = []
    for doc in render(helm, variant):
        group = doc["apiVersion"].split("/")[0]
        if group in MESH_SCHEMA:
            v = validator(MESH_SCHEMA[group], kind_key(doc))
        else:
            v = validator(f"kubernetes-{version}.schema.json", k8s_kind_key(doc))
        problems += [f"{doc['kind']}/{doc['metadata']['name']}: {e}" for e in schema_errors(v, doc)]
        assert doc["metadata"].get("namespace"), f"{doc['kind']}/{doc['metadata']['name']}"
    assert not problems, "\n".join(problems)


EXPECTED_KINDS = {
    "none": {"Deployment/atlas-envoy", "Service/atlas-envoy", "ConfigMap/atlas-envoy-bootstrap"},
    "istio": {"EnvoyFilter/atlas-extproc", "AuthorizationPolicy/atlas-authz",
              "VirtualService/atlas", "Gateway/atlas"},
    "gateway": {"SecurityPolicy/atlas-authz", "EnvoyExtensionPolicy/atlas-extproc",
                "HTTPRoute/atlas-llm-v1", "HTTPRoute/atlas-self-serve", "HTTPRoute/atlas-not-found",
                "ReferenceGrant/atlas-to-vllm", "BackendTrafficPolicy/atlas-llm-timeouts",
                "ClientTrafficPolicy/atlas-client", "Gateway/atlas"},
}  # fmt: skip


@pytest.mark.parametrize(("variant", "mode"), [("default", "none"), ("istio", "istio"),
                                               ("gateway", "gateway")])  # fmt: skip
def test_mesh_mode_renders_its_resources(helm: str, variant: str, mode: str) -> None:
    docs = render(helm, variant)
    have = {f"{d['kind']}/{d['metadata']['name']}" for d in docs}
    for other, kinds in EXPECTED_KINDS.items():
        if other == mode:
            assert kinds <= have, kinds - have
        else:
            assert not (kinds - EXPECTED_KINDS[mode]) & have, (kinds - EXPECTED_KINDS[mode]) & have
    (cm,) = [d for d in docs if d["metadata"]["name"] == "atlas-config"]
    settle = cm["data"]["ATLAS_SETTLE_FROM_ACCESS_LOG"]
    assert settle == ("true" if mode == "none" else "false")


def test_client_services_expose_only_the_listener(helm: str) -> None:
    services = named(render(helm, "default"), "Service")
    assert [p["port"] for p in services["atlas-envoy"]["spec"]["ports"]] == [8080]
    for name, svc in services.items():
        if name != "atlas-envoy":
            # authz, extproc, admin, valkey: in-cluster only.
            assert svc["spec"].get("type", "ClusterIP") == "ClusterIP", name
    assert [p["port"] for p in services["atlas-admin"]["spec"]["ports"]] == [8081]


def test_probes_are_the_kustomize_ones(helm: str) -> None:
    base: dict[str, dict[str, Any]] = {}
    for name in ("authz", "extproc", "admin", "envoy"):
        for doc in yaml.safe_load_all((K8S_BASE / f"{name}.yaml").read_text()):
            if doc["kind"] == "Deployment":
                base[name] = doc["spec"]["template"]["spec"]["containers"][0]
    deployments = named(render(helm, "default"), "Deployment")
    for name, want in base.items():
        (got,) = deployments[f"atlas-{name}"]["spec"]["template"]["spec"]["containers"]
        for key in ("readinessProbe", "livenessProbe", "ports"):
            assert got[key] == want[key], f"{name}.{key}"


def test_bootstrap_names_this_release(helm: str) -> None:
    docs = render(helm, "default")
    cm = named(docs, "ConfigMap")["atlas-envoy-bootstrap"]
    bootstrap = yaml.safe_load(cm["data"]["envoy.yaml"])
    addresses = {}
    for cluster in bootstrap["static_resources"]["clusters"]:
        (ep,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        sock = ep["endpoint"]["address"]["socket_address"]
        addresses[cluster["name"]] = f"{sock['address']}:{sock['port_value']}"
    assert addresses["atlas_authz"] == "atlas-authz-headless.atlas.svc.cluster.local:50051"
    assert addresses["atlas_extproc"] == "atlas-extproc-headless.atlas.svc.cluster.local:50052"
    assert addresses["atlas_admin"] == "atlas-admin.atlas.svc.cluster.local:8081"
    assert addresses["llm_upstream"] == "vllm.llm.svc.cluster.local:8000"
    envoy = named(docs, "Deployment")["atlas-envoy"]
    ports = {
        p["name"]: p["containerPort"]
        for p in envoy["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert ports["stats"] == stats_port(bootstrap)


def test_redis_choice(helm: str) -> None:
    def redis_env(variant: str) -> dict[str, Any]:
        authz = named(render(helm, variant), "Deployment")["atlas-authz"]
        env = authz["spec"]["template"]["spec"]["containers"][0]["env"]
        (entry,) = [e for e in env if e["name"] == "ATLAS_REDIS_URL"]
        return entry

    assert redis_env("default")["value"] == "redis://atlas-valkey.atlas.svc.cluster.local:6379/0"
    ref = redis_env("external-redis")["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "atlas-secrets", "key": "ATLAS_REDIS_URL"}
    assert redis_env("existing-secret")["valueFrom"]["secretKeyRef"]["name"] == "atlas-prod"
    docs = render(helm, "redis-cluster")
    assert "atlas-valkey" not in named(docs, "Deployment")
    assert named(docs, "ConfigMap")["atlas-config"]["data"]["ATLAS_REDIS_CLUSTER"] == "true"
    assert "Secret" not in {d["kind"] for d in render(helm, "existing-secret")}


def test_provider_credentials_reach_authz_only(helm: str) -> None:
    docs = render(helm, "providers")
    assert named(docs, "Secret")["atlas-provider-credentials"]["stringData"] == {
        "OPENAI_KEY": "sk-test"
    }
    for name, d in named(docs, "Deployment").items():
        refs = [
            e.get("secretRef", {}).get("name")
            for e in d["spec"]["template"]["spec"]["containers"][0].get("envFrom", [])
        ]
        assert ("atlas-provider-credentials" in refs) == (name == "atlas-authz"), name
    assert "replicas" in named(docs, "Deployment")["atlas-authz"]["spec"]
    assert "atlas-authz" not in named(docs, "HorizontalPodAutoscaler")
