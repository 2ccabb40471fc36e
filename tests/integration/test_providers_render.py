"""The providers file rendered into Envoy's bootstrap (atlas/providers/envoy.py through
atlas.envoy_config.render), checked as YAML and by `envoy --mode validate`, and
`atlas check-config` as an operator runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import certifi
import pytest
import yaml

from atlas.envoy_config import EnvoyParams, render, validate
from atlas.providers.config import parse

CA = certifi.where()
FILE = f"""\
providers:
  - name: openai
    base_url: https://api.openai.com/v1
    timeouts: {{connect_s: 1.5, idle_s: 90}}
    pool: {{members: [{{id: oa-1, credential: {{env: ATLAS_TEST_OA_KEY}}}}]}}
  - name: groq
    base_url: https://api.groq.com/openai/v1
    tls: {{sni: groq.example, ca_file: {CA}}}
    pool: {{members: [{{id: gq-1, credential: {{env: ATLAS_TEST_GROQ_KEY}}}}]}}
  - name: gemini
    base_url: https://generativelanguage.googleapis.com/v1beta/openai
    api: gemini
    pool: {{members: [{{id: gm-1, credential: {{env: ATLAS_TEST_GEMINI_KEY}}}}]}}
  - name: vllm
    base_url: http://10.0.0.7:8000
models:
  - alias: gpt-4o-mini
    targets: [{{provider: openai}}, {{provider: groq, priority: 1}}]
  - alias: "gemini-*"
    targets: [{{provider: gemini}}]
"""
SECRETS = {
    "ATLAS_TEST_OA_KEY": "sk-oa-never-printed-111",
    "ATLAS_TEST_GROQ_KEY": "gsk-never-printed-222",
    "ATLAS_TEST_GEMINI_KEY": "AIza-never-printed-333",
}


def _bootstrap(**kw: Any) -> tuple[str, dict[str, Any]]:
    text = render(EnvoyParams(upstream="http://127.0.0.1:9000", providers=parse(FILE), **kw))
    return text, yaml.safe_load(text)


def _listener(doc: dict[str, Any]) -> dict[str, Any]:
    listener = next(li for li in doc["static_resources"]["listeners"] if li["name"] != "stats")
    return next(
        f["typed_config"]
        for f in listener["filter_chains"][0]["filters"]
        if f["name"] == "envoy.filters.network.http_connection_manager"
    )


def _clusters(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in doc["static_resources"]["clusters"]}


def _routes(doc: dict[str, Any]) -> list[dict[str, Any]]:
    hosts = _listener(doc)["route_config"]["virtual_hosts"]
    return next(h for h in hosts if h["name"] == "llm")["routes"]


def _provider_routes(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(provider, prefix, route action) of every header-matched provider route, in order."""
    out = []
    for r in _routes(doc):
        for h in r["match"].get("headers", []):
            if h["name"] == "x-atlas-provider":
                out.append((h["string_match"]["exact"], r["match"]["prefix"], r["route"]))
    return out


def test_a_cluster_per_provider_with_its_tls() -> None:
    _, doc = _bootstrap()
    clusters = _clusters(doc)
    names = {"provider_openai", "provider_groq", "provider_gemini", "provider_vllm"}
    assert names <= set(clusters)
    oa = clusters["provider_openai"]
    assert oa["type"] == "STRICT_DNS" and oa["connect_timeout"] == "1.5s"
    endpoint = oa["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"]["socket_address"] == {"address": "api.openai.com", "port_value": 443}
    tls = oa["transport_socket"]["typed_config"]
    assert tls["sni"] == "api.openai.com" and "common_tls_context" not in tls
    groq = clusters["provider_groq"]["transport_socket"]["typed_config"]
    assert groq["sni"] == "groq.example"
    validation = groq["common_tls_context"]["validation_context"]
    assert validation["trusted_ca"] == {"filename": CA}
    assert validation["match_typed_subject_alt_names"][0]["matcher"] == {"exact": "groq.example"}
    vllm = clusters["provider_vllm"]
    assert vllm["type"] == "STATIC" and "transport_socket" not in vllm
    addr = vllm["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    assert addr["socket_address"] == {"address": "10.0.0.7", "port_value": 8000}


def test_a_route_per_provider_matched_by_its_header() -> None:
    _, doc = _bootstrap()
    routes = _provider_routes(doc)
    assert [(p, prefix) for p, prefix, _ in routes] == [
        ("openai", "/v1/"),
        ("groq", "/v1/"),
        ("gemini", "/v1/"),
        ("gemini", "/v1beta/"),  # Gemini's native API too
        ("vllm", "/v1/"),
    ]
    by = {(p, prefix): action for p, prefix, action in routes}
    assert all(a["cluster"] == f"provider_{p}" for (p, _), a in by.items())
    assert "prefix_rewrite" not in by[("openai", "/v1/")]  # its base path is /v1
    assert "prefix_rewrite" not in by[("vllm", "/v1/")]  # no base path: as sent
    assert by[("groq", "/v1/")]["prefix_rewrite"] == "/openai/v1/"
    assert by[("gemini", "/v1/")]["prefix_rewrite"] == "/v1beta/openai/"
    assert "prefix_rewrite" not in by[("gemini", "/v1beta/")]
    assert by[("gemini", "/v1/")]["host_rewrite_literal"] == "generativelanguage.googleapis.com"
    assert by[("openai", "/v1/")]["idle_timeout"] == "90s"
    assert by[("openai", "/v1/")]["timeout"] == "0s"
    # The header picks the route and goes no further.
    assert all(
        r["request_headers_to_remove"] == ["x-atlas-provider"]
        for r in _routes(doc)
        if any(h["name"] == "x-atlas-provider" for h in r["match"].get("headers", []))
    )


def test_provider_routes_come_before_the_catch_all() -> None:
    _, doc = _bootstrap()
    routes = _routes(doc)
    first_catch_all = next(
        i
        for i, r in enumerate(routes)
        if r["match"].get("prefix") == "/v1/" and "headers" not in r["match"]
    )
    last_provider = max(i for i, r in enumerate(routes) if "headers" in r["match"] and "route" in r)
    assert last_provider < first_catch_all


def test_ext_authz_clears_the_route_cache_only_with_providers() -> None:
    text, doc = _bootstrap()
    assert "clear_route_cache: true" in text
    authz = next(
        f for f in _listener(doc)["http_filters"] if f["name"] == "envoy.filters.http.ext_authz"
    )
    assert authz["typed_config"]["clear_route_cache"] is True
    assert "clear_route_cache: false" in render(EnvoyParams(upstream="http://127.0.0.1:9000"))


def _settlement_log(doc: dict[str, Any]) -> dict[str, Any]:
    logs = _listener(doc)["access_log"]
    return next(log for log in logs if log["name"] == "envoy.access_loggers.http_grpc")


def test_the_access_log_covers_provider_routed_requests() -> None:
    _, doc = _bootstrap()
    log = _settlement_log(doc)
    filters = log["filter"]["or_filter"]["filters"]
    matchers = [f["metadata_filter"]["matcher"] for f in filters]
    provider = [m for m in matchers if m["path"][0]["key"] == "x-atlas-provider"]
    assert provider and provider[0]["value"] == {"present_match": True}
    assert log["typed_config"]["additional_response_headers_to_log"] == ["retry-after"]
    # Without access-log settlement, provider-routed requests are still logged.
    _, doc = _bootstrap(access_log_settlement=False)
    only = _settlement_log(doc)["filter"]["metadata_filter"]["matcher"]
    assert only["path"][0]["key"] == "x-atlas-provider"


def test_the_rendered_bootstrap_passes_envoy_validate(tmp_path: Path) -> None:
    text, _ = _bootstrap()
    path = tmp_path / "providers.yaml"
    path.write_text(text)
    validate(path)
    grpc_text, _ = _bootstrap(authz_protocol="grpc", access_log_settlement=False)
    grpc = tmp_path / "providers-grpc.yaml"
    grpc.write_text(grpc_text)
    validate(grpc)


# ---- atlas check-config ------------------------------------------------------------------


def _check_config(tmp_path: Path, *args: str, env: dict[str, str] | None = None,
                  text: str = FILE) -> subprocess.CompletedProcess[str]:  # fmt: skip
    path = tmp_path / "providers.yaml"
    path.write_text(text)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ATLAS_")}
    return subprocess.run(
        [sys.executable, "-m", "atlas", "check-config", "--providers", str(path), *args],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )


def _printed(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def test_check_config_accepts_a_valid_file(tmp_path: Path) -> None:
    proc = _check_config(tmp_path)
    assert proc.returncode == 0, _printed(proc)
    assert "4 providers, 3 pool members, 2 model aliases" in proc.stdout
    assert proc.stdout.rstrip().endswith("atlas check-config: ok")


def test_check_config_names_the_file_and_field_of_an_error(tmp_path: Path) -> None:
    proc = _check_config(tmp_path, text=FILE.replace("id: gq-1", "id: GQ!"))
    assert proc.returncode == 2
    assert f"{tmp_path / 'providers.yaml'}: providers[1].pool.members[0].id" in proc.stderr
    assert "ok" not in proc.stdout


def test_check_config_secrets_names_a_missing_variable(tmp_path: Path) -> None:
    present = {k: v for k, v in SECRETS.items() if k != "ATLAS_TEST_GROQ_KEY"}
    proc = _check_config(tmp_path, "--secrets", env=present)
    assert proc.returncode == 2
    assert "providers[1].pool.members[0] (groq/gq-1)" in proc.stderr
    assert "environment variable ATLAS_TEST_GROQ_KEY is not set" in proc.stderr
    assert not any(v in _printed(proc) for v in SECRETS.values())


def test_check_config_secrets_reads_them_and_never_prints_them(tmp_path: Path) -> None:
    proc = _check_config(tmp_path, "--secrets", env=SECRETS)
    assert proc.returncode == 0, _printed(proc)
    assert "every credential is readable" in proc.stdout
    assert not any(v in _printed(proc) for v in SECRETS.values())
    bad = {**SECRETS, "ATLAS_TEST_OA_KEY": "sk-two\nlines-never-printed"}
    proc = _check_config(tmp_path, "--secrets", env=bad)
    assert proc.returncode == 2 and "printable ASCII" in proc.stderr
    assert "never-printed" not in _printed(proc)


def test_check_config_envoy_validates_the_bootstrap(tmp_path: Path) -> None:
    proc = _check_config(tmp_path, "--envoy", "--secrets", env=SECRETS)
    assert proc.returncode == 0, _printed(proc)
    assert "envoy --mode validate: the rendered bootstrap is valid" in proc.stdout


@pytest.mark.parametrize("text", ["providers: [\n", "- just a list\n"])
def test_check_config_refuses_what_is_not_a_providers_file(tmp_path: Path, text: str) -> None:
    proc = _check_config(tmp_path, text=text)
    assert proc.returncode == 2 and str(tmp_path / "providers.yaml") in proc.stderr
