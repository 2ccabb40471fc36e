"""Access-log settlement: the services' ATLAS_SETTLE_FROM_ACCESS_LOG and the Envoy in front of
them must agree, in every deployment deploy/ ships.

With the setting true, authz admits non-streamed completions "unattended" (claimed at
admission) for Envoy's gRPC access log to settle, which needs json_to_metadata and the access
log to extproc in that Envoy. With it false, a reservation no ext_proc stream claims within
ATLAS_CLAIM_TIMEOUT_S is released, charged 0: behind an Envoy that settles small non-streamed
responses from the log (no stream), a lost entry would then go uncharged. Atlas's own
bootstraps (compose, the standalone Envoy of deploy/k8s/base) carry both pieces; Istio's and
Envoy Gateway's Envoys get neither from our manifests and settle everything through their
one ext_proc filter, so deploy/k8s/mesh runs the services with it false.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from atlas.envoy_config import EnvoyParams, render
from atlas.settings import Settings, load_settings
from tests.deploy.conftest import DEPLOY, K8S_BASE, ROOT, kustomize_build, load_docs, load_yaml
from tests.deploy.test_compose import COMPOSE, container_env, env_of, interpolate
from tests.deploy.test_k8s import by_kind, effective_env, process_env

#: The services on the request path: authz admits by the setting, extproc settles by it.
REQUEST_PATH = ("authz", "extproc")
K8S = K8S_BASE.parent
MESHES = {"istio": DEPLOY / "istio", "gateway": DEPLOY / "gateway"}
ACCESS_LOGGER = "envoy.access_loggers.http_grpc"
JSON_TO_METADATA = "type.googleapis.com/envoy.extensions.filters.http.json_to_metadata.v3"


def _typed_configs(http_filter: dict[str, Any]) -> list[dict[str, Any]]:
    """A filter's config, and the one inside it when it sits behind an ExtensionWithMatcher."""
    tc = http_filter.get("typed_config", {})
    return [tc, tc.get("extension_config", {}).get("typed_config", {})]


def settles_from_access_log(bootstrap: dict[str, Any]) -> bool:
    """Whether a bootstrap settles non-streamed completions from the access log: the filter
    that lifts usage into metadata and the gRPC access log to extproc, both or neither."""
    listener = bootstrap["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    lifts_usage = any(
        tc.get("@type", "").startswith(JSON_TO_METADATA)
        for f in hcm["http_filters"]
        for tc in _typed_configs(f)
    )
    loggers = [a for a in hcm.get("access_log", []) if a["name"] == ACCESS_LOGGER]
    to_extproc = [
        a
        for a in loggers
        if a["typed_config"]["common_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
        == "atlas_extproc"
    ]
    assert loggers == to_extproc, "a gRPC access log to something other than extproc"
    assert lifts_usage == bool(to_extproc), (
        "json_to_metadata without the access log to extproc, or the reverse"
    )
    return lifts_usage


def _setting(env: dict[str, str], *, image_env: bool) -> bool:
    with container_env(env) if image_env else process_env(env):
        return load_settings().settle_from_access_log


def compose_deployment() -> tuple[dict[str, bool], dict[str, Any]]:
    svcs = interpolate(load_yaml(COMPOSE), {"ATLAS_ADMIN_TOKEN": "t"})["services"]
    settings = {n: _setting(env_of(svcs[n]), image_env=True) for n in REQUEST_PATH}
    return settings, load_yaml(DEPLOY / "envoy" / "envoy.yaml")


def _k8s_settings(docs: list[dict[str, Any]]) -> dict[str, bool]:
    deployments = by_kind(docs, "Deployment")
    return {n: _setting(effective_env(docs, deployments[n]), image_env=False) for n in REQUEST_PATH}


def k8s_base_deployment() -> tuple[dict[str, bool], dict[str, Any]]:
    docs = []
    for name in load_yaml(K8S_BASE / "kustomization.yaml")["resources"]:
        docs.extend(load_docs(K8S_BASE / name))
    return _k8s_settings(docs), load_yaml(K8S_BASE / "bootstrap" / "envoy.yaml")


DEPLOYMENTS = {"compose": compose_deployment, "k8s-base": k8s_base_deployment}


@pytest.mark.parametrize("name", sorted(DEPLOYMENTS))
def test_services_and_their_bootstrap_agree(name: str) -> None:
    settings, bootstrap = DEPLOYMENTS[name]()
    envoy = settles_from_access_log(bootstrap)
    for service, value in settings.items():
        fix = "without" if value else "with"
        assert value == envoy, (
            f"{name}: {service} has ATLAS_SETTLE_FROM_ACCESS_LOG={str(value).lower()} but its "
            f"bootstrap {'has' if envoy else 'lacks'} the access log: render it {fix} "
            "--no-access-log-settlement (deploy/render-envoy.sh), or change the setting"
        )


def test_shipped_bootstraps_settle_from_the_access_log() -> None:
    """The default, and what the setting's default expects."""
    assert Settings.model_fields["settle_from_access_log"].default is True
    for name, deployment in DEPLOYMENTS.items():
        settings, bootstrap = deployment()
        assert settles_from_access_log(bootstrap), name
        assert set(settings.values()) == {True}, name


def test_detection_catches_a_mismatch() -> None:
    """The helper sees a bootstrap rendered without the access log, and half a setup."""
    on = yaml.safe_load(render(EnvoyParams(upstream="http://127.0.0.1:9000")))
    off = yaml.safe_load(
        render(EnvoyParams(upstream="http://127.0.0.1:9000", access_log_settlement=False))
    )
    assert settles_from_access_log(on) and not settles_from_access_log(off)
    half = copy.deepcopy(on)
    hcm = half["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    hcm["typed_config"]["access_log"] = [
        a for a in hcm["typed_config"]["access_log"] if a["name"] != ACCESS_LOGGER
    ]
    with pytest.raises(AssertionError, match="json_to_metadata without"):
        settles_from_access_log(half)


# --- Kubernetes overlays, as kustomize renders them ------------------------------------------


def k8s_overlays() -> list[Path]:
    return sorted(p.parent for p in K8S.glob("*/kustomization.yaml"))


@pytest.mark.parametrize("overlay", k8s_overlays(), ids=lambda p: p.name)
def test_every_k8s_overlay_matches_the_envoy_it_runs_behind(overlay: Path) -> None:
    """An overlay with the standalone Envoy: the bootstrap it mounts decides. One without it
    (a mesh's Envoy calls the services): the setting must be false."""
    docs = kustomize_build(overlay)
    settings = _k8s_settings(docs)
    bootstraps = [
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("envoy-")
    ]
    has_envoy = "envoy" in by_kind(docs, "Deployment")
    assert has_envoy == bool(bootstraps), overlay.name
    if has_envoy:
        (cm,) = bootstraps
        expected = settles_from_access_log(yaml.safe_load(cm["data"]["envoy.yaml"]))
    else:
        expected = False  # Istio's and Envoy Gateway's Envoys: no json_to_metadata, no log
    assert settings == dict.fromkeys(REQUEST_PATH, expected), (
        f"deploy/k8s/{overlay.name}: ATLAS_SETTLE_FROM_ACCESS_LOG must be "
        f"{str(expected).lower()} for {', '.join(REQUEST_PATH)}"
    )


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_meshes_run_on_an_overlay_without_access_log_settlement(mesh: str) -> None:
    """deploy/istio and deploy/gateway name the services overlay they go with; it must run the
    services with the setting false (their Envoys settle everything through ext_proc)."""
    header = (MESHES[mesh] / "kustomization.yaml").read_text()
    named = set(re.findall(r"after\s+(?:#\s*)?deploy/k8s/(\w+)", header))
    assert named == {"mesh"}, f"deploy/{mesh}/kustomization.yaml: applied after {named}"
    docs = kustomize_build(K8S / "mesh")
    assert "envoy" not in by_kind(docs, "Deployment")
    assert _k8s_settings(docs) == dict.fromkeys(REQUEST_PATH, False), mesh
    # And the docs send them there.
    doc = (ROOT / "docs" / "deploy.md").read_text()
    assert f"kubectl apply -k deploy/k8s/mesh && kubectl apply -k deploy/{mesh}" in doc
