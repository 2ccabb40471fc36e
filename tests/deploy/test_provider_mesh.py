"""`atlas render-mesh`: the providers file as Istio and Envoy Gateway resources. The shipped
renderings of the README's example are current; the VirtualService and HTTPRoute validate
against the mesh schemas; every provider gets its host, TLS and a header-matched route."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from atlas.cli import main
from atlas.grant import PROVIDER_HEADER
from atlas.providers import config as providers_config
from tests.deploy.conftest import DEPLOY, kind_key, load_docs, schema_errors, validator

PROVIDERS = DEPLOY / "providers"
EXAMPLE = PROVIDERS / "providers.example.yaml"
SCHEMA = {"istio": "istio.schema.json", "gateway": "gateway.schema.json"}
CHECKED_KINDS = {"VirtualService", "HTTPRoute"}  # the kinds the focused schemas describe


@pytest.mark.parametrize("mesh", ["istio", "gateway"])
def test_shipped_rendering_is_current(mesh: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render-mesh", "--providers", str(EXAMPLE), "--mesh", mesh]) == 0
    fresh = list(yaml.safe_load_all(capsys.readouterr().out))
    assert load_docs(PROVIDERS / f"{mesh}.yaml") == fresh, (
        f"regenerate deploy/providers/{mesh}.yaml"
    )


@pytest.mark.parametrize("mesh", ["istio", "gateway"])
def test_routes_validate_and_name_every_provider(mesh: str) -> None:
    docs = load_docs(PROVIDERS / f"{mesh}.yaml")
    problems = []
    for doc in docs:
        if doc["kind"] in CHECKED_KINDS:
            v = validator(SCHEMA[mesh], kind_key(doc))
            problems += [f"{doc['kind']}: {e}" for e in schema_errors(v, doc)]
    assert problems == []
    names = [p.name for p in providers_config.load(EXAMPLE).providers]
    text = Path(PROVIDERS / f"{mesh}.yaml").read_text()
    for name in names:
        assert f"provider-{name}" in text
    route = next(d for d in docs if d["kind"] in CHECKED_KINDS)
    if mesh == "istio":
        matched = [
            r["match"][0]["headers"][PROVIDER_HEADER]["exact"] for r in route["spec"]["http"]
        ]
        assert all(
            PROVIDER_HEADER in r["headers"]["request"]["remove"] for r in route["spec"]["http"]
        )
        gemini = next(r for r in route["spec"]["http"] if r["name"] == "provider-gemini")
        assert gemini["rewrite"] == {
            "uri": "/v1beta/openai/",
            "authority": "generativelanguage.googleapis.com",
        }
        rules = {d["metadata"]["name"]: d for d in docs if d["kind"] == "DestinationRule"}
        assert rules["provider-openai"]["spec"]["trafficPolicy"]["tls"]["sni"] == "api.openai.com"
        assert "tls" not in rules["provider-vllm"]["spec"]["trafficPolicy"]
    else:
        matched = [r["matches"][0]["headers"][0]["value"] for r in route["spec"]["rules"]]
        tls = {d["metadata"]["name"] for d in docs if d["kind"] == "BackendTLSPolicy"}
        assert tls == {f"provider-{n}" for n in names if n != "vllm"}
    assert matched == names
